"""The committed CPU study, one command: `python -m suites.study`.

The study is a list of `suites.run` sweeps on the `cpu` profile (STUDY below): the six methods plus the
OASIS ablations `oasis-frozen` (no basis learning) and `oasis-notransport` (no moment transport) on c4 and
gsm8k, and the rank and subspace-learning-rate ablations, every point at the same seeds 0, 1 and 2 (the
base model's seed stays the profile's `base_seed`). Every run writes its own record; a finished run is
skipped, so an interrupted study resumes where it stopped, and two `suites.study` processes into the same
--out share the work (each run is claimed with a lock), which is how to use both cores of a 2-core machine.
All sweeps are checked before the first run starts. `python -m reports.build` turns the records into the
tables and figures.

On the 2-core reference machine the whole study (156 runs) takes about 2 hours in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from suites import cli, run

PROG = "python -m suites.study"
SEEDS = "seed=0,1,2"
# (name, suite, methods, sweeps): each entry is `python -m suites.run SUITE --profile cpu --methods METHODS
# --sweep SEEDS --sweep ...`. The reference points (rank 32, subspace_lr 0.1, the profile's values) are the
# main rows' runs, so listing them costs nothing.
STUDY = [
    (f"{suite}-{name}", suite, methods, sweeps)
    for suite in ("c4", "gsm8k")
    for name, methods, sweeps in (
        ("main", "all,oasis-frozen,oasis-notransport", []),
        ("rank", "oasis,pca,galore,lora", ["rank=8,32,128"]),
        ("subspace-lr", "oasis", ["subspace_lr=0.03,0.1,0.3"]),
    )
]


def argv_of(suite: str, methods: str, sweeps: list[str], out: str) -> list[str]:
    sweep_args = [a for s in [SEEDS, *sweeps] for a in ("--sweep", s)]
    return [suite, "--profile", "cpu", "--methods", methods, *sweep_args, "--out", out]


def parser() -> cli.Parser:
    p = cli.Parser(
        prog=PROG,
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="the sweeps, as suites.run commands: python -m suites.study --list",
    )
    p.add_argument("--out", default="results/runs", help="folder for the run records (default: results/runs)")
    p.add_argument("--only", default=None, help="comma list of sweep names to run (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="print the study's suites.run commands and exit")
    return p


def _main(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    names = [name for name, *_ in STUDY]
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        raise cli.UsageError(f"--only: unknown sweep {unknown[0] if unknown else '(none)'!r}; "
                             f"choose from {', '.join(names)}")
    entries = [e for e in STUDY if e[0] in chosen]
    if args.list:
        for name, suite, methods, sweeps in entries:
            print(f"# {name}\npython -m suites.run {' '.join(argv_of(suite, methods, sweeps, args.out))}")
        return 0
    # every sweep is validated before the first run, so a bad input costs nothing
    planned = []
    for name, suite, methods, sweeps in entries:
        configs, columns = run.plan(run.parser().parse_args(argv_of(suite, methods, sweeps, args.out)))
        planned.append((name, configs, columns))
    print(f"study: {sum(len(c) for _, c, _ in planned)} runs in {len(planned)} sweeps into {args.out}",
          file=sys.stderr)
    status = 0
    for name, configs, columns in planned:
        print(f"\n== {name} ==")
        code = run.sweep(configs, columns, Path(args.out), desc=name)
        if code == cli.EXIT_INTERRUPTED:
            return code
        status = max(status, code)
    return status


def main(argv: list[str] | None = None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
