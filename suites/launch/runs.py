"""One run as its own process: the worker (`python -m suites.worker`, N of them under torchrun), its lock and
its record when the process dies before writing one, and the pretrained base a fine-tuning run starts from
(pretrained once with the c4 suite, cached under `.cache/bases/` by the hash of its config)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from suites.core import cli, files, profiles, records, registry

# the sources that determine a pretrained base's weights: the loop, data, tokenizers, model (and its presets),
# c4 task and AdamW adapter
BASE_CODE = tuple(records.REPO_ROOT / p for p in (
    "suites/launch/recipe.py",
    "suites/train/data.py", "suites/train/tokenizers.py", "suites/train/sources.py", "suites/train/models.py",
    "suites/core/presets.py",
    "suites/evaluate/tasks/c4.py",
    "baselines/adam.py", "baselines/_common.py"))


def base_config(cfg: dict) -> dict:
    """The c4 pretraining run that makes the base of a fine-tuning config: same model, device and dtype, the
    profile's `base_seed` (so every run seed fine-tunes one base), and a digest of the code that trains it,
    so that the cached base (keyed by this config's hash) is rebuilt when that code changes."""
    prof = profiles.profile("c4", cfg["profile"])
    prof.update(model=cfg["model"], steps=cfg["base_steps"], seed=cfg["base_seed"],
                base_seed=cfg["base_seed"], dtype=cfg["dtype"])
    prof["lrs"] = {"default": cfg["base_lr"]}
    prof["mem_window"] = min(prof["mem_window"], prof["steps"] - 1)
    prof["warmup_steps"] = max(1, prof["steps"] // 10)
    from suites.train.models import run_fields

    adam = registry.method_defaults("adam")
    base = profiles.resolve("c4", cfg["profile"], prof, "adam", adam, cfg["device"])
    base.update(run_fields(base))
    base["purpose"] = "base"
    base["base_code"] = records.code_digest(BASE_CODE)
    return base


def _die_with_parent():
    """Child processes die with this one (Linux), so a killed sweep leaves no run behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Ask a run to stop as Ctrl-C would (it unwinds and exits quietly); kill it if it does not."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def worker_command(spec_path: str, world_size: int) -> list[str]:
    """The command of one run: the worker, or torchrun starting N of them (PyTorch's own launcher: one
    machine, a rendezvous on a free local port, the ranks' environment, and a failed rank stops the rest)."""
    if world_size == 1:
        return [sys.executable, "-m", "suites.worker", spec_path]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
            "-m", "suites.worker", spec_path]


def launch(spec: dict, extra_env: dict | None = None) -> int:
    """Run one spec in its own process (N under torchrun); returns its exit status. KeyboardInterrupt when
    it was interrupted."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="oasis-run-", delete=False) as f:
        json.dump(spec, f)
    world_size = spec["config"].get("world_size", 1)
    env = {**os.environ, **(extra_env or {})}
    if world_size > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning (threads: recipe)
    try:
        proc = subprocess.Popen(
            worker_command(f.name, world_size),
            cwd=records.REPO_ROOT, env=env,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )
        try:
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    finally:
        Path(f.name).unlink(missing_ok=True)
    if code in (cli.EXIT_INTERRUPTED, -signal.SIGINT):  # the run alone got the Ctrl-C
        raise KeyboardInterrupt
    return code


def ensure_base(cfg: dict) -> str:
    """Path of the pretrained base for a fine-tuning config; pretrains it (c4 suite, adam) the first time.
    Sweeps that need the same base wait for the one that is pretraining it."""
    from suites.train.sources import CACHE_DIR

    bcfg = base_config(cfg)
    home = CACHE_DIR / "bases" / records.config_hash(bcfg)
    lock = home.with_name(home.name + ".lock")
    with files.exclusive_lock(lock) as held:
        if held:
            return _pretrain_base(bcfg, home)
    print("waiting for another sweep that is pretraining the same base", file=sys.stderr)
    with files.exclusive_lock(lock, wait=True):
        return _pretrain_base(bcfg, home)


def _pretrain_base(bcfg: dict, home: Path) -> str:
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
    return records.make_record(cfg, status="error", error=why, started_at=records.now(), wall_s=0.0)


def run_config(cfg: dict, out: Path, env: dict | None = None) -> str:
    """Run one config under its lock (`env`: extra environment of its processes, e.g. its GPUs). Returns
    'ran', 'locked' (another sweep is running it now) or 'done' (another sweep finished it after this one
    planned)."""
    with records.run_lock(out, cfg) as held:
        if not held:
            return "locked"
        if records.has_ok_record(out, cfg):
            return "done"
        spec = {"config": cfg, "out_dir": str(out), "position": 1}
        path = out / f"{records.run_id(cfg)}.json"
        before = path.stat().st_mtime_ns if path.exists() else None
        try:
            if cfg.get("base_hash"):
                spec["base_dir"] = ensure_base(cfg)
            code = launch(spec, env)
            if not path.exists() or path.stat().st_mtime_ns == before:
                why = f"run process exited with code {code} before writing its record"
                records.write_record(failure_record(cfg, why), out)
        except RuntimeError as exc:
            records.write_record(failure_record(cfg, str(exc)), out)
    return "ran"
