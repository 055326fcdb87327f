"""Memory regression check: re-measure every method's peak on fixed configs and compare with a baseline.

    python -m suites.memcheck                                  # compare with results/memory/baseline.json
    python -m suites.memcheck --baseline PATH                  # another baseline file
    python -m suites.memcheck --update --reason "why"          # re-measure and rewrite the baseline

A peak may move neither way: one that grew by more than the tolerance is a regression, one that fell by
more than the tolerance means the meter or the code changed. Both fail. If the change is intended, record
it with `--update --reason "..."` (the reason, the date and the git commit go into the baseline's
`history`) and commit the baseline.

The baseline (JSON) holds
  tolerance   the relative change of a peak, either way, that fails the check (at most 0.01)
  configs     named measurement configs: keyword arguments of `suites.measure.memory.measure` plus `methods`;
              a deterministic CPU-tracked run of a smoke-size model and FakeTensor estimates at 1B/7B
  peaks       config name -> method -> peak bytes
  claims      ratios the project states publicly: {config, method, versus: [methods], max, target, note}:
              peak(method) divided by the lowest peak among `versus` must stay at or below `max` (the
              number the README states); `target` (optional) is the goal the project works towards and is
              printed next to it, a claim whose target is met asks to be tightened
  history     one entry per `--update`: {date, commit, reason, changed}

Exit status: 0 every peak within tolerance and every claim holds; 1 a peak moved beyond tolerance, a peak
is missing from the baseline, or a claim is broken; 2 usage error (unreadable or malformed baseline, a
baseline `--update` cannot write, `--update` without `--reason`). `--update` keeps configs, tolerance,
claims and history, replaces the peaks and appends to the history; it exits 1 if a claim does not hold.

The configs are measured in a pool of `--jobs` processes (default: one per core, at most the number of
measurements); every measurement is deterministic, so the pool changes the wall time, not the bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from suites.core import regression
from suites.core.cli import Parser, UsageError, cli_main
from suites.core.files import write_json
from suites.core.records import REPO_ROOT

PROG = "python -m suites.memcheck"
REPO = REPO_ROOT
DEFAULT_BASELINE = REPO / "results" / "memory" / "baseline.json"
MAX_TOLERANCE = 0.01
MEASURE_KEYS = ("model", "kind", "batch", "seq", "rank", "dtype", "checkpointing", "attn", "loss",
                "loss_chunk", "lean_blocks", "window", "overrides", "kernel_policy")
CLAIM_KEYS = ("config", "method", "versus", "max", "target", "note")
MIB = 2**20


def load_baseline(path: Path) -> dict:
    """The baseline at `path`, checked for shape; UsageError (one line) when it is not usable."""
    data = regression.load(path, MAX_TOLERANCE)
    for name, cfg in data["configs"].items():
        if not isinstance(cfg, dict):
            raise UsageError(f"baseline {path}: config {name!r} is not an object")
        unknown = set(cfg) - set(MEASURE_KEYS) - {"methods"}
        if unknown or not cfg.get("methods") or "model" not in cfg:
            raise UsageError(f"baseline {path}: config {name!r} needs model and methods "
                             f"and only keys of {', '.join(MEASURE_KEYS)}")
    peaks = data.setdefault("peaks", {})
    if not isinstance(peaks, dict) or not all(isinstance(methods, dict) and all(
            isinstance(b, int) and b > 0 for b in methods.values()) for methods in peaks.values()):
        raise UsageError(f"baseline {path}: peaks must map config -> method -> positive bytes")
    for claim in data.setdefault("claims", []):
        if not _claim_is_well_formed(claim, data["configs"]):
            raise UsageError(f"baseline {path}: malformed claim {claim!r} (keys {', '.join(CLAIM_KEYS)}; "
                             "config one of the configs, method and versus among its methods, max > 0)")
    regression.load_history(data, path)
    return data


def _claim_is_well_formed(claim, configs: dict) -> bool:
    if not isinstance(claim, dict) or set(claim) - set(CLAIM_KEYS) or claim.get("config") not in configs:
        return False
    methods = configs[claim["config"]]["methods"]
    versus = claim.get("versus")
    numbers = [claim.get("max"), claim.get("target", 1.0)]
    return (claim.get("method") in methods and isinstance(versus, list) and bool(versus)
            and set(versus) <= set(methods)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in numbers))


def check_configs(configs: dict) -> None:
    """Reject, before minutes of measuring, a config whose model or method the suite does not know."""
    from suites.core.registry import method_defaults
    from suites.measure.memory import KINDS, load_config

    for name, cfg in configs.items():
        try:
            load_config(cfg["model"])
            for method in cfg["methods"]:
                method_defaults(method)
        except ValueError as exc:
            raise UsageError(f"config {name!r}: {exc}") from None
        if cfg.get("kind", "estimate") not in KINDS:
            raise UsageError(f"config {name!r}: kind must be one of {', '.join(KINDS)}, got {cfg['kind']!r}")


# -- measuring ---------------------------------------------------------------------------------------------

def measure_one(task: tuple[str, dict, str]) -> tuple[str, str, int, float, float]:
    """(config name, method, peak bytes, wall seconds, CPU seconds) of one measurement; what every pool
    worker runs."""
    from suites.measure.memory import measure

    name, cfg, method = task
    kwargs = {k: v for k, v in cfg.items() if k in MEASURE_KEYS}
    t0, cpu0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        # peft asks transformers for `is_gradient_checkpointing`, deprecated in transformers 5 (FutureWarning)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        try:
            peak = measure(kwargs.pop("model"), method, **kwargs)["peak_bytes"]
        except ValueError as exc:  # a setting the registry or the model loader rejects
            raise ValueError(f"config {name!r}, method {method!r}: {exc}") from None
    return name, method, peak, time.perf_counter() - t0, time.process_time() - cpu0


def _init_worker() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops them (no traceback from every worker), and run
    one intra-op thread each: the pool already keeps every core busy."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _expected_cost(cfg: dict, peak: int | None) -> int:
    """Longest first keeps the pool busy to the end: an estimate costs about its model's size (its peak)."""
    return (peak or 0) if cfg.get("kind", "estimate") == "estimate" else 0


def measure_all(configs: dict, log=print, jobs: int = 1, baseline_peaks: dict | None = None) -> dict:
    """config -> method -> peak bytes of every (config, method); `jobs` > 1 measures in a process pool.

    Raises ValueError (naming config and method) for a setting the registry or the model loader rejects."""
    baseline_peaks = baseline_peaks or {}
    tasks = [(name, cfg, method) for name, cfg in configs.items() for method in cfg["methods"]]
    results: dict[tuple[str, str], int] = {}

    def done(i, name, method, peak, seconds, cpu_seconds):
        results[name, method] = peak
        log(f"  [{i:>2}/{len(tasks)}] {name}/{method}: {peak / MIB:.1f} MiB "
            f"({seconds:.1f} s, CPU {cpu_seconds:.1f} s)")

    if jobs <= 1:
        for i, task in enumerate(tasks, 1):
            done(i, *measure_one(task))
    else:
        import multiprocessing

        tasks.sort(key=lambda t: -_expected_cost(t[1], baseline_peaks.get(t[0], {}).get(t[2])))
        # forkserver: workers fork from a clean server process that has imported torch and the methods once
        # (not from this process, and without paying the imports once per worker as spawn would)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["suites.measure.memory", "suites.core.registry", "transformers",
                                        "peft"])
        # leaving the `with` terminates the workers, also on an error or Ctrl-C
        with context.Pool(jobs, initializer=_init_worker) as pool:
            for i, result in enumerate(pool.imap_unordered(measure_one, tasks), 1):
                done(i, *result)
    return {name: {m: results[name, m] for m in cfg["methods"]} for name, cfg in configs.items()}


# -- comparing ---------------------------------------------------------------------------------------------

@dataclass
class Row:
    config: str
    method: str
    old: int | None
    new: int
    verdict: str  # ok | GREW | FELL | NEW

    @property
    def change(self) -> float | None:
        return None if self.old is None else (self.new - self.old) / self.old

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"


def compare(baseline: dict, peaks: dict) -> list[Row]:
    """One row per measured peak: within tolerance (ok), grown or fallen beyond it, or not in the baseline."""
    tol = baseline["tolerance"]
    rows = []
    for name, methods in peaks.items():
        for method, new in methods.items():
            old = baseline["peaks"].get(name, {}).get(method)
            if old is None:
                verdict = "NEW"
            else:
                change = (new - old) / old
                verdict = "GREW" if change > tol else "FELL" if change < -tol else "ok"
            rows.append(Row(name, method, old, new, verdict))
    return rows


@dataclass
class ClaimCheck:
    claim: dict
    ratio: float | None     # None: a peak it needs was not measured
    best: str | None        # the method of `versus` with the lowest peak

    @property
    def holds(self) -> bool:
        return self.ratio is not None and self.ratio <= self.claim["max"]

    @property
    def target_met(self) -> bool | None:
        target = self.claim.get("target")
        return None if target is None or self.ratio is None else self.ratio <= target


def check_claims(claims: list, peaks: dict) -> list[ClaimCheck]:
    checks = []
    for claim in claims:
        cfg = peaks.get(claim["config"], {})
        if not all(m in cfg for m in (claim["method"], *claim["versus"])):
            checks.append(ClaimCheck(claim, None, None))
            continue
        best = min(claim["versus"], key=lambda m: cfg[m])
        checks.append(ClaimCheck(claim, cfg[claim["method"]] / cfg[best], best))
    return checks


# -- printing ----------------------------------------------------------------------------------------------

def format_rows(rows: list[Row]) -> str:
    lines = [(r.config, r.method, "-" if r.old is None else f"{r.old / MIB:.1f}", f"{r.new / MIB:.1f}",
              "-" if r.change is None else f"{r.change:+.2%}", r.verdict) for r in rows]
    header = ("config", "method", "baseline MiB", "measured MiB", "change", "verdict")
    return regression.table(header, lines, left=2)


def format_claims(checks: list[ClaimCheck]) -> str:
    lines = []
    for c in checks:
        claim = c.claim
        versus = claim["versus"][0] if len(claim["versus"]) == 1 else \
            f"{c.best or '?'} (lowest of {', '.join(claim['versus'])})"
        target = claim.get("target")
        if c.ratio is None:
            verdict = "BROKEN: a peak it needs was not measured"
        elif not c.holds:
            verdict = "BROKEN"
        elif c.target_met is False:
            verdict = "holds; target not met yet"
        elif c.target_met and target < claim["max"]:
            verdict = f"holds; target met: tighten max to {target:.2f}"
        else:
            verdict = "holds"
        lines.append((claim["config"], f"{claim['method']} / {versus}",
                      "-" if c.ratio is None else f"{c.ratio:.3f}", f"<= {claim['max']:.2f}",
                      "-" if target is None else f"<= {target:.2f}", verdict))
    header = ("claim config", "ratio", "measured", "claimed", "target", "verdict")
    return regression.table(header, lines, left=2)


# -- updating ----------------------------------------------------------------------------------------------

def updated_baseline(baseline: dict, peaks: dict, reason: str) -> dict:
    changed = {f"{name}/{method}": [baseline["peaks"].get(name, {}).get(method), new]
               for name, methods in peaks.items() for method, new in methods.items()
               if baseline["peaks"].get(name, {}).get(method) != new}
    entry = regression.history_entry(reason, changed)
    return {**baseline, "peaks": peaks, "history": [*baseline["history"], entry]}


# -- command line ------------------------------------------------------------------------------------------

def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regression.add_arguments(p, DEFAULT_BASELINE, "peaks",
                           "re-measure and rewrite the baseline's peaks (configs, tolerance, claims kept)")
    p.add_argument("--jobs", type=int, default=_usable_cores(),
                   help="measurements in parallel, one process each (default: the usable cores)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the verdict")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    regression.check_flags(args, "peaks")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    base = load_baseline(args.baseline)
    if args.update:
        regression.check_writable(args.baseline)
    check_configs(base["configs"])
    log = regression.logger(args.quiet)

    t0 = time.perf_counter()
    n_tasks = sum(len(cfg["methods"]) for cfg in base["configs"].values())
    try:
        peaks = measure_all(base["configs"], log, jobs=min(args.jobs, n_tasks),
                            baseline_peaks=base["peaks"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    seconds = time.perf_counter() - t0
    rows = compare(base, peaks)
    claims = check_claims(base["claims"], peaks)
    broken = [c for c in claims if not c.holds]

    if args.update:
        write_json(args.baseline, updated_baseline(base, peaks, args.reason.strip()))
        print(format_rows(rows))
        if claims:
            print("\n" + format_claims(claims))
        changed = sum(r.old != r.new for r in rows)
        print(f"\nbaseline {args.baseline} updated: {changed} of {len(rows)} peaks changed, "
              f"{len(broken)} broken claims ({seconds:.0f} s)")
        return 1 if broken else 0

    shown = rows if not args.quiet else [r for r in rows if r.failed]
    if shown:
        print(format_rows(shown))
    if claims and (broken or not args.quiet):
        print("\n" + format_claims(claims if not args.quiet else broken))
    tol = base["tolerance"]
    moved = any(r.failed for r in rows)
    if moved or broken:
        problems = regression.problems(rows, tol, (broken, "broken claims"))
        print(f"\nmemcheck FAIL: {', '.join(problems)} of {len(rows)} peaks, {len(claims)} claims "
              f"({seconds:.0f} s)")
        if moved:
            print("A peak that moved means the meter or the code changed (one that grew is a regression).\n"
                  + regression.update_hint(PROG))
        return 1
    held = f", {len(claims)} claims hold" if claims else ""
    print(f"\nmemcheck OK: {len(rows)} peaks within {tol:.0%} of the baseline{held} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(PROG, main))
