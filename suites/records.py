"""Run records: one JSON file per run (DESIGN §3.4), written atomically.

A record is the unit of truth of the benchmark: the report builder reads nothing else. Records are
keyed by `config_hash`, a digest of the fully resolved config, so an interrupted sweep resumes by
skipping every config that already has an `ok` record.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

SCHEMA = "oasis-bench/run-record/1"
STATUSES = ("ok", "diverged", "oom", "error")
RECORD_KEYS = (
    "schema",
    "run_id",
    "suite",
    "profile",
    "method",
    "status",
    "error",
    "config",
    "config_hash",
    "metrics",
    "memory",
    "speed",
    "curve",
    "subspace",
    "env",
    "started_at",
    "wall_s",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def _canonical(obj):
    """JSON-stable form: tuples become lists; NaN/inf (a diverged loss) become null, which JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def config_hash(config: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of a resolved config."""
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(config: dict) -> str:
    return f"{config['suite']}-{config['profile']}-{config['method']}-{config_hash(config)[:10]}"


def git_commit() -> str | None:
    """HEAD of the repository the harness runs from, with '+dirty' when tracked files differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, dtype: str) -> dict:
    import torch
    import transformers

    env = {
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "host_cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def validate_record(record: dict) -> None:
    """Raise ValueError when a record does not follow the schema (used before every write)."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"run record lacks keys {missing}")
    if record["schema"] != SCHEMA:
        raise ValueError(f"run record schema {record['schema']!r} != {SCHEMA!r}")
    if record["status"] not in STATUSES:
        raise ValueError(f"run record status {record['status']!r} not in {STATUSES}")
    if record["config_hash"] != config_hash(record["config"]):
        raise ValueError("run record config_hash does not match its config")


def record_path(record: dict, out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / f"{record['run_id']}.json"


def write_record(record: dict, out_dir: str | os.PathLike) -> Path:
    """Write `record` as `<out_dir>/<run_id>.json` atomically (temp file in the same folder + os.replace)."""
    validate_record(record)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = record_path(record, out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_canonical(record), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_records(out_dir: str | os.PathLike, recursive: bool = True) -> list[dict]:
    """Every readable record under `out_dir` (recursively), oldest first; unreadable files are skipped."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    records = []
    for path in sorted(root.rglob("*.json") if recursive else root.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            records.append(rec)
    records.sort(key=lambda r: r.get("started_at") or "")
    return records


def completed_hashes(out_dir: str | os.PathLike) -> set[str]:
    """config hashes that already have an `ok` record directly in `out_dir`: a resumed sweep skips these.

    Not recursive, so reference runs committed in a sub-folder (e.g. results/reference/) never stop a
    fresh `--out results` sweep from running.
    """
    return {r["config_hash"] for r in load_records(out_dir, recursive=False) if r.get("status") == "ok"}
