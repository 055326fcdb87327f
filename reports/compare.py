"""Matched-seed comparisons: which seeds a table or figure uses, and differences against adam.

Per suite/profile, the main table compares each method's reference configuration on exactly the seeds
every one of them has (the intersection); seeds or methods outside it are named in MISSING.md, never
pooled. Ablation points use the same seed set (their reference configuration's, as it stands in the main
table); a point lacking one of those seeds is dropped and named. Every difference against adam is paired
by seed (method − adam on the same seed), with a 95% t-interval.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from reports.load import (
    Group,
    labels_for,
    method_rank,
    reference_groups,
    seed_order,
    seeds_text,
)
from reports.stats import Stat, paired
from reports.style import metric_style, ordered_metrics

# The metric a method's verdict against adam is read on, per suite: the first one the table records.
# Continuous metrics first: at CPU scale strict accuracy and pass@1 sit at the floor for every method.
HEADLINE = {"gsm8k": ("answer_nll", "accuracy"), "humaneval": ("canonical_nll", "pass@1"),
            "c4": ("eval_loss", "c4_sample_loss", "c4_eval_loss")}
SWEEP_KEYS = ("rank", "subspace_lr", "lr", "refresh_every", "update_proj_gap")
# paired differences against chosen references, each on the seeds its pair has: adam again, what isolates
# OASIS's mechanism (its own frozen basis, its basis without moment transport), the periodic alternative
# it replaces (pca), and the gradient-subspace methods it competes with (galore, ldadam), so that a table
# shows where OASIS loses as plainly as where it wins
REFERENCE_PAIRS = (("oasis", "adam"), ("oasis", "oasis-frozen"), ("oasis", "pca"),
                   ("oasis", "oasis-notransport"), ("pca", "oasis-frozen"), ("oasis", "galore"),
                   ("oasis", "ldadam"))
RATIO_KEYS = ("model", "dtype", "batch", "seq_len")  # an adam row compared with another row matches these


def _seeds_caption(seeds, more: str = "") -> str:
    word = "seed" if len(seeds) == 1 else "seeds"
    return f"{word} {seeds_text(seeds)} (n={len(seeds)}{more})"


def sweep_lines(groups: list[Group], key: str) -> list[tuple[Group, list[Group]]]:
    """Groups that differ only in `key` (and seed) form one line: [(first group, points sorted by key)].
    Only lines with at least two values of `key` are an ablation."""
    lines = defaultdict(list)
    for g in groups:
        if key not in g.config or not isinstance(g.config[key], (int, float)):
            continue
        rest = {k: v for k, v in g.config.items() if k != key}
        lines[(g.suite, g.profile, g.method, json.dumps(rest, sort_keys=True, default=str))].append(g)
    out = []
    for k in sorted(lines, key=lambda k: (k[0], k[1], method_rank(k[2]), k[2], k[3])):
        pts = sorted(lines[k], key=lambda g: g.config[key])
        if len(pts) >= 2:
            out.append((pts[0], pts))
    return out


def speed(g: Group) -> tuple[Stat | None, str | None]:
    """tokens/s over the group's ok runs, only when they all ran on one recorded machine (a single run
    needs no check); otherwise (None, why)."""
    runs = [r for r in g.ok_runs if r.seed in g.by_seed("speed", "tokens_per_s")]
    stat = g.stat("speed", "tokens_per_s")
    if stat is None or len(runs) < 2:
        return stat, None
    machines = {r.get("env", "machine") for r in runs}
    if None in machines:
        lacking = [r.seed for r in runs if r.get("env", "machine") is None]
        return None, (f"seed(s) {seeds_text(lacking)} record no env.machine (older harness), so a common "
                      "machine cannot be checked")
    if len(machines) > 1:
        by = defaultdict(list)
        for r in runs:
            by[r.get("env", "machine")].append(r.seed)
        parts = "; ".join(f"seed(s) {seeds_text(sorted(s, key=seed_order))} on machine {m}"
                          for m, s in sorted(by.items()))
        return None, f"{parts} (speeds from different machines are never pooled)"
    return stat, None


@dataclass
class Comparison:
    suite: str
    profile: str
    groups: list[Group]                  # every configuration of this suite/profile, on its own seeds
    refs: list[Group]                    # each method's reference configuration, all its seeds
    seeds: list                          # the matched seed set of the main table and the ablations
    rows: list[Group]                    # refs restricted to `seeds`
    sweeps: dict = field(default_factory=dict)  # key -> [(first point, points on `seeds`)]
    seed_notes: list[str] = field(default_factory=list)        # seeds / points left out, for MISSING.md
    provenance_notes: list[str] = field(default_factory=list)  # bases, machines, missing adam rows

    @property
    def where(self) -> str:
        return f"{self.suite}/{self.profile}"

    @property
    def seeds_caption(self) -> str:
        return _seeds_caption(self.seeds)

    def sweep_seeds_caption(self, key: str) -> str:
        """The seeds an ablation's points are on: the main rows' seeds, or fewer where a line's points lack
        some (each line then keeps the seeds all its points have)."""
        on = {tuple(g.seeds) for _, pts in self.sweeps[key] for g in pts}
        if on == {tuple(self.seeds)}:
            return self.seeds_caption
        if len(on) == 1:
            (seeds,) = on
            return _seeds_caption(seeds, f"; the main rows use seeds {seeds_text(self.seeds)}")
        return ("each line on the seeds all its points have (n per row; the main rows use "
                f"{seeds_text(self.seeds)})")

    def headline(self) -> str | None:
        recorded = {m for g in self.rows for r in g.ok_runs for m in (r.get("metrics") or {})
                    if g.values("metrics", m)}
        for m in HEADLINE.get(self.suite, ()):
            if m in recorded:
                return m
        shown = ordered_metrics(recorded, shown_only=True)
        return shown[0] if shown else None

    def adam_for(self, g: Group, same_source: bool = False) -> Group | None:
        """The adam row `g` is compared with: same RATIO_KEYS (and memory source if asked); None when
        there is none or more than one."""
        cands = [a for a in self.rows if a.method == "adam"
                 and all(a.config.get(k) == g.config.get(k) for k in RATIO_KEYS)
                 and (not same_source or a.sources() == g.sources())]
        return cands[0] if len(cands) == 1 else None

    def vs_adam(self, g: Group, *keys) -> Stat | None:
        """Paired per-seed difference g − adam at `keys` over the seeds both recorded; None for adam."""
        a = self.adam_for(g)
        if a is None or a is g:
            return None
        return paired(g.by_seed(*keys), a.by_seed(*keys))[0]

    def row_of(self, method: str) -> Group | None:
        """The main-table row of `method` (its reference configuration); None unless exactly one."""
        rows = [g for g in self.rows if g.method == method]
        return rows[0] if len(rows) == 1 else None

    def vs_reference(self, method: str, reference: str, metric: str) -> Stat | None:
        """Paired per-seed difference method − reference on `metric` over the seeds *these two* recorded at
        their main-table configurations (not only the seeds every method has: a method another pair does
        not involve, short of seeds, does not shrink this pair's matched sample)."""
        mine, ref = self.row_of(method), self.row_of(reference)
        if mine is None or ref is None:
            return None
        mine, ref = mine.full or mine, ref.full or ref
        return paired(mine.by_seed("metrics", metric), ref.by_seed("metrics", metric))[0]

    def memory_ratio(self, g: Group) -> float | None:
        a = self.adam_for(g, same_source=True)
        mine, ref = g.stat("memory", "peak_bytes"), a and a.stat("memory", "peak_bytes")
        if mine is None or ref is None:
            return None
        return mine.mean / ref.mean

    def verdict(self, g: Group, metric: str) -> str:
        """Plain words: is this row distinguishable from adam on `metric` (paired 95% interval)?"""
        if g.method == "adam":
            return "reference"
        d = self.vs_adam(g, "metrics", metric)
        if d is None:
            return "no paired adam run"
        if d.n < 2:
            return f"cannot tell (n={d.n})"
        if not d.excludes_zero:
            return "no: 95% interval includes 0"
        better = (d.mean > 0) == metric_style(metric).higher_is_better
        return f"yes: {'better' if better else 'worse'} than adam"


def compare(groups: list[Group]) -> list[Comparison]:
    by = defaultdict(list)
    for g in groups:
        by[(g.suite, g.profile)].append(g)
    return [_compare(suite, profile, gs) for (suite, profile), gs in sorted(by.items())]


def _compare(suite: str, profile: str, gs: list[Group]) -> Comparison:
    where = f"{suite}/{profile}"
    refs = reference_groups(gs)
    labels = labels_for(refs)
    notes = []
    present = [g for g in refs if g.seeds]
    for g in refs:
        if not g.seeds:
            notes.append(f"{where}: {labels[id(g)]} has no ok run; it takes no part in the seed set and its "
                         "main-table row shows no numbers")
    seeds = sorted(set.intersection(*(set(g.seeds) for g in present)), key=seed_order) if present else []
    union = sorted({s for g in present for s in g.seeds}, key=seed_order)
    for s in union:
        if s in seeds:
            continue
        has = [labels[id(g)] for g in present if s in g.seeds]
        lacks = [labels[id(g)] for g in present if s not in g.seeds]
        notes.append(f"{where}: seed {s} left out of every main-table row and ablation point: "
                     f"{', '.join(lacks)} lack(s) an ok run for it (present for {', '.join(has)})")
    if present and not seeds:
        notes.append(f"{where}: no seed is shared by every method; the main table shows no numbers")
    rows = [g.restrict(seeds) for g in refs]
    comp = Comparison(suite, profile, gs, refs, seeds, rows, seed_notes=notes)
    prov = comp.provenance_notes
    for g in rows:
        if g.method != "adam" and g.seeds and comp.adam_for(g) is None:
            prov.append(f"{where}: {labels[id(g.full)]} has no single adam row with the same "
                         f"{', '.join(RATIO_KEYS)}; no paired difference or memory ratio")
        if speed(g)[1]:
            prov.append(f"{where}: tokens/s of {labels[id(g.full)]} not shown: {speed(g)[1]}")
    prov += _base_notes(where, rows, labels)
    for key in SWEEP_KEYS:
        lines = _sweep(comp, key)
        if lines or key in ("rank", "subspace_lr"):  # the paper's two ablations are always listed
            comp.sweeps[key] = lines
    return comp


def _base_notes(where: str, rows: list[Group], labels: dict) -> list[str]:
    """Records compared in one table should start from one base; say so when they did not."""
    runs = [(g, r) for g in rows for r in g.ok_runs]
    sums = defaultdict(list)
    for g, r in runs:
        sums[r.get("env", "base_checksum")].append(f"{labels[id(g.full)]} seed {r.seed}")
    known = {k: v for k, v in sums.items() if k is not None}
    out = []
    if len(known) > 1:
        parts = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(known.items()))
        out.append(f"{where}: main-table records started from {len(known)} different bases "
                   f"(env.base_checksum {parts}); differences between rows include base differences")
    elif not known:
        hashes = defaultdict(list)
        for _, r in runs:
            hashes[r.config.get("base_hash")].append(r.seed)
        if len(hashes) > 1:
            out.append(f"{where}: seeds started from {len(hashes)} different pretrained bases "
                       "(config.base_hash differs by seed; the records predate base_seed and "
                       "env.base_checksum), so intervals mix base and run variance")
    return out


def _sweep(comp: Comparison, key: str) -> list[tuple[Group, list[Group]]]:
    """Ablation lines on the comparison's seeds; points lacking one of them are dropped (and named)."""
    if not comp.seeds:
        return []
    out = []
    for first, pts in sweep_lines(comp.groups, key):
        label = labels_for([first], ignore=(key,))[id(first)]
        want = set(comp.seeds)
        shared = set.intersection(*(set(p.seeds) for p in pts))
        short = [p for p in pts if not want <= set(p.all_seeds)]
        if 2 * len(short) > len(pts) and shared and shared < want:
            # most points lack seeds of the main rows: an ablation run on fewer seeds by design (the
            # study's one-seed ablations), drawn on the seeds all its points have and said so; a line
            # with a few points short of seeds keeps the main rows' seeds and drops those points
            comp.seed_notes.append(f"{comp.where}: {key} ablation, {label}: on seed(s) "
                                   f"{seeds_text(sorted(shared, key=seed_order))}, the seeds all its points "
                                   f"have (the main rows use {seeds_text(comp.seeds)})")
            want = shared
        kept = []
        for p in pts:
            lacking = sorted(want - set(p.all_seeds), key=seed_order)
            extra = sorted(set(p.all_seeds) - want, key=seed_order)
            at = f"{comp.where}: {key} ablation, {label} at {key}={p.config[key]:g}"
            if lacking:
                comp.seed_notes.append(f"{at} dropped: no run for seed(s) {seeds_text(lacking)} of the "
                                       f"reference seed set {seeds_text(comp.seeds)}")
                continue
            if extra:
                comp.seed_notes.append(f"{at}: seed(s) {seeds_text(extra)} not used "
                                       "(outside the reference seed set)")
            kept.append(p.restrict(sorted(want, key=seed_order)))
        if len(kept) >= 2:
            out.append((kept[0], kept))
        elif pts:
            comp.seed_notes.append(f"{comp.where}: {key} ablation line {label} not drawn: fewer than two "
                                   f"points have every seed of {seeds_text(sorted(want, key=seed_order))}")
    return out

