"""Run a suite for several methods under one budget: `python -m suites.run gsm8k --methods all`.

Every run (one method × one point of a sweep) is its own process (`suites.worker`, which runs
`suites.launch.recipe`) and writes one JSON record under --out; this process only validates input, prepares
the pretrained base once, orchestrates, and prints a summary. A sweep that is interrupted and started again
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
import itertools
import shutil
import sys
from pathlib import Path

from suites.core import cli, files, profiles, records, registry
from suites.core.cli import UsageError
from suites.launch import launchers, runs, sweep

PROG = "python -m suites.run"
SUITES = ("gsm8k", "humaneval", "c4")  # suites.evaluate.tasks.SUITES, without importing the task modules
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
        "  suites/core/profiles.py; --set lr.METHOD=X), the method's own hyper-parameters "
        "(its DEFAULTS in\n"
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
            + "\nprofile keys (suites/core/profiles.py) and method hyper-parameters can be set with "
            "--set;\n"
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
    from suites.train.models import linear_shapes, model_config, weights_spec

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


def check_environment(args, configs: list[dict]) -> None:
    """Second pass, with the libraries: device, rank, data, base; fills in each config's device."""
    from suites.evaluate.tasks import get as get_suite
    from suites.train.sources import DataMissing

    device = _device(args.device, remote=args.launcher == "slurm")
    world = max(cfg["world_size"] for cfg in configs) if configs else 1
    if device == "cuda" and world > 1 and args.launcher != "slurm":
        import torch

        if world > torch.cuda.device_count():
            raise UsageError(f"{world} processes need {world} GPUs (one each); "
                             f"{torch.cuda.device_count()} visible")
    from suites.train.models import run_fields

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
                cfg["base_hash"] = records.config_hash(runs.base_config(cfg))
    except (DataMissing, ValueError) as exc:  # ModelUnavailable is a ValueError: one line, exit 2
        raise UsageError(str(exc)) from None


def plan(args) -> tuple[list[dict], str]:
    """Validate everything; the resolved configs and the suite's summary metrics (nothing is written)."""
    try:
        configs = check_arguments(args)
    except ValueError as exc:  # OutputError, ProfileError, an unknown method: the input, nothing else ran
        raise UsageError(str(exc)) from None
    check_environment(args, configs)
    from suites.evaluate.tasks import get as get_suite

    return configs, get_suite(args.suite).SUMMARY


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
    """The launcher of the command line (`suites.launch.launchers`); checks that --parallel fits the GPUs."""
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
    return sweep.sweep(configs, columns, Path(args.out), desc=f"{args.suite}/{args.profile}",
                       launcher=launcher)


def main(argv: list[str] | None = None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
