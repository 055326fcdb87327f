"""Run a suite for several methods under one budget: `python -m suites.run gsm8k --methods all`.

Every run (one method × one point of a sweep) is its own process (`suites.worker`, which runs
`suites.recipe`) and writes one JSON record under --out; this process only validates input, prepares the
pretrained base once, orchestrates, and prints a summary. A sweep that is interrupted and started again
skips every run whose config already has an `ok` record; two sweeps into the same --out never run the
same config twice (each run is claimed with a lock file under <out>/.locks/).

Input is checked in two passes, so that a typo is reported in well under a second: first everything that
needs no torch (suite, methods, profile, --set / --sweep keys and values, --out), then what needs the
libraries (device, rank against the model's layers, data files, a hub base).

Exit status: 0 all runs ok; 1 some run ended diverged/oom/error (its record says why); 2 bad input
(nothing written); 130 interrupted (finished runs are recorded).
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from suites import cli, files, launchers, profiles, records, registry
from suites.cli import UsageError

PROG = "python -m suites.run"
SUITES = ("gsm8k", "humaneval", "c4")  # suites.tasks.SUITES, without importing the task modules
EXIT_INTERRUPTED = cli.EXIT_INTERRUPTED
INTERRUPTED = "interrupted: finished runs are recorded; run the same command again to resume"
ENVIRONMENT = (
    ("OASIS_DATA_DIR", "folder of the offline data (default <repo>/../shared/data)"),
    ("OASIS_THREADS", "intra-op threads of each run (default: half the cores, at least 1)"),
    ("OASIS_NO_PROGRESS", "set (to anything): no progress bars, e.g. for logs and CI"),
    ("OASIS_DEBUG", "set: a failed run also prints its traceback, and lm-eval its own output"),
    ("HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE", "default 1 here; the paper profile "
     "needs the hub: set them to 0"),
)


def _what_differs() -> str:
    shared = profiles.profile("c4", "cpu")
    keys = [k for k in profiles.PER_METHOD_KEYS if k in ("betas", "eps")]
    constants = registry.published_constants(keys)
    own = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in kv.items()) for m, kv in constants.items())
    return (
        "what differs between methods:\n"
        "  Every method of a profile shares data order, steps, tokens, batch, sequence length, schedule,\n"
        "  rank and evaluation. Per method: the learning rate (the profile's table `lrs` in\n"
        "  suites/profiles.py; --set lr.METHOD=X), the method's own hyper-parameters (its DEFAULTS in\n"
        "  baselines/), and the published optimizer constants that replace the profile's shared\n"
        f"  {', '.join(f'{k}={shared[k]}' for k in keys)} (--set KEY.METHOD=X overrides them):\n"
        f"    {own}\n"
    )


def parser() -> argparse.ArgumentParser:
    env = "\n".join(f"  {name}\n      {what}" for name, what in ENVIRONMENT)
    p = cli.Parser(
        prog=PROG,
        description=(
            "Train and evaluate every method of a suite under identical budgets. Each run is its own\n"
            "process and writes one JSON record to --out; a restarted sweep skips runs that already\n"
            "have an ok record, and two sweeps into one --out never run the same config twice."
        ),
        epilog=(
            "examples:\n  python -m suites.run gsm8k --methods all\n"
            "  python -m suites.run c4 --methods adam,oasis --profile smoke\n"
            "  python -m suites.run gsm8k --methods oasis --sweep rank=8,16,32 --set steps=60\n\n"
            f"methods:\n  all = {', '.join(registry.MISSION_METHODS)}\n"
            f"  extras: {', '.join(registry.EXTRA_METHODS)}\n\n"
            + _what_differs()
            + "\nprofile keys (suites/profiles.py) and method hyper-parameters can be set with --set;\n"
            "'lr=X' sets every method's learning rate, 'lr.NAME=X' one method's.\n\n"
            f"environment:\n{env}\n\n"
            "exit status: 0 all runs ok, 1 some run diverged/oom/error, 2 bad input, 130 interrupted"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", help=" | ".join(SUITES))
    p.add_argument("--methods", default="all", help="'all' or a comma list (see methods below)")
    p.add_argument("--profile", default="cpu",
                   help="smoke (seconds, tests/CI) | cpu (minutes on a CPU) | study (c4: the committed "
                        "study v2, python -m suites.study) | gpu (gsm8k, humaneval: SmolLM2-135M on one "
                        "GPU, minutes per method) | paper (GPUs, hub models)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile key or method hyper-parameter (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one run per value (repeatable: the cartesian product)")
    p.add_argument("--lr-grid", action="store_true",
                   help="one run per point of the profile's learning-rate grid: each method's rate times "
                        "the profile's lr_grid factors (paper profiles: 0.5, 1, 2)")
    p.add_argument("--out", default="results", help="folder for the run records (default: results/)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--nproc", type=cli.positive_int, default=None, metavar="N",
                   help="run each run as N data-parallel processes (torchrun, DDP; gloo on CPU, NCCL on "
                        "CUDA, one GPU per process). The global batch stays the profile's: each process "
                        "takes batch/N rows of every micro-batch (batch must divide by N). Same as "
                        "--set world_size=N")
    p.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"),
                   help="with --nproc: ddp (DistributedDataParallel, default) | fsdp (FSDP2 fully_shard per "
                        "decoder layer and root; parameters, gradients and optimizer state sharded by rows)")
    p.add_argument("--parallel", type=cli.positive_int, default=1, metavar="K",
                   help="K runs at once on this machine; on GPUs each run gets its own devices "
                        "(world_size of them; K x world_size must be visible)")
    p.add_argument("--launcher", default="local", choices=launchers.LAUNCHERS,
                   help="local: runs on this machine (default) | slurm: one Slurm job per run through "
                        "submitit, records into the same --out (run the same command again to resume) | "
                        "submitit-local: submitit's local executor, the cluster code path on this machine")
    p.add_argument("--partition", default=None, help="Slurm partition (--launcher slurm)")
    p.add_argument("--time-min", type=cli.positive_int, default=240, metavar="MIN",
                   help="time limit of each job in minutes (--launcher slurm / submitit-local; default 240)")
    p.add_argument("--cpus-per-task", type=cli.positive_int, default=None, metavar="C",
                   help="CPU cores of each job (--launcher slurm / submitit-local; default: the cluster's)")
    return p


# ------------------------------------------------------------------------------------------- planning


def _method_key_witnesses() -> dict:
    """Every method hyper-parameter a --set may name, with a value that gives its type."""
    keys: dict = {}
    for name in registry.ALL_METHODS:
        for k, v in registry.method_defaults(name).items():
            keys.setdefault(k, v)
    return keys


def _sweep_axes(texts: list[str]) -> list[list[tuple[str, str]]]:
    axes = []
    for text in texts:
        key, values = profiles.parse_assignment(text, "--sweep")
        # values are comma-separated; ';' separates values that hold commas (betas=0.9,0.99;0.9,0.95)
        values = [v for v in values.split(";" if ";" in values else ",") if v.strip()]
        if not values:
            raise UsageError(f"--sweep {text}: no values")
        axes.append([(key, v) for v in values])
    return axes


def check_arguments(args) -> list[dict]:
    """First pass, no torch: every config of the sweep, resolved except for its device (None)."""
    files.check_output_dir(args.out)
    if args.suite not in SUITES:
        raise UsageError(f"unknown suite {args.suite!r}; choose from {', '.join(SUITES)}")
    methods = registry.resolve_methods(args.methods)
    prof = profiles.profile(args.suite, args.profile)
    method_keys = _method_key_witnesses()
    sets = [profiles.parse_assignment(s) for s in args.sets]
    factors = None
    if args.lr_grid:
        factors = prof.get("lr_grid")
        if not factors:
            raise UsageError(f"--lr-grid: profile {args.profile} of {args.suite} has no learning-rate grid "
                             "(the paper profiles have one)")
    configs = []
    for point in itertools.product(*_sweep_axes(args.sweep)):
        p = profiles.apply_overrides(prof, sets + list(point), method_keys)
        named = set(p.get("per_method", {})) | (set(p["lrs"]) - {"default"})
        if named - set(registry.ALL_METHODS):
            raise UsageError(f"unknown method {sorted(named - set(registry.ALL_METHODS))[0]!r} in --set "
                             f"KEY.METHOD; choose from {', '.join(registry.ALL_METHODS)}")
        for method in methods:
            # the device is known once torch is imported (second pass); its key keeps its place
            defaults = registry.method_defaults(method)
            cfg = profiles.resolve(args.suite, args.profile, p, method, defaults, None)
            if args.nproc is not None:
                cfg["world_size"] = args.nproc
            if cfg["world_size"] > 1:
                _check_data_parallel(cfg, args.strategy)
            elif args.strategy != "ddp":
                raise UsageError(f"--strategy {args.strategy} shards over several processes: add --nproc N")
            configs += [{**cfg, "lr": cfg["lr"] * f} for f in factors] if factors else [cfg]
    return configs


# settings whose optimizer updates parameters inside backward: DDP / FSDP2 would combine after the update
STEPS_IN_BACKWARD = {"layerwise": True, "embedding_update": "backward"}


def _check_data_parallel(cfg: dict, strategy: str) -> None:
    """A data-parallel config (world_size > 1): the batch splits evenly, nothing steps inside backward;
    the record names the strategy."""
    n = cfg["world_size"]
    if cfg["batch"] % n:
        raise UsageError(f"batch {cfg['batch']} does not split over {n} processes (each takes batch/N rows "
                         f"of every micro-batch); choose a batch divisible by {n} (--set batch=...)")
    for key, value in STEPS_IN_BACKWARD.items():
        if cfg.get(key) == value:
            raise UsageError(f"{cfg['method']} with {key}={value} updates parameters inside backward, before "
                             f"the ranks' gradients are combined: it cannot run with {n} processes")
    cfg["strategy"] = strategy


def _device(choice: str, remote: bool = False) -> str:
    """The runs' device. `remote` (Slurm jobs): the jobs' nodes decide, not this one; auto means CUDA."""
    if remote:
        return "cpu" if choice == "cpu" else "cuda"
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
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


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _check_hub_base(base: str) -> None:
    """A hub id or local folder as the base: a usage error when it is not in the cache offline or is not
    a valid id; any other failure (a corrupt config, a network error) is a real error and propagates."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base)
    except OSError as exc:
        causes = list(_causes(exc))
        if any(isinstance(c, LocalEntryNotFoundError) for c in causes):
            raise UsageError(
                f"base model {base} is not available offline (no hub access and not in the HF cache); "
                "the paper profile needs a machine with hub access: HF_HUB_OFFLINE=0 and "
                "`huggingface-cli login` for gated Llama weights"
            ) from None
        if any(isinstance(c, HFValidationError) for c in causes):
            raise UsageError(f"base {base!r} is neither a local model folder nor a hub id") from None
        raise


# the sources that determine a pretrained base's weights: the loop, data, model, c4 task and AdamW adapter
BASE_CODE = tuple(Path(__file__).resolve().parent.parent / p for p in (
    "suites/recipe.py", "suites/data.py", "suites/sources.py", "suites/models.py", "suites/tasks/c4.py",
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
    from suites.models import run_fields

    adam = registry.method_defaults("adam")
    base = profiles.resolve("c4", cfg["profile"], prof, "adam", adam, cfg["device"])
    base.update(run_fields(base))
    base["purpose"] = "base"
    base["base_code"] = records.code_digest(BASE_CODE)
    return base


def check_environment(args, configs: list[dict]) -> None:
    """Second pass, with the libraries: device, rank, data, base; fills in each config's device."""
    from suites.data import DataMissing
    from suites.tasks import get as get_suite

    device = _device(args.device, remote=args.launcher == "slurm")
    world = max(cfg["world_size"] for cfg in configs) if configs else 1
    if device == "cuda" and world > 1 and args.launcher != "slurm":
        import torch

        if world > torch.cuda.device_count():
            raise UsageError(f"{world} processes need {world} GPUs (one each); "
                             f"{torch.cuda.device_count()} visible")
    from suites.models import run_fields

    for cfg in configs:
        cfg["device"] = device
        if cfg["base"] not in ("random", "c4", "pretrained"):
            _check_hub_base(cfg["base"])  # a careful one-line error before the model spec is resolved
    suite = get_suite(args.suite)
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


def plan(args) -> tuple[list[dict], str]:
    """Validate everything; the resolved configs and the suite's summary metrics (nothing is written)."""
    try:
        configs = check_arguments(args)
    except ValueError as exc:  # OutputError, ProfileError, an unknown method: the input, nothing else ran
        raise UsageError(str(exc)) from None
    check_environment(args, configs)
    from suites.tasks import get as get_suite

    return configs, get_suite(args.suite).SUMMARY


# ------------------------------------------------------------------------------------------- running


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
    if code in (EXIT_INTERRUPTED, -signal.SIGINT):  # the run alone got the Ctrl-C
        raise KeyboardInterrupt
    return code


def ensure_base(cfg: dict) -> str:
    """Path of the pretrained base for a fine-tuning config; pretrains it (c4 suite, adam) the first time.
    Sweeps that need the same base wait for the one that is pretraining it."""
    from suites.data import CACHE_DIR

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


def summary(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The table printed after a sweep: peak memory, the suite's summary metrics, speed, wall time."""
    width = max(14, *(len(c) for c in columns))
    heads = " ".join(f"{c:>{width}}" for c in columns)
    lines = [f"{'method':<18} {'status':<9} {'peak MiB':>9} {heads} {'tokens/s':>9} {'wall s':>7}  run_id"]
    for rec in rows:
        mem = rec.get("memory") or {}
        peak = f"{mem['peak_bytes'] / 2**20:.1f}" if mem.get("peak_bytes") is not None else "-"
        values = []
        for column in columns:
            metric = (rec.get("metrics") or {}).get(column)
            values.append(f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
        speed = rec.get("speed") or {}
        tps = f"{speed['tokens_per_s']:.0f}" if speed.get("tokens_per_s") else "-"
        lines.append(
            f"{rec['method']:<18} {rec['status']:<9} {peak:>9} {' '.join(f'{v:>{width}}' for v in values)} "
            f"{tps:>9} {rec.get('wall_s') or 0:>7.1f}  {rec['run_id']}"
        )
        if rec.get("error"):
            lines.append(f"{'':<18} {rec['error'][:100]}")
    return "\n".join(lines)


def sweep(configs: list[dict], columns: tuple[str, ...], out: Path, desc: str, launcher=None) -> int:
    """Run every config that has no ok record yet (through `launcher`, default one after another here),
    then print the summary; the exit status."""
    from tqdm import tqdm

    launcher = launcher or launchers.Sequential()
    done = records.completed_hashes(out)
    todo = [c for c in configs if records.config_hash(c) not in done]
    if len(todo) < len(configs):
        print(
            f"resuming: {len(configs) - len(todo)} of {len(configs)} runs already have an ok record in {out}",
            file=sys.stderr,
        )
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=desc, unit="run", position=0,
               dynamic_ncols=True, disable=bool(os.environ.get("OASIS_NO_PROGRESS")))
    try:
        for cfg, outcome in launcher.run(todo, out):
            bar.set_postfix(method=cfg["method"], refresh=True)
            if outcome != "ran":
                why = "is running it" if outcome == "locked" else "finished it"
                bar.write(f"skipped {records.run_id(cfg)}: another sweep into {out} {why}", sys.stderr)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(("\n" if sys.stderr.isatty() else "") + INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()
    wanted = {records.config_hash(c) for c in configs}
    latest = {}
    for rec in records.load_records(out, recursive=False):
        if rec["config_hash"] in wanted:
            latest[rec["config_hash"]] = rec
    rows = [latest[records.config_hash(c)] for c in configs if records.config_hash(c) in latest]
    print(summary(rows, columns))
    print(f"records: {out}/ ({len(rows)} runs)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def check_launcher(args) -> None:
    """Options that belong to another launcher are a usage error, not silently ignored."""
    if args.launcher != "local" and args.parallel > 1:
        raise UsageError(f"--parallel runs on this machine; with --launcher {args.launcher} every run is its "
                         "own job already")
    if args.launcher != "slurm" and args.partition:
        raise UsageError("--partition is a Slurm option (--launcher slurm)")
    if args.launcher == "slurm" and not shutil.which("srun"):
        raise UsageError("--launcher slurm: no Slurm here (srun is not on PATH); run from a Slurm login "
                         "node, or try the same code path on this machine with --launcher submitit-local")


def make_launcher(args, configs: list[dict]):
    """The launcher of the command line (`suites.launchers`); checks that --parallel fits the GPUs."""
    if args.launcher == "local":
        if args.parallel == 1:
            return launchers.Sequential()
        devices = None
        if configs and configs[0]["device"] == "cuda":
            devices = launchers.visible_devices()
            need = args.parallel * max(cfg["world_size"] for cfg in configs)
            if need > len(devices):
                raise UsageError(f"--parallel {args.parallel} runs of {need // args.parallel} GPU(s) each "
                                 f"need {need} GPUs; {len(devices)} visible")
        return launchers.Parallel(args.parallel, devices)
    cluster = "slurm" if args.launcher == "slurm" else "local"
    return launchers.Submitit(cluster, Path(args.out) / ".submitit", timeout_min=args.time_min,
                              partition=args.partition, gpus=bool(configs) and configs[0]["device"] == "cuda",
                              cpus_per_task=args.cpus_per_task)


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    check_launcher(args)
    configs, columns = plan(args)
    launcher = make_launcher(args, configs)
    return sweep(configs, columns, Path(args.out), desc=f"{args.suite}/{args.profile}", launcher=launcher)


def main(argv: list[str] | None = None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
