"""Turn run records into the paper's tables and figures.

    python -m reports.build [--results DIR] [--out DIR]

Reads every JSON file under --results (recursively): run records (DESIGN §3.4) and memory-estimate files
written by `python -m suites.memory --json` (conventionally under results/memory/). Writes under --out:

  table1_main_<suite>_<profile>   main table: per method at its reference config, peak memory (+ source),
                                  metrics, tokens/s, memory ratio to adam, published numbers where they match
  runs_<suite>_<profile>          every configuration that was run (seeds pooled as mean ± std)
  published_<suite>               the published reference numbers with citations (DESIGN §7)
  table2_memory_breakdown, table_memory_estimate, table3_rank_ablation_*, table4_subspace_lr_*
  fig2_memory_breakdown           stacked bars params/grads/optimizer/activations/other
  fig3_rank_ablation_*            metric and peak memory vs rank
  fig4_subspace_lr_*              metric vs subspace learning rate (log x), stable range shaded
  fig5_loss_curves_*              training/validation loss vs step: oasis, pca, adam
  fig6_subspace_drift_*           per-step basis drift: oasis (continuous) vs pca (refresh jumps)
  MISSING.md                      what could not be built and why, bad/partial records
  INDEX.md                        the list of artefacts of this build

Tables are Markdown + LaTeX (booktabs) + CSV; figures PNG + PDF. No number is recomputed: every value
comes from a record (unit conversion, mean ± std over seeds and ratios of two recorded values only).
Same records in, same tables out (no timestamps); a malformed record is skipped with a warning.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from reports import figures
from reports.load import REFERENCE_KEYS, Loaded, group_runs, load, reference_groups
from reports.tables import (
    breakdown_table,
    estimate_tables,
    main_tables,
    published_tables,
    sweep_lines,
    sweep_table,
)
from suites.cli import Parser, UsageError, cli_main
from suites.files import OutputError, atomic_write, check_output_dir

PROG = "python -m reports.build"
SUITES = ("gsm8k", "humaneval", "c4")
MISSION_METHODS = ("adam", "lora", "galore", "ldadam", "pca", "oasis")
WANT_RANKS = (8, 16, 32, 64, 128)
WANT_LR_DECADES = 5


class NothingToBuild(ValueError):
    """The results folder holds no run record and no memory estimate (nothing is written)."""


def build(results: Path, out: Path, log=print, warn=None) -> dict:
    """Build every artefact the records allow; returns {"written", "missing", "skipped"} lists."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    loaded = load(results)
    if not loaded.runs and not loaded.estimates:
        bad = f" ({len(loaded.skipped)} malformed file(s) skipped)" if loaded.skipped else ""
        raise NothingToBuild(f"no run records or memory-estimate files under {results}{bad}; "
                             "run `python -m suites.run ...` or `python -m suites.memory ... --json` first")
    for path, why in loaded.skipped:
        warn(f"warning: skipped {path}: {why}")
    groups = group_runs(loaded.runs)
    out.mkdir(parents=True, exist_ok=True)
    written, missing = [], []

    for t in main_tables(groups) + published_tables({g.suite for g in groups}):
        written += t.write(out)
    bt = breakdown_table(groups)
    if bt:
        written += bt.write(out)
    for t in estimate_tables(loaded.estimates):
        written += t.write(out)
    written += figures.memory_breakdown(groups, loaded.estimates, out)

    suite_profiles = sorted({(g.suite, g.profile) for g in groups})
    for _, paths in sorted(figures.rank_ablation(groups, out).items()):
        written += paths
    for _, paths in sorted(figures.subspace_lr_ablation(groups, out).items()):
        written += paths
    for key, stem, title in (("rank", "table3_rank_ablation", "Rank ablation"),
                             ("subspace_lr", "table4_subspace_lr", "Subspace learning-rate ablation")):
        for suite, profile in suite_profiles:
            gs = [g for g in groups if (g.suite, g.profile) == (suite, profile)]
            lines = sweep_lines(gs, key)
            if lines:
                metrics = figures.panel_metrics([g for _, pts in lines for g in pts])
                written += sweep_table(f"{stem}_{suite}_{profile}", f"{title}: {suite} ({profile} profile)",
                                       lines, key, metrics).write(out)
    curves = figures.loss_curves(groups, out)
    drift = figures.subspace_drift(groups, out)
    for d in (curves, drift):
        for _, paths in sorted(d.items()):
            written += paths

    missing = find_missing(loaded, groups, out, written)
    atomic_write(out / "MISSING.md", render_missing(missing))
    written.append(out / "MISSING.md")
    _write_index(out, written)
    for line in missing:
        log(f"missing: {line}")
    log(f"wrote {len(written)} files to {out}")
    return {"written": written, "missing": missing, "skipped": loaded.skipped}


def find_missing(loaded: Loaded, groups, out: Path, written) -> list[str]:
    names = {p.name for p in written}
    miss = [f"skipped `{p}`: {why}" for p, why in loaded.skipped]
    miss += [f"`{p}` superseded by `{k}` (same config_hash; the later/ok record is used)"
             for p, k in loaded.superseded]
    for r in loaded.runs:
        if not r.ok:
            err = str(r.rec.get("error") or "").strip().splitlines()
            miss.append(f"`{r.path}` ({r.method}, {r.suite}/{r.profile}) status {r.status}"
                        + (f": {err[0][:160]}" if err else ""))
    present = sorted({(g.suite, g.profile) for g in groups})
    for suite in SUITES:
        if not any(s == suite for s, _ in present):
            miss.append(f"no run records for suite {suite}")
    for suite, profile in present:
        gs = [g for g in groups if (g.suite, g.profile) == (suite, profile)]
        where = f"{suite}/{profile}"
        for m in MISSION_METHODS:
            if not any(g.method == m and g.ok_runs for g in gs):
                miss.append(f"{where}: no ok run for method {m}")
        for g in gs:
            for r in g.ok_runs:
                for keys, what in ((("memory", "peak_bytes"), "memory.peak_bytes"),
                                   (("memory", "breakdown"), "memory.breakdown"),
                                   (("speed", "tokens_per_s"), "speed.tokens_per_s"),
                                   (("curve",), "curve")):
                    if not r.get(*keys):
                        miss.append(f"`{r.path}` has no {what}")
                if not r.get("metrics"):
                    miss.append(f"`{r.path}` has no metrics")
                if g.method in figures.DRIFT_METHODS and not r.get("subspace", "drift"):
                    miss.append(f"`{r.path}` has no subspace.drift")
        rank_lines = sweep_lines(gs, "rank")
        if not rank_lines:
            miss.append(f"{where}: rank ablation not built (no method run at two or more ranks)")
        for m in ("oasis", "pca", "lora"):
            ranks = {g.config["rank"] for first, pts in rank_lines if first.method == m for g in pts}
            if rank_lines and not ranks:
                miss.append(f"{where}: rank ablation has no {m} line (no {m} run at two or more ranks)")
            elif rank_lines and set(WANT_RANKS) - ranks:
                miss.append(f"{where}: rank ablation for {m} lacks rank(s) "
                            f"{', '.join(map(str, sorted(set(WANT_RANKS) - ranks)))}")
        lr_lines = sweep_lines(gs, "subspace_lr")
        if not lr_lines:
            miss.append(f"{where}: subspace-lr ablation not built (no method run at two or more subspace_lr)")
        for first, pts in lr_lines:
            lrs = [g.config["subspace_lr"] for g in pts if g.config["subspace_lr"] > 0]
            if lrs and max(lrs) / min(lrs) < 10 ** WANT_LR_DECADES:
                miss.append(f"{where}: subspace-lr ablation for {first.method} spans "
                            f"{min(lrs):g}..{max(lrs):g}, less than {WANT_LR_DECADES} orders of magnitude")
        ref = reference_groups(gs)
        if f"fig5_loss_curves_{suite}_{profile}.png" not in names:
            miss.append(f"{where}: loss-curve figure not built "
                        f"(no curve for {', '.join(figures.CURVE_METHODS)})")
        if f"fig6_subspace_drift_{suite}_{profile}.png" not in names:
            miss.append(f"{where}: drift figure not built "
                        f"(no subspace.drift for {', '.join(figures.DRIFT_METHODS)})")
        by_method = {}
        for g in ref:
            by_method.setdefault(g.method, []).append(g)
        for m, rs in sorted(by_method.items()):
            if len(rs) > 1:
                miss.append(f"{where}: {m} has {len(rs)} candidate reference configs (no single most common "
                            f"value of {', '.join(REFERENCE_KEYS)} or another key); "
                            "all are shown as separate rows")
    if not loaded.estimates:
        miss.append("no memory-estimate file (python -m suites.memory --json results/memory/<name>.json)")
    if "fig2_memory_breakdown.png" not in names:
        miss.append("memory-breakdown figure not built (no record or estimate with memory.breakdown)")
    return miss


def render_missing(missing: list[str]) -> str:
    lines = ["# Missing or partial data", "",
             "Generated by `python -m reports.build`; everything below was left out of (or is partial in) "
             "the tables and figures.", ""]
    lines += [f"- {m}" for m in missing] or ["- nothing: every artefact was built from complete records"]
    return "\n".join(lines) + "\n"


_LISTED = re.compile(r"^- `([^`]+)`$")


def _write_index(out: Path, written):
    """INDEX.md lists this build's files; files a previous build listed but this one did not are removed,
    so out/ never keeps stale artefacts from records that are gone."""
    index = out / "INDEX.md"
    now = sorted({p.name for p in written} | {"INDEX.md"})
    if index.exists():
        for line in index.read_text().splitlines():
            m = _LISTED.match(line)
            if m and m.group(1) not in now and "/" not in m.group(1):
                (out / m.group(1)).unlink(missing_ok=True)
    listing = "\n".join(f"- `{n}`" for n in now)
    atomic_write(index, f"# Artefacts of `python -m reports.build`\n\n{listing}\n")


def _main(argv) -> int:
    sections = __doc__.split("\n\n")
    ap = Parser(prog=PROG, description=sections[0], epilog="\n\n".join(sections[2:]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results"),
                    help="directory of run records, searched recursively (default: results)")
    ap.add_argument("--out", type=Path, default=Path("reports/out"),
                    help="where tables and figures go (default: reports/out)")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        raise UsageError(f"results directory {str(args.results)!r} does not exist")
    try:
        check_output_dir(args.out)
        build(args.results, args.out)
    except (OutputError, NothingToBuild) as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv=None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
