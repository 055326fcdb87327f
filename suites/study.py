"""The committed CPU study (v2), one command: `python -m suites.study`.

What it is for (issue 20): a study in which OASIS's mechanism is exercised. On c4 with llama-cpu (the
`study` profile of suites/core/profiles.py: batch 4 x 128 tokens, rank 32), every method trains for
STUDY_STEPS optimizer steps, the horizon at which adam ends at least 0.5 nats below the unigram reference
of its own training tokens (`metrics.unigram_eval_loss`, in every record). How the horizon was measured:
one adam run with the loss curve every 200 steps (`--set eval_every=200`), see the README. The records
carry the tracking diagnostic (suites.measure.tracking: captured variance, angle to the exact top-r
eigenbasis, net overlap with the initial basis, refreshes) at 6 steps.

Stages, in the order a process runs them (every run is one `suites.run` config; finished runs are skipped,
so an interrupted study resumes, and two processes into the same --out share the work, each run claimed
by a lock: start two on a 2-core machine):

  lr             the six methods at 0.5x, 1x and 2x their profile rate (`--lr-grid`), seed 0; a method
                 whose best rate is an edge of the rates tried gets its half or double, at most twice
                 (selection.beyond_the_edge; run by the main stage before it chooses). Each
                 method's rate is then chosen on `val_loss`, the loss on a validation slice of Wikipedia
                 (the tokens after the eval_loss tokens of the validation file: never trained on, never
                 reported as a result; `suites.core.selection`). oasis-frozen and oasis-notransport, ablations
                 of oasis, take oasis's chosen rate (RATE_FROM): they isolate the basis update and the
                 moment transport at the same step size.
  period-pca     pca with refresh_every 20 / 50 / 200, seed 0 (published: 200; the study's rows use 50 so
  period-galore  that >= 10 refreshes fall inside the horizon); galore likewise with update_proj_gap.
  rank           oasis and pca (its periodic counterpart) at rank 8 / 16 / 32 / 64 / 128, seed 0, 1x rate
                 (galore and lora left out of the 4-hour budget).
  subspace-lr    oasis at subspace_lr 0.001 / 0.01 / 0.1 / 1 (three decades), seed 0, 1x rate.
  main           the six methods plus oasis-frozen and oasis-notransport, each at its chosen rate, seeds
                 0, 1, 2 (seed 0 of the six is the lr stage's run); oasis, oasis-frozen and pca, the
                 comparisons that isolate the online basis, seeds 0-4. A process that reaches a method whose
                 lr runs another process still holds waits for them.

Budget: ablations run one seed (0) to fit the 2-core machine; every ablation's reference point is a run
of the lr stage (same config hash), so it costs nothing extra. `python -m suites.study --plan` lists the
stages with their run counts and the hours they take, from the median step time and per-run overhead
measured in existing records (--timings DIR); `--list` prints the suites.run commands.

What differs from the published constants (DESIGN §5): PCA's refresh period and GaLore's update_proj_gap
are 50 in the main rows (published 200, ablated); CompAct keeps its published 50; LDAdam keeps its betas
and rho; GaLore keeps eps 1e-6 and scale 0.25.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from suites import run
from suites.core import cli, profiles, records, selection
from suites.launch import sweep

PROG = "python -m suites.study"
SUITE, PROFILE = "c4", "study"
# the main stage's order: the comparisons the study is for first (oasis against adam, its frozen basis and
# periodic PCA), so that a study cut short by its budget still answers them
METHODS = "adam,oasis,oasis-frozen,pca,oasis-notransport,galore,ldadam,lora"
TUNED = "all"  # the methods with their own learning-rate ablation
RATE_FROM = {"oasis-frozen": "oasis", "oasis-notransport": "oasis"}  # ablations at their method's rate
MAIN_SEEDS = (0, 1, 2)
# the comparisons that isolate the method get two more seeds: with three, oasis - oasis-frozen and
# oasis - pca had 95% intervals of +-0.09 nats around differences of -0.06 and -0.08 (study v2, seeds 0-2);
# adam's comparison already excluded zero at three
CONFIRM_METHODS, CONFIRM_SEEDS = ("oasis", "oasis-frozen", "pca"), (0, 1, 2, 3, 4)
ABLATION_SEED = 0
WAIT_S = 30.0  # how often a process waiting for another's lr runs looks again


@dataclass
class Stage:
    name: str
    methods: str
    sweeps: list[str] = field(default_factory=list)
    lr_grid: bool = False


def _seed(*seeds) -> str:
    return "seed=" + ",".join(map(str, seeds))


STAGES = [
    Stage("lr", TUNED, [_seed(ABLATION_SEED)], lr_grid=True),
    Stage("period-pca", "pca", [_seed(ABLATION_SEED), "refresh_every=20,50,200"]),
    Stage("period-galore", "galore", [_seed(ABLATION_SEED), "update_proj_gap=20,50,200"]),
    Stage("rank", "oasis,pca", [_seed(ABLATION_SEED), "rank=8,16,32,64,128"]),
    Stage("subspace-lr", "oasis", [_seed(ABLATION_SEED), "subspace_lr=0.001,0.01,0.1,1.0"]),
]
MAIN = "main"
NAMES = [s.name for s in STAGES] + [MAIN]


def argv_of(methods: str, sweeps: list[str], out: str, sets: list[str] = (),
            lr_grid: bool = False) -> list[str]:
    return [SUITE, "--profile", PROFILE, "--methods", methods, *[a for s in sweeps for a in ("--sweep", s)],
            *[a for s in sets for a in ("--set", s)], *(["--lr-grid"] if lr_grid else []), "--out", out]


def configs_of(argv: list[str]) -> list[dict]:
    """The configs as a run records them (device, model source and tokenizer filled in): their hashes are
    the records' `config_hash`."""
    return run.plan(run.parser().parse_args(argv))[0]


def stage_configs(stage: Stage, out: str) -> list[dict]:
    return configs_of(argv_of(stage.methods, stage.sweeps, out, lr_grid=stage.lr_grid))


def methods() -> list[str]:
    from suites.core import registry

    return registry.resolve_methods(METHODS)


def seeds_of(method: str) -> tuple[int, ...]:
    return CONFIRM_SEEDS if method in CONFIRM_METHODS else MAIN_SEEDS


def main_argv(method: str, lr: float, out: str) -> list[str]:
    return argv_of(method, [_seed(*seeds_of(method))], out, sets=[f"lr={lr!r}"])


def lr_argv(method: str, lr: float, out: str) -> list[str]:
    """One lr-stage point as a suites.run command (the same config hash as the --lr-grid run at that rate)."""
    return argv_of(method, [_seed(ABLATION_SEED)], out, sets=[f"lr={lr!r}"])


def lr_records(method: str, out: str, given_up: frozenset = frozenset()
               ) -> tuple[dict[float, list[float]], list[dict]]:
    """(rate -> val_loss of its ok runs, the lr-stage configs of `method` with no record yet in `out`). The
    stage is the profile's grid, grown by one factor of 2 past a winner at its edge
    (selection.beyond_the_edge) once every rate before has a record. A config in `given_up` (hashes: this
    process ran it and it left no record) counts as finished without a value."""
    by_hash: dict[str, list[dict]] = {}
    for rec in records.load_records(out, recursive=False):
        by_hash.setdefault(rec["config_hash"], []).append(rec)
    configs = [c for c in stage_configs(STAGES[0], out) if c["method"] == method]
    grid = len(configs)
    while True:
        found: dict[float, list[float]] = {}
        missing = []
        for c in configs:
            recs = by_hash.get(records.config_hash(c))
            if not recs:
                if records.config_hash(c) in given_up:
                    found.setdefault(c["lr"], [])
                else:
                    missing.append(c)
                continue
            values = found.setdefault(c["lr"], [])
            values += [r["metrics"][selection.METRIC] for r in recs
                       if r["status"] == "ok" and selection.METRIC in r["metrics"]][-1:]
        if missing:
            return found, missing
        beyond = selection.beyond_the_edge(found, len(configs) - grid)
        if beyond is None:
            return found, []
        configs += configs_of(lr_argv(method, beyond, out))


# ------------------------------------------------------------------------------------------- plan


def measured_costs(timings: Path) -> tuple[dict[str, float], float, int]:
    """(median step time per method, median per-run overhead in seconds, records used) from the ok c4
    records of llama-cpu at 4 x 128 under `timings`: the step time is the record's median step time
    (speed.step_time_s), the overhead its wall time minus steps x step time (setup, memory window,
    evaluations)."""
    steps, overhead, used = {}, [], 0
    for rec in records.load_records(timings):
        c = rec.get("config") or {}
        if (rec.get("status") != "ok" or rec.get("suite") != SUITE or c.get("model") != "llama-cpu"
                or c.get("batch") != 4 or c.get("seq_len") != 128 or not rec.get("speed")):
            continue
        used += 1
        t = rec["speed"]["step_time_s"]
        steps.setdefault(rec["method"], []).append(t)
        steps.setdefault((rec["method"], c.get("rank")), []).append(t)
        overhead.append(max(0.0, rec["wall_s"] - c["steps"] * t))
    return ({m: statistics.median(v) for m, v in steps.items()},
            statistics.median(overhead) if overhead else 0.0, used)


def step_time(step_s: dict, cfg: dict, slowest: float) -> float:
    """The measured step time of a config: its method at its rank, else its method, else the slowest."""
    return step_s.get((cfg["method"], cfg["rank"]), step_s.get(cfg["method"], slowest))


def plan_rows(out: str) -> list[tuple[str, list[dict]]]:
    """(stage, its configs) with the main stage at each method's profile rate (its cost does not depend on
    the rate, and the chosen rate's seed-0 run is an lr-stage run whichever it is); configs of an earlier
    stage are not counted again."""
    seen, rows = set(), []
    for stage in STAGES:
        fresh = [c for c in stage_configs(stage, out) if records.config_hash(c) not in seen]
        seen |= {records.config_hash(c) for c in fresh}
        rows.append((stage.name, fresh))
    main = [c for m in methods() for c in configs_of(argv_of(m, [_seed(*seeds_of(m))], out))]
    rows.append((MAIN, [c for c in main if records.config_hash(c) not in seen]))
    return rows


def print_plan(out: str, timings: Path, processes: int) -> None:
    step_s, overhead_s, used = measured_costs(timings)
    if not step_s:
        raise cli.UsageError(f"--timings {timings}: no ok c4 record of llama-cpu at batch 4 x 128 to take "
                             "step times from; run one (python -m suites.run c4 --profile cpu ...) first")
    slowest = max(v for k, v in step_s.items() if isinstance(k, str))
    print(f"# study v2: c4, profile {PROFILE}, {profiles.STUDY_STEPS} steps of 4 x 128 tokens per run")
    print(f"# cost per run = steps x the median step time of its method at its rank (else of its method) + "
          f"{overhead_s:.0f} s overhead, from {used} record(s) under {timings}; a method without a record "
          f"costs the slowest one's {slowest:.3f} s/step")
    print(f"# {'stage':<14} {'runs':>5} {'steps':>8} {'hours (1 process)':>18}")
    total_runs = total_s = 0
    for name, cfgs in plan_rows(out):
        seconds = sum(c["steps"] * step_time(step_s, c, slowest) + overhead_s for c in cfgs)
        total_runs, total_s = total_runs + len(cfgs), total_s + seconds
        print(f"  {name:<14} {len(cfgs):>5} {sum(c['steps'] for c in cfgs):>8} {seconds / 3600:>18.2f}")
    print(f"  {'total':<14} {total_runs:>5} {'':>8} {total_s / 3600:>18.2f}")
    print(f"# {processes} processes: about {total_s / 3600 / processes:.2f} hours of wall time")


# ------------------------------------------------------------------------------------------- run


def parser() -> cli.Parser:
    p = cli.Parser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="the stages, as suites.run commands: python -m suites.study --list",
    )
    p.add_argument("--out", default="results/runs", help="folder for the run records (default: results/runs)")
    p.add_argument("--only", default=None,
                   help=f"comma list of stages to run (default: all: {', '.join(NAMES)})")
    p.add_argument("--list", action="store_true", help="print the stages' suites.run commands and exit")
    p.add_argument("--plan", action="store_true", help="print each stage's runs and estimated hours and exit")
    p.add_argument("--timings", default="results", type=Path,
                   help="records whose measured step times --plan uses (default: results)")
    p.add_argument("--processes", default=2, type=cli.positive_int,
                   help="processes the --plan wall-time estimate assumes (default: 2)")
    return p


def _chosen(names: list[str]) -> list[str]:
    unknown = sorted(set(names) - set(NAMES))
    if unknown or not names:
        raise cli.UsageError(f"--only: unknown stage {unknown[0] if unknown else '(none)'!r}; "
                             f"choose from {', '.join(NAMES)}")
    return names


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    chosen = _chosen(NAMES if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()])
    stages = [s for s in STAGES if s.name in chosen]
    if args.plan:
        print_plan(args.out, args.timings, args.processes)
        return 0
    if args.list:
        for s in stages:
            command = " ".join(argv_of(s.methods, s.sweeps, args.out, lr_grid=s.lr_grid))
            print(f"# {s.name}\npython -m suites.run {command}")
        if MAIN in chosen:
            print(f"# {MAIN}: each method at the rate its lr runs chose on {selection.METRIC}, e.g.\n"
                  f"python -m suites.run {' '.join(main_argv('adam', 1e-3, args.out))}")
        return 0
    # every stage is validated before the first run, so a bad input costs nothing
    planned = []
    for s in stages:
        configs, columns = run.plan(run.parser().parse_args(
            argv_of(s.methods, s.sweeps, args.out, lr_grid=s.lr_grid)))
        planned.append((s.name, configs, columns))
    print(f"study: {sum(len(c) for _, c, _ in planned)} runs in {len(planned)} stages"
          f"{' + main' if MAIN in chosen else ''} into {args.out}", file=sys.stderr)
    status = 0
    for name, configs, columns in planned:
        print(f"\n== {name} ==")
        code = sweep.sweep(configs, columns, Path(args.out), desc=name)
        if code == cli.EXIT_INTERRUPTED:
            return code
        status = max(status, code)
    if MAIN in chosen:
        status = max(status, _run_main(args.out))
    return status


def _run_main(out: str) -> int:
    """Each method at the rate chosen on its lr runs (the grid first grown past an edge winner), at
    seeds_of(method); waits for lr runs another process holds."""
    status, pending, given_up = 0, methods(), set()
    while pending:
        progressed = False
        for method in list(pending):
            owner = RATE_FROM.get(method, method)
            found, missing = lr_records(owner, out, frozenset(given_up))
            if missing and owner == method:
                for cfg in missing:  # grid points not run yet, or a rate past the edge
                    print(f"\n== lr: {method} at lr {cfg['lr']:g} ==")
                    configs, columns = run.plan(run.parser().parse_args(lr_argv(method, cfg["lr"], out)))
                    code = sweep.sweep(configs, columns, Path(out), desc=f"lr-{method}")
                    if code == cli.EXIT_INTERRUPTED:
                        return code
                before = {records.config_hash(c) for c in missing}
                found, missing = lr_records(owner, out, frozenset(given_up))
                newly = set()
                for cfg in missing:  # ran here and left no record (not held by another sweep): no value
                    with records.run_lock(out, cfg) as free:
                        if free:
                            newly.add(records.config_hash(cfg))
                if newly:  # reading the records and planning the stage again only when something changed
                    given_up |= newly
                    found, missing = lr_records(owner, out, frozenset(given_up))
                progressed |= {records.config_hash(c) for c in missing} != before  # not all held elsewhere
            if missing:
                continue
            pending.remove(method)
            progressed = True
            lr = selection.best_rate(found)
            if lr is None:
                print(f"main: {method} has no ok lr run with {selection.METRIC}; not run", file=sys.stderr)
                status = max(status, 1)
                continue
            print(f"\n== main: {method} at lr {lr:g} (best {selection.METRIC} of {len(found)} rates) ==")
            configs, columns = run.plan(run.parser().parse_args(main_argv(method, lr, out)))
            code = sweep.sweep(configs, columns, Path(out), desc=f"main-{method}")
            if code == cli.EXIT_INTERRUPTED:
                return code
            status = max(status, code)
        if pending and not progressed:
            print(f"main: waiting for the lr runs of {', '.join(pending)} (another process holds them)",
                  file=sys.stderr)
            time.sleep(WAIT_S)
    return status


def main(argv: list[str] | None = None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
