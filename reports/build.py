"""Turn run records into the paper's tables and figures.

    python -m reports.build [--results DIR] [--out DIR]

Reads every JSON file under --results (recursively): run records (DESIGN §3.4) and memory-estimate files
written by `python -m suites.memory --json` (conventionally under results/memory/). Writes under --out:

  table1_main_<suite>_<profile>   main table: per method at its reference config, on the seeds every method
                                  has: peak memory (+ source), metrics (mean ± 95% t-interval), tokens/s,
                                  memory ratio to adam, paired difference vs adam on the headline metric and
                                  whether it is distinguishable, the model before training (step 0)
  table1_paired_<suite>_<profile> every metric before/after training and paired vs adam, same seeds
  runs_<suite>_<profile>          every configuration that was run, each on the seeds it has
  published_<suite>               the published reference numbers with citations (DESIGN §7)
  table2_memory_breakdown, table_memory_estimate, table3_rank_ablation_*, table4_subspace_lr_*
  fig2_memory_breakdown           stacked bars params/grads/optimizer/activations/other
  fig3_rank_ablation_*            metric and peak memory vs rank (error bars: 95% interval, n in legend)
  fig4_subspace_lr_*              metric vs subspace learning rate (log x), stable range shaded
  fig5_loss_curves_*              training/validation loss vs step: oasis, pca, adam
  fig6_subspace_drift_*           per-step basis drift: oasis (continuous) vs pca (refresh jumps)
  MISSING.md                      what could not be built and why: bad/partial/smoke records, seeds left
                                  out of a comparison, provenance conflicts, reproducibility of re-runs
  INDEX.md                        the list of artefacts of this build

Tables are Markdown + LaTeX (booktabs) + CSV; figures PNG + PDF. No metric is recomputed: every value
comes from a record (unit conversion, statistics over a stated seed set, ratios of two recorded values).
Same records in, same tables out (no timestamps); a malformed record is skipped with a warning.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from reports import figures
from reports.compare import Comparison, compare
from reports.load import REFERENCE_KEYS, REL_TOL, Loaded, Replicate, group_runs, load, seeds_text
from reports.tables import (
    breakdown_table,
    estimate_tables,
    main_table,
    paired_table,
    published_tables,
    references_table,
    runs_table,
    sweep_table,
)
from suites.core.cli import Parser, UsageError, cli_main
from suites.core.files import OutputError, atomic_write, check_output_dir

PROG = "python -m reports.build"
SUITES = ("gsm8k", "humaneval", "c4")
MISSION_METHODS = ("adam", "lora", "galore", "ldadam", "pca", "oasis")
WANT_RANKS = (8, 16, 32, 64, 128)
WANT_LR_DECADES = 5
SECTIONS = ("Skipped and partial records", "Seed sets", "Provenance", "Reproducibility", "Older records",
            "Artefacts not built")


class NothingToBuild(ValueError):
    """The results folder holds no run record and no memory estimate (nothing is written)."""


def build(results: Path, out: Path, log=print, warn=None) -> dict:
    """Build every artefact the records allow; returns {"written", "missing", "skipped", "sections"}."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    loaded = load(results)
    if not loaded.runs and not loaded.estimates:
        bad = f" ({len(loaded.skipped)} malformed file(s) skipped)" if loaded.skipped else ""
        raise NothingToBuild(f"no run records or memory-estimate files under {results}{bad}; "
                             "run `python -m suites.run ...` or `python -m suites.memory ... --json` first")
    for path, why in loaded.skipped:
        warn(f"warning: skipped {path}: {why}")
    comps = compare(group_runs(loaded.runs))
    out.mkdir(parents=True, exist_ok=True)
    written, table_notes = [], []

    for comp in comps:
        table, notes = main_table(comp)
        written += table.write(out)
        table_notes += notes
        for detail in (paired_table(comp), references_table(comp)):
            if detail:
                written += detail.write(out)
        written += runs_table(comp).write(out)
    for t in published_tables({c.suite for c in comps}):
        written += t.write(out)
    bt = breakdown_table(comps)
    if bt:
        written += bt.write(out)
    for t in estimate_tables(loaded.estimates):
        written += t.write(out)
    written += figures.memory_breakdown(comps, loaded.estimates, out)

    for _, paths in sorted(figures.rank_ablation(comps, out).items()):
        written += paths
    for _, paths in sorted(figures.subspace_lr_ablation(comps, out).items()):
        written += paths
    for key, stem, title in (("rank", "table3_rank_ablation", "Rank ablation"),
                             ("subspace_lr", "table4_subspace_lr", "Subspace learning-rate ablation"),
                             ("lr", "table5_lr_ablation", "Learning-rate ablation (the main rows use the "
                                                          "rate with the lowest validation-slice loss)"),
                             ("refresh_every", "table6_refresh_period", "Refresh-period ablation (pca)"),
                             ("update_proj_gap", "table6_update_proj_gap",
                              "Projector-period ablation (galore)")):
        for comp in comps:
            lines = comp.sweeps.get(key)
            if lines:
                metrics = figures.panel_metrics([g for _, pts in lines for g in pts], comp.headline())
                if key == "lr":  # the selection metric beside the headline: why a row's rate was chosen
                    metrics = list(dict.fromkeys(["val_loss", *metrics]))
                caption = f"{title}: {comp.suite} ({comp.profile} profile), {comp.sweep_seeds_caption(key)}"
                written += sweep_table(f"{stem}_{comp.suite}_{comp.profile}", caption, comp, key,
                                       metrics).write(out)
    for d in (figures.loss_curves(comps, out), figures.subspace_drift(comps, out),
              figures.tracking_quality(comps, out)):
        for _, paths in sorted(d.items()):
            written += paths

    sections = find_missing(loaded, comps, written, table_notes)
    missing = [line for sec in SECTIONS for line in sections.get(sec, [])]
    atomic_write(out / "MISSING.md", render_missing(sections))
    written.append(out / "MISSING.md")
    _write_index(out, written)
    for line in missing:
        log(f"missing: {line}")
    log(f"wrote {len(written)} files to {out}")
    return {"written": written, "missing": missing, "skipped": loaded.skipped, "sections": sections}


def find_missing(loaded: Loaded, comps: list[Comparison], written, table_notes=()) -> dict[str, list[str]]:
    """MISSING.md's lines, by section."""
    names = {p.name for p in written}
    sec = {s: [] for s in SECTIONS}
    partial = sec["Skipped and partial records"]
    partial += [f"skipped `{p}`: {why}" for p, why in loaded.skipped]
    partial += [f"skipped `{r.path}`: smoke profile ({r.suite}/{r.method}); smoke records never reach "
                "paper-style tables or figures" for r in loaded.smoke]
    partial += [f"`{p}` superseded by `{k}` (same configuration and seed; the later/ok record is used)"
                for p, k in loaded.superseded]
    for r in loaded.runs:
        if not r.ok:
            err = str(r.rec.get("error") or "").strip().splitlines()
            partial.append(f"`{r.path}` ({r.method}, {r.suite}/{r.profile}) status {r.status}"
                           + (f": {err[0][:160]}" if err else ""))
    sec["Reproducibility"] += [_replicate_line(p) for p in loaded.replicates]
    sec["Older records"] += _older_records(loaded)
    sec["Seed sets"] += [n for c in comps for n in c.seed_notes]
    sec["Provenance"] += [n for c in comps for n in c.provenance_notes] + list(table_notes)
    built = sec["Artefacts not built"]
    present = {c.suite for c in comps}
    for suite in SUITES:
        if suite not in present:
            built.append(f"no run records for suite {suite}")
    for comp in comps:
        where = comp.where
        for m in MISSION_METHODS:
            if not any(g.method == m and g.ok_runs for g in comp.groups):
                built.append(f"{where}: no ok run for method {m}")
        for g in comp.groups:
            for r in g.ok_runs:
                for keys, what in ((("memory", "peak_bytes"), "memory.peak_bytes"),
                                   (("memory", "breakdown"), "memory.breakdown"),
                                   (("speed", "tokens_per_s"), "speed.tokens_per_s"),
                                   (("curve",), "curve")):
                    if not r.get(*keys):
                        partial.append(f"`{r.path}` has no {what}")
                if not r.get("metrics"):
                    partial.append(f"`{r.path}` has no metrics")
                if g.method in figures.DRIFT_METHODS and not r.get("subspace", "drift"):
                    partial.append(f"`{r.path}` has no subspace.drift")
        rank_lines = comp.sweeps.get("rank") or []
        if not rank_lines:
            built.append(f"{where}: rank ablation not built (no method has two or more ranks on "
                         f"seeds {seeds_text(comp.seeds)})")
        for m in ("oasis", "pca", "lora"):
            ranks = {g.config["rank"] for first, pts in rank_lines if first.method == m for g in pts}
            if rank_lines and not ranks:
                built.append(f"{where}: rank ablation has no {m} line (no {m} run at two or more ranks)")
            elif rank_lines and set(WANT_RANKS) - ranks:
                built.append(f"{where}: rank ablation for {m} lacks rank(s) "
                             f"{', '.join(map(str, sorted(set(WANT_RANKS) - ranks)))}")
        lr_lines = comp.sweeps.get("subspace_lr") or []
        if not lr_lines:
            built.append(f"{where}: subspace-lr ablation not built (no method has two or more subspace_lr "
                         f"on seeds {seeds_text(comp.seeds)})")
        for first, pts in lr_lines:
            lrs = [g.config["subspace_lr"] for g in pts if g.config["subspace_lr"] > 0]
            if lrs and max(lrs) / min(lrs) < 10 ** WANT_LR_DECADES:
                built.append(f"{where}: subspace-lr ablation for {first.method} spans "
                             f"{min(lrs):g}..{max(lrs):g}, less than {WANT_LR_DECADES} orders of magnitude")
        if f"fig5_loss_curves_{comp.suite}_{comp.profile}.png" not in names:
            built.append(f"{where}: loss-curve figure not built "
                         f"(no curve for {', '.join(figures.CURVE_METHODS)})")
        if f"fig6_subspace_drift_{comp.suite}_{comp.profile}.png" not in names:
            built.append(f"{where}: drift figure not built "
                         f"(no subspace.drift for {', '.join(figures.DRIFT_METHODS)})")
        by_method = {}
        for g in comp.refs:
            by_method.setdefault(g.method, []).append(g)
        for m, rs in sorted(by_method.items()):
            if len(rs) > 1:
                built.append(f"{where}: {m} has {len(rs)} candidate reference configs (no single most common "
                             f"value of {', '.join(REFERENCE_KEYS)} or another key); "
                             "all are shown as separate rows")
    if not loaded.estimates:
        built.append("no memory-estimate file (python -m suites.memory --json results/memory/<name>.json)")
    if "fig2_memory_breakdown.png" not in names:
        built.append("memory-breakdown figure not built (no record or estimate with memory.breakdown)")
    return sec


def _replicate_line(p: Replicate) -> str:
    who = f"{p.suite}/{p.profile} {p.method} seed {p.seed}"
    if p.kind == "reproduced":
        return (f"{who}: reproduced: `{p.others[0].path}` and `{p.used.path}` agree (metrics within "
                f"{REL_TOL:g} relative, memory identical)")
    if p.kind == "differs":
        return (f"{who}: NOT reproduced: {'; '.join(p.differences)}. The tables use `{p.used.path}` "
                "(the newer record)")
    return (f"{who}: records started from different bases ({'; '.join(p.differences)}); never pooled: "
            f"seed {p.seed} is left out of this configuration")


# (suites or None for all, path in the record, what the reports do without it)
OLDER_FIELDS = (
    (None, ("config", "base_seed"), "the initial weights' seed is not part of the configuration"),
    (None, ("env", "base_checksum"), "bases cannot be compared between records"),
    (None, ("env", "machine"), "speeds of several records are not shown (one machine cannot be checked)"),
    (("c4",), ("config", "eval_corpus"), "the held-out loss is labelled without its corpus"),
    (("gsm8k",), ("metrics", "answer_nll"), "no continuous quality metric"),
    (("gsm8k",), ("metrics", "final_answer_acc_tf"), "no teacher-forced final-answer accuracy"),
    (("gsm8k",), ("metrics", "gen_ceiling"), "the generation ceiling is not shown"),
    (("gsm8k", "humaneval"), ("metrics", "step0"), "no before-training values"),
)


def _older_records(loaded: Loaded) -> list[str]:
    """Fields older harness versions did not write: the records still load; say what falls back."""
    out = []
    oks = [r for r in loaded.runs if r.ok]
    for suites, keys, effect in OLDER_FIELDS:
        lacking = [r.path for r in oks if (suites is None or r.suite in suites) and r.get(*keys) is None]
        if lacking:
            out.append(f"{len(lacking)} ok record(s) lack `{'.'.join(keys)}` (older harness): {effect}; "
                       f"e.g. {', '.join(f'`{p}`' for p in lacking[:3])}")
    legacy = [r.path for r in oks if r.get("metrics", "c4_eval_loss") is not None]
    if legacy:
        out.append(f"{len(legacy)} record(s) name the C4 train-split sample `c4_eval_loss` (older harness; "
                   "now `c4_sample_loss`): shown as a C4 train-split sample, not C4 validation; e.g. "
                   + ", ".join(f"`{p}`" for p in legacy[:3]))
    return out


def render_missing(sections: dict[str, list[str]]) -> str:
    lines = ["# Missing or partial data", "",
             "Generated by `python -m reports.build`; everything below was left out of (or is partial in) "
             "the tables and figures, or is needed to read them.", ""]
    if not any(sections.values()):
        lines.append("- nothing: every artefact was built from complete records")
    for name in SECTIONS:
        if sections.get(name):
            lines += [f"## {name}", ""] + [f"- {m}" for m in sections[name]] + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


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
    ap.add_argument("--check", action="store_true",
                    help="build into a scratch folder and compare it with --out file by file, writing "
                         "nothing there: exit 1, naming the files, when the committed artefacts are stale")
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        raise UsageError(f"results directory {str(args.results)!r} does not exist")
    try:
        if args.check:
            return _check(args.results, args.out)
        check_output_dir(args.out)
        build(args.results, args.out)
    except (OutputError, NothingToBuild) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _check(results: Path, out: Path) -> int:
    """Exit status 1 when `out` differs from a fresh build of `results` (a file changed, missing or extra)."""
    import filecmp
    import tempfile

    if not out.is_dir():
        raise UsageError(f"--check: {str(out)!r} is not a folder of built reports")
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "out"
        build(results, fresh, log=lambda _: None, warn=lambda _: None)
        built = {p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()}
        committed = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        stale = sorted(name for name in built & committed
                       if not filecmp.cmp(fresh / name, out / name, shallow=False))
    problems = ([f"differs: {n}" for n in stale] + [f"missing: {n}" for n in sorted(built - committed)]
                + [f"not built any more: {n}" for n in sorted(committed - built)])
    for line in problems:
        print(line)
    if problems:
        print(f"{PROG} --check: {str(out)!r} is stale ({len(problems)} file(s)); rebuild it with "
              f"`python -m reports.build` and commit", file=sys.stderr)
        return 1
    print(f"{PROG} --check: {str(out)!r} equals a rebuild from {str(results)!r}")
    return 0


def main(argv=None) -> int:
    return cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
