"""tools/gpu-check --dry-run: every stage of the GPU check, on CPU with tiny sizes, end to end (CI runs it
here, since the check itself only ever runs where a GPU is lent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suites.core.registry import ALL_METHODS

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # about a minute: five stages, each its own process (CI runs slow tests too)
def test_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tools/gpu-check"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert set(stages) == {"install", "memory-135m", "memory-1b", "gsm8k-gpu", "oracle", "speed"}
    for name in ("memory-135m", "memory-1b", "gsm8k-gpu", "oracle"):
        assert stages[name]["exit"] == 0 and isinstance(stages[name]["pid"], int)
    # every method measured at the first shape, by the memory tool itself
    memory = json.loads((out / "memory-135m.json").read_text())
    assert [r["method"] for r in memory["results"]] == list(ALL_METHODS)
    assert all(r["peak_bytes"] > 0 for r in memory["results"])
    # a training record of the gsm8k stage, with the data it read
    (record_path,) = (out / "runs").glob("gsm8k-*.json")
    record = json.loads(record_path.read_text())
    assert record["status"] == "ok" and record["metrics"]["data"]["gsm8k/train"]["rows"] == 7473
    assert "passed" in (out / "oracle.log").read_text()
