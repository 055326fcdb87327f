"""Run a suite for several methods under one budget: `python -m suites.run gsm8k --methods all`.

Every run (one method × one point of a sweep) is its own process (`suites.worker`) and writes one
JSON record under --out; this process only validates input, prepares the pretrained base once,
orchestrates, and prints a summary. A sweep that is interrupted and started again skips every run
whose config already has an `ok` record.

Exit status: 0 all runs ok; 1 some run ended diverged/oom/error (its record says why); 2 bad input
(nothing written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # no hub on the CPU profiles; the paper profile checks access itself
# bitsandbytes warns on import about an optional CPU kernel package; bad input must stay one line on stderr
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from suites import profiles, records  # noqa: E402
from suites.data import CACHE_DIR, DataMissing  # noqa: E402


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + exits 2; we want one line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m suites.run",
        description=(
            "Train and evaluate every method of a suite under identical budgets (data order, steps,\n"
            "tokens, batch, sequence length, schedule, rank, evaluation; only learning rates differ, per\n"
            "method, from the profile). Each run is its own process and writes one JSON record to --out;\n"
            "a restarted sweep skips runs that already have an ok record."
        ),
        epilog=(
            "examples:\n  python -m suites.run gsm8k --methods all\n"
            "  python -m suites.run c4 --methods adam,oasis --profile smoke\n"
            "  python -m suites.run gsm8k --methods oasis --sweep rank=8,16,32 --set steps=60\n"
            "profile keys (suites/profiles.py) and method hyper-parameters (suites/registry.py) can be\n"
            "overridden with --set; 'lr=X' sets every method's learning rate, 'lr.NAME=X' one method's.\n"
            "data: $OASIS_DATA_DIR (default <repo>/../shared/data)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", help="gsm8k | humaneval | c4")
    p.add_argument(
        "--methods", default="all", help="'all' (adam,lora,galore,ldadam,pca,oasis) or a comma list"
    )
    p.add_argument(
        "--profile", default="cpu", help="smoke (seconds, tests/CI) | cpu (minutes) | paper (GPU, hub)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile key or method hyper-parameter (repeatable)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="one run per value (repeatable: the cartesian product)",
    )
    p.add_argument("--out", default="results", help="folder for the run records (default: results/)")
    p.add_argument("--device", default="auto", choices=None, help="auto (CUDA when present) | cpu | cuda")
    return p


# ------------------------------------------------------------------------------------------- planning


def _method_key_witnesses() -> dict:
    from suites.registry import ALL_METHODS, method_defaults

    keys: dict = {}
    for name in ALL_METHODS:
        try:
            for k, v in method_defaults(name).items():
                keys.setdefault(k, v)
        except ImportError:  # a method module not merged yet cannot contribute keys
            continue
    return keys


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if choice not in ("cpu", "cuda"):
        raise UsageError(f"--device {choice}: choose from auto, cpu, cuda")
    return choice


def _check_rank(cfg: dict) -> None:
    from suites.models import linear_shapes, model_config, weights_spec

    shapes = linear_shapes(model_config(weights_spec(cfg) or cfg["model"]))
    name, (d_out, d_in) = min(shapes.items(), key=lambda kv: min(kv[1]))
    if cfg["rank"] > min(d_out, d_in):
        raise UsageError(
            f"rank {cfg['rank']} is larger than layer {name} ({d_out}x{d_in}) of {cfg['model']}; "
            f"choose rank <= {min(d_out, d_in)}"
        )


def base_config(cfg: dict) -> dict:
    """The c4 pretraining run that makes the base of a fine-tuning config (same model, device, seed)."""
    prof = profiles.profile("c4", cfg["profile"])
    prof.update(model=cfg["model"], steps=cfg["base_steps"], seed=cfg["seed"], dtype=cfg["dtype"])
    prof["lrs"] = {"default": cfg["base_lr"]}
    prof["mem_window"] = min(prof["mem_window"], prof["steps"] - 1)
    prof["warmup_steps"] = max(1, prof["steps"] // 10)
    from suites.registry import method_defaults

    base = profiles.resolve("c4", cfg["profile"], prof, "adam", method_defaults("adam"), cfg["device"])
    from suites.models import run_fields

    base.update(run_fields(base))
    base["purpose"] = "base"
    return base


def plan(args) -> tuple[list[dict], str]:
    """Validate everything and return the resolved configs (no side effects)."""
    from suites.registry import method_defaults, resolve_methods
    from suites.tasks import get as get_suite

    try:
        suite = get_suite(args.suite)
        methods = resolve_methods(args.methods)
        prof = profiles.profile(args.suite, args.profile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = _device(args.device)
    method_keys = _method_key_witnesses()
    sets = [profiles.parse_assignment(s) for s in args.sets]
    sweep_axes = []
    for text in args.sweep:
        key, values = profiles.parse_assignment(text)
        # values are comma-separated; ';' separates values that hold commas (betas=0.9,0.99;0.9,0.95)
        values = [v for v in values.split(";" if ";" in values else ",") if v.strip()]
        if not values:
            raise UsageError(f"--sweep {text}: no values")
        sweep_axes.append([(key, v) for v in values])
    configs = []
    from suites.registry import ALL_METHODS

    for point in itertools.product(*sweep_axes) if sweep_axes else [()]:
        p = profiles.apply_overrides(prof, sets + list(point), method_keys)
        named = set(p.get("per_method", {})) | (set(p["lrs"]) - {"default"})
        if named - set(ALL_METHODS):
            raise UsageError(f"unknown method {sorted(named - set(ALL_METHODS))[0]!r} in --set KEY.METHOD; "
                             f"choose from {', '.join(ALL_METHODS)}")
        for method in methods:
            cfg = profiles.resolve(args.suite, args.profile, p, method, method_defaults(method), device)
            configs.append(cfg)
    from suites.models import run_fields

    try:
        suite.check_data()
        fields = {}  # the model's source, tokenizer and prompt format: the same for every run of a point
        for cfg in configs:
            key = (cfg["model"], cfg["base"])
            if key not in fields:
                fields[key] = run_fields(cfg)
            cfg.update(fields[key])
            _check_rank(cfg)
        for cfg in configs:
            if suite.FINETUNE and cfg["base"] == "c4":
                cfg["base_hash"] = records.config_hash(base_config(cfg))
    except (DataMissing, ValueError) as exc:  # ModelUnavailable is a ValueError: one line, exit 2
        raise UsageError(str(exc)) from None
    return configs, suite.HEADLINE


# ------------------------------------------------------------------------------------------- running


def _die_with_parent():
    """Child processes die with this one (Linux), so a killed sweep leaves no run behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch(spec: dict) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="oasis-run-", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "suites.worker", f.name],
            cwd=records.REPO_ROOT,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        Path(f.name).unlink(missing_ok=True)


def ensure_base(cfg: dict) -> str:
    """Path of the pretrained base for a fine-tuning config; pretrains it (c4 suite, adam) the first time."""
    bcfg = base_config(cfg)
    home = CACHE_DIR / "bases" / records.config_hash(bcfg)
    model_dir = home / "model"
    if (model_dir / "config.json").exists():
        return str(model_dir)
    print(
        f"pretraining the base once ({bcfg['model']}, {bcfg['steps']} steps of the c4 suite); cached in "
        f"{home.relative_to(records.REPO_ROOT)}",
        file=sys.stderr,
    )
    launch({"config": bcfg, "out_dir": str(home), "save_dir": str(model_dir), "position": 1})
    if not (model_dir / "config.json").exists():
        rec = next(iter(records.load_records(home)), None)
        why = rec["error"] if rec else "the pretraining process died"
        raise RuntimeError(f"base pretraining failed: {why}")
    return str(model_dir)


def failure_record(cfg: dict, why: str) -> dict:
    """The parent's record for a run whose process died before writing its own."""
    from datetime import datetime, timezone

    return {
        "schema": records.SCHEMA,
        "run_id": records.run_id(cfg),
        "suite": cfg["suite"],
        "profile": cfg["profile"],
        "method": cfg["method"],
        "status": "error",
        "error": why,
        "config": cfg,
        "config_hash": records.config_hash(cfg),
        "metrics": {},
        "memory": None,
        "speed": None,
        "curve": [],
        "subspace": None,
        "env": records.environment(cfg["device"], cfg["dtype"]),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": 0.0,
    }


def summary(rows: list[dict], headline: str) -> str:
    lines = [
        f"{'method':<18} {'status':<9} {'peak MiB':>9} {headline:>14} {'tokens/s':>9} {'wall s':>7}  run_id"
    ]
    for rec in rows:
        mem = rec.get("memory") or {}
        peak = f"{mem['peak_bytes'] / 2**20:.1f}" if mem.get("peak_bytes") is not None else "-"
        metric = (rec.get("metrics") or {}).get(headline)
        metric = f"{metric:.4f}" if isinstance(metric, (int, float)) else "-"
        speed = rec.get("speed") or {}
        tps = f"{speed['tokens_per_s']:.0f}" if speed.get("tokens_per_s") else "-"
        lines.append(
            f"{rec['method']:<18} {rec['status']:<9} {peak:>9} {metric:>14} {tps:>9} "
            f"{rec.get('wall_s') or 0:>7.1f}  {rec['run_id']}"
        )
        if rec.get("error"):
            lines.append(f"{'':<18} {rec['error'][:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        configs, headline = plan(args)
    except (UsageError, profiles.ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    out = Path(args.out)
    done = records.completed_hashes(out)
    todo = [c for c in configs if records.config_hash(c) not in done]
    if len(todo) < len(configs):
        print(
            f"resuming: {len(configs) - len(todo)} of {len(configs)} runs already have an ok record in {out}",
            file=sys.stderr,
        )
    bar = tqdm(
        total=len(configs),
        initial=len(configs) - len(todo),
        desc=f"{args.suite}/{args.profile}",
        unit="run",
        position=0,
        dynamic_ncols=True,
        disable=bool(os.environ.get("OASIS_NO_PROGRESS")),
    )
    try:
        for cfg in todo:
            bar.set_postfix(method=cfg["method"], refresh=True)
            spec = {"config": cfg, "out_dir": str(out), "position": 1}
            path = out / f"{records.run_id(cfg)}.json"
            before = path.stat().st_mtime_ns if path.exists() else None
            try:
                if cfg.get("base_hash"):
                    spec["base_dir"] = ensure_base(cfg)
                code = launch(spec)
                if not path.exists() or path.stat().st_mtime_ns == before:
                    records.write_record(
                        failure_record(cfg, f"run process exited with code {code} before writing its record"),
                        out,
                    )
            except RuntimeError as exc:
                records.write_record(failure_record(cfg, str(exc)), out)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(
            "\ninterrupted: finished runs are recorded; run the same command again to resume", file=sys.stderr
        )
        return 130
    bar.close()
    wanted = {records.config_hash(c) for c in configs}
    latest = {}
    for rec in records.load_records(out, recursive=False):
        if rec["config_hash"] in wanted:
            latest[rec["config_hash"]] = rec
    rows = [latest[records.config_hash(c)] for c in configs if records.config_hash(c) in latest]
    print(summary(rows, headline))
    print(f"records: {out}/ ({len(rows)} runs)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
