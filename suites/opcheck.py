"""Op-count regression check: re-count every method's ops and host syncs per step, compare with a baseline.

    python -m suites.opcheck                           # compare with results/speed/opcheck-baseline.json
    python -m suites.opcheck --baseline PATH           # another baseline file
    python -m suites.opcheck --update --reason "why"   # re-count and rewrite the baseline

The counts come from `suites.measure.speed.count_method` (FakeTensorMode, deterministic: the same code gives
the same
counts on any machine). A count that grew by more than the tolerance (2%) is a regression; one that fell by
more than it means the code got faster or the counter changed: both fail until the baseline is updated with
`--update --reason "..."` (the reason, the date, the git commit and every changed count go into the
baseline's `history`), and the baseline is committed. A count of 0 (host syncs) fails on any growth.

The baseline (JSON) holds
  tolerance   the relative change of a count, either way, that fails the check (at most 0.05)
  configs     named count configs: keyword arguments of `suites.measure.speed.count_method` (model, batch,
  seq, rank, dtype, attn) plus `methods`; small shapes, so the check costs CI well under two minutes
  counts      config name -> method -> {ops, refresh_ops, syncs, refresh_syncs} (refresh_*: null for a
              method without a period; see `suites.speed`)
  history     one entry per `--update`: {date, commit, reason, changed}

Exit status: 0 every count within tolerance; 1 a count moved beyond tolerance or is not in the baseline;
2 usage error (unreadable or malformed baseline, an unknown model or method in it, a baseline `--update`
cannot write, `--update` without `--reason`, `--reason` without `--update`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from suites.core import records, regression
from suites.core.cli import Parser, UsageError, cli_main
from suites.core.files import write_json

PROG = "python -m suites.opcheck"
REPO = records.REPO_ROOT
DEFAULT_BASELINE = REPO / "results" / "speed" / "opcheck-baseline.json"
MAX_TOLERANCE = 0.05
COUNT_KEYS = ("model", "batch", "seq", "rank", "dtype", "attn")
METRICS = ("ops", "refresh_ops", "syncs", "refresh_syncs")


def load_baseline(path: Path) -> dict:
    """The baseline at `path`, checked for shape; UsageError (one line) when it is not usable."""
    data = regression.load(path, MAX_TOLERANCE, nonempty=True)
    for name, cfg in data["configs"].items():
        if not isinstance(cfg, dict) or set(cfg) - {*COUNT_KEYS, "methods"} or not cfg.get("methods") \
                or not all(k in cfg for k in ("model", "batch", "seq", "rank")):
            raise UsageError(f"baseline {path}: config {name!r} needs model, batch, seq, rank and methods, "
                             f"and only keys of {', '.join(COUNT_KEYS)}, methods")
    counts = data.setdefault("counts", {})
    if not isinstance(counts, dict) or not all(
            isinstance(methods, dict) and all(isinstance(m, dict) and all(
                v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in m.values())
                for m in methods.values()) for methods in counts.values()):
        raise UsageError(f"baseline {path}: counts must map config -> method -> metric -> count >= 0 or null")
    regression.load_history(data, path)
    return data


def check_configs(configs: dict) -> None:
    """Reject, before counting, a config whose model or method the suite does not know."""
    from suites.core.registry import method_defaults
    from suites.measure.memory import load_config

    for name, cfg in configs.items():
        try:
            load_config(cfg["model"])
            for method in cfg["methods"]:
                method_defaults(method)
        except ValueError as exc:
            raise UsageError(f"config {name!r}: {exc}") from None


def count_all(configs: dict, log=print) -> dict:
    """config -> method -> {ops, refresh_ops, syncs, refresh_syncs}."""
    from suites.measure.speed import count_method

    out: dict = {}
    for name, cfg in configs.items():
        kwargs = {k: v for k, v in cfg.items() if k in COUNT_KEYS and k != "model"}
        for method in cfg["methods"]:
            row = count_method(cfg["model"], method, **kwargs)
            refresh = row["refresh"]
            out.setdefault(name, {})[method] = {
                "ops": row["step"]["ops"], "refresh_ops": refresh["ops"] if refresh else None,
                "syncs": row["step"]["syncs"], "refresh_syncs": refresh["syncs"] if refresh else None}
            log(f"  {name}/{method}: {out[name][method]} ({row['count_s']} s)")
    return out


@dataclass
class Row:
    config: str
    method: str
    metric: str
    old: int | None
    new: int | None
    verdict: str  # ok | GREW | FELL | NEW

    @property
    def change(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        if self.old == 0:
            return 0.0 if self.new == 0 else float("inf")
        return (self.new - self.old) / self.old

    @property
    def failed(self) -> bool:
        return self.verdict != "ok"


def compare(baseline: dict, counts: dict) -> list[Row]:
    """One row per counted metric: within tolerance (ok), grown or fallen beyond it, or not in the
    baseline."""
    tol = baseline["tolerance"]
    rows = []
    for name, methods in counts.items():
        for method, metrics in methods.items():
            old_metrics = baseline["counts"].get(name, {}).get(method)
            for metric in METRICS:
                new = metrics.get(metric)
                if old_metrics is None or metric not in old_metrics:
                    rows.append(Row(name, method, metric, None, new, "NEW"))
                    continue
                old = old_metrics[metric]
                row = Row(name, method, metric, old, new, "ok")
                if (old is None) != (new is None):
                    row.verdict = "GREW" if old is None else "FELL"
                elif row.change is not None:
                    row.verdict = "GREW" if row.change > tol else "FELL" if row.change < -tol else "ok"
                rows.append(row)
    return rows


def format_rows(rows: list[Row]) -> str:
    def num(v):
        return "-" if v is None else f"{v:,}"

    def pct(c):
        return "-" if c is None else "new" if c == float("inf") else f"{c:+.2%}"
    lines = [(r.config, r.method, r.metric, num(r.old), num(r.new), pct(r.change), r.verdict) for r in rows]
    header = ("config", "method", "metric", "baseline", "counted", "change", "verdict")
    return regression.table(header, lines, left=3)


def updated_baseline(baseline: dict, counts: dict, reason: str) -> dict:
    changed = {f"{name}/{method}/{metric}": [baseline["counts"].get(name, {}).get(method, {}).get(metric),
                                             value]
               for name, methods in counts.items() for method, metrics in methods.items()
               for metric, value in metrics.items()
               if baseline["counts"].get(name, {}).get(method, {}).get(metric, "absent") != value}
    entry = regression.history_entry(reason, changed)
    return {**baseline, "counts": counts, "history": [*baseline["history"], entry]}


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    regression.add_arguments(p, DEFAULT_BASELINE, "counts", "re-count and rewrite the baseline's counts")
    p.add_argument("--quiet", action="store_true", help="print only problems and the verdict")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    regression.check_flags(args, "counts")
    baseline = load_baseline(args.baseline)
    if args.update:
        regression.check_writable(args.baseline)
    check_configs(baseline["configs"])
    log = regression.logger(args.quiet)

    t0 = time.perf_counter()
    counts = count_all(baseline["configs"], log)
    seconds = time.perf_counter() - t0
    rows = compare(baseline, counts)
    if args.update:
        write_json(args.baseline, updated_baseline(baseline, counts, args.reason.strip()))
        print(format_rows(rows))
        changed = sum(r.old != r.new for r in rows)
        print(f"\nbaseline {args.baseline} updated: {changed} of {len(rows)} counts changed "
              f"({seconds:.0f} s)")
        return 0
    shown = rows if not args.quiet else [r for r in rows if r.failed]
    if shown:
        print(format_rows(shown))
    tol = baseline["tolerance"]
    problems = regression.problems(rows, tol)
    if problems:
        print(f"\nopcheck FAIL: {', '.join(problems)} of {len(rows)} counts ({seconds:.0f} s)")
        print("A count that grew is a regression (more kernels or host syncs per step); one that fell means "
              "the code got leaner or the counter changed.\n" + regression.update_hint(PROG))
        return 1
    print(f"\nopcheck OK: {len(rows)} counts within {tol:.0%} of the baseline ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(PROG, main))
