"""One run in its own process: `python -m suites.worker SPEC.json`.

The parent (`suites.run`) writes a spec {config, out_dir, base_dir?, save_dir?, position} and starts
this module; it builds the model and method, trains with the shared loop, evaluates with the suite's
shared evaluation and writes exactly one record (atomically). Failures are results: divergence,
out-of-memory and any other exception each become a record with that status.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path


def threads() -> int:
    """Intra-op threads of a run: $OASIS_THREADS, else half the cores (at least 1).

    On a small shared machine, one busy thread per run beats two threads fighting other processes
    (a llama-tiny step measured 15x slower with 2 threads under load); the count goes into the record.
    """
    return max(1, int(os.environ.get("OASIS_THREADS") or (os.cpu_count() or 2) // 2))


def run(spec: dict) -> dict:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional-kernel notice on import
    import torch

    from suites import models, records
    from suites.loop import TrainResult, is_oom, train
    from suites.meters import make_meter
    from suites.registry import build_method
    from suites.tasks import get as get_suite

    cfg = spec["config"]
    device = cfg["device"]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(threads())
    res, metrics = TrainResult(), {}
    try:
        suite = get_suite(cfg["suite"])
        tokenizer = models.load_tokenizer(cfg)
        batches = suite.train_batches(tokenizer, cfg)
        model = models.load_model(cfg, spec.get("base_dir"))
        step0 = suite.before_training(model, tokenizer, cfg, device)
        if cfg.get("lean_activations"):
            from suites.lean import apply_lean_activations

            if not apply_lean_activations(model):
                raise ValueError("lean_activations=true but the model has no RMSNorm/SwiGLU modules to patch")
        model, optimizer = build_method(cfg["method"], model, cfg)
        meter = make_meter("cuda" if device.startswith("cuda") else "cpu", model, optimizer)
        progress = _progress(cfg, spec.get("position", 1))
        try:
            res = train(
                model,
                optimizer,
                batches,
                steps=cfg["steps"],
                mem_window=cfg["mem_window"],
                schedule=cfg["schedule"],
                warmup_steps=cfg["warmup_steps"],
                min_lr_ratio=cfg["min_lr_ratio"],
                meter=meter,
                device=device,
                progress=progress,
            )
        finally:
            if progress is not None:
                progress.close()
        if res.status == "ok":
            metrics = {**suite.evaluate(model, tokenizer, cfg, device), "step0": step0}
            if "eval_loss" in metrics and res.curve:
                res.curve[-1][2] = metrics["eval_loss"]
            if spec.get("save_dir"):
                _save(model, tokenizer, spec["save_dir"])
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, recorded with its message
        res.status = "oom" if is_oom(exc) else "error"
        res.error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ''}"
        )
        if os.environ.get("OASIS_DEBUG"):
            traceback.print_exc()
    record = {
        "schema": records.SCHEMA,
        "run_id": records.run_id(cfg),
        "suite": cfg["suite"],
        "profile": cfg["profile"],
        "method": cfg["method"],
        "status": res.status,
        "error": res.error,
        "config": cfg,
        "config_hash": records.config_hash(cfg),
        "metrics": metrics,
        "memory": res.memory,
        "speed": res.speed,
        "curve": res.curve,
        "subspace": {"drift": res.drift} if res.drift is not None else None,
        "env": records.environment(device, cfg["dtype"]),
        "started_at": started,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    records.write_record(record, spec["out_dir"])
    return record


def _save(model, tokenizer, save_dir: str) -> None:
    """Save a pretrained base atomically: write next to it, then rename into place."""
    final = Path(save_dir)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    os.replace(tmp, final)


def _progress(cfg: dict, position: int):
    if os.environ.get("OASIS_NO_PROGRESS"):
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg["steps"],
        desc=f"  {cfg['method']}",
        position=position,
        leave=False,
        unit="step",
        dynamic_ncols=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    record = run(spec)
    return 0 if record["status"] == "ok" else 3


if __name__ == "__main__":
    sys.exit(main())
