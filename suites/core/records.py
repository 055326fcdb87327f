"""Run records: one JSON file per run (DESIGN §3.4), written atomically.

A record is the unit of truth of the benchmark: the report builder reads nothing else. Records are
keyed by `config_hash`, a digest of the fully resolved config, so an interrupted sweep resumes by
skipping every config that already has an `ok` record.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from suites.core import files

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
REPO_ROOT = Path(__file__).resolve().parents[2]


def config_hash(config: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of a resolved config."""
    text = json.dumps(files.json_safe(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_id(config: dict) -> str:
    return f"{config['suite']}-{config['profile']}-{config['method']}-{config_hash(config)[:10]}"


# what the tools write into the repository: their own outputs do not change the code that produced them (a
# memtable or a study writing its results would otherwise mark every later result of the same checkout dirty)
OUTPUT_PATHS = ("results", "reports/out")


def git_commit() -> str | None:
    """HEAD of the repository the harness runs from, with '+dirty' when tracked files other than the
    tools' outputs (`OUTPUT_PATHS`) differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             *(f":(exclude){path}" for path in OUTPUT_PATHS)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def weights_checksum(model) -> str:
    """16 hex digits of sha256 over a model's floating-point weights (state_dict in name order, raw bytes):
    the identity of the weights a run starts from (`env.base_checksum`)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_floating_point():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def machine(device: str) -> tuple[str, str]:
    """(`env.machine`, `env.machine_desc`): 12 hex digits of sha256 over the description of the machine a
    speed was measured on (CPU model, logical cores, torch version, GPU name on CUDA), and the description."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU model here; elsewhere the platform's name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        desc += f"; {torch.cuda.get_device_name(0)}"
    return hashlib.sha256(desc.encode()).hexdigest()[:12], desc


def code_digest(paths) -> str:
    """16 hex digits of sha256 over the syntax trees of Python sources, docstrings dropped: what the code
    does, not how it is commented or laid out (a key for caches of what that code produces)."""
    digest = hashlib.sha256()
    for path in paths:
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                    and isinstance(getattr(body[0], "value", None), ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(Path(path).name.encode())
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def environment(device: str, dtype: str, commit: str | None = None) -> dict:
    """The record's `env`; `commit` is the checkout's state when the run started (read now if None)."""
    import torch
    import transformers

    machine_id, machine_desc = machine(device)
    env = {
        "git_commit": commit or git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "dtype": dtype,
        "host_cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_id,
        "machine_desc": machine_desc,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def now() -> str:
    """The `started_at` timestamp of a record (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def make_record(config: dict, *, status: str, error: str | None = None, metrics: dict | None = None,
                memory: dict | None = None, speed: dict | None = None, curve: list | None = None,
                drift: list | None = None, started_at: str, wall_s: float,
                base_checksum: str | None = None, comm: dict | None = None,
                tracking: dict | None = None, commit: str | None = None) -> dict:
    """A run record (DESIGN §3.4) in the schema's key order; the one place a record is assembled.
    `comm` (bytes all-reduced per step) exists in data-parallel records only; `subspace` holds the drift
    of an optimizer that reports it and the tracking diagnostic's `refreshes` and `tracking` rows
    (`suites.measure.tracking`), None when there is neither. `commit`: `git_commit()` read when the run
    started
    (the code it imported then); a checkout that changes during a long run does not rename its code."""
    subspace = {**({"drift": drift} if drift is not None else {}), **(tracking or {})} or None
    return {
        "schema": SCHEMA,
        "run_id": run_id(config),
        "suite": config["suite"],
        "profile": config["profile"],
        "method": config["method"],
        "status": status,
        "error": error,
        "config": config,
        "config_hash": config_hash(config),
        "metrics": metrics if metrics is not None else {},
        "memory": memory,
        **({"comm": comm} if comm is not None else {}),
        "speed": speed,
        "curve": curve if curve is not None else [],
        "subspace": subspace,
        "env": {**environment(config["device"], config["dtype"], commit), "base_checksum": base_checksum},
        "started_at": started_at,
        "wall_s": wall_s,
    }


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
    """Write `record` as `<out_dir>/<run_id>.json` atomically and world-readable (`suites.core.files`)."""
    validate_record(record)
    return files.write_json(record_path(record, out_dir), record)


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


def has_ok_record(out_dir: str | os.PathLike, config: dict) -> bool:
    """Whether `out_dir` holds an `ok` record of exactly this config (read from its file, not a listing)."""
    path = Path(out_dir) / f"{run_id(config)}.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    ok = isinstance(rec, dict) and rec.get("status") == "ok"
    return ok and rec.get("config_hash") == config_hash(config)


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike, config: dict):
    """Claim one config of a sweep: yields True while this process holds `<out_dir>/.locks/<hash>.lock`,
    False when another sweep into the same folder is running that config now."""
    with files.exclusive_lock(Path(out_dir) / ".locks" / f"{config_hash(config)}.lock") as held:
        yield held
