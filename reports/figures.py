"""Figures (PNG + PDF) from grouped run records. Colours come from the one table in `reports.style`.

Every figure draws a comparison's rows or ablation points on its one seed set (reports.compare): each
point is a mean over those seeds, error bars and bands are 95% t-intervals, and the legend states n."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from reports.compare import Comparison  # noqa: E402
from reports.load import (  # noqa: E402
    CATEGORIES,
    SOURCE_WORDS,
    Group,
    describe_estimate,
    labels_for,
    metric_names,
    model_label,
)
from reports.stats import Stat  # noqa: E402
from reports.style import (  # noqa: E402
    CATEGORY_COLORS,
    METHOD_MARKERS,
    memory_unit,
    method_color,
    method_linestyle,
    method_marker,
    metric_label,
    metric_scale,
    metric_style,
    ordered_metrics,
    spans_decades,
)
from reports.tables import FIXTURE_BANNER, breakdown_rows, corpora  # noqa: E402

CURVE_METHODS = ("adam", "pca", "oasis")   # loss-curve figure: the comparison the paper draws
DRIFT_METHODS = ("pca", "oasis")           # subspace-drift figure: periodic refresh vs online tracking
MAX_METRIC_PANELS = 2

plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.titlesize": 10, "axes.grid": True,
                     "grid.alpha": 0.3, "legend.fontsize": 8, "svg.hashsalt": "oasis-bench"})


def save(fig, out: Path, name: str, groups: list[Group] = ()) -> list[Path]:
    """PNG + PDF with fixed metadata so rebuilding from the same records gives the same bytes."""
    if any(g.fixture for g in groups):
        fig.text(0.5, 0.995, FIXTURE_BANNER, ha="center", va="top", color="#B00000", fontsize=9,
                 fontweight="bold")
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None,
                                                          "Creator": None})
    plt.close(fig)
    return paths


_labels = labels_for


def panel_metrics(groups: list[Group], first: str | None = None) -> list[str]:
    """The metrics an ablation figure plots: `first` (the comparison's headline metric) if recorded, then
    the first other shown metrics these groups recorded."""
    shown = [m for m in ordered_metrics(metric_names(groups), shown_only=True) if not _all_zero(groups, m)]
    if first in shown:
        shown = [first] + [m for m in shown if m != first]
    return shown[:MAX_METRIC_PANELS]


def _all_zero(groups: list[Group], metric: str) -> bool:
    """Every recorded value of `metric` is exactly 0 (e.g. strict accuracy at CPU scale): a panel of it
    would plot a flat line on a meaningless axis, so figures leave it out (the tables still show it)."""
    values = [v for g in groups for v in g.values("metrics", metric)]
    return bool(values) and all(v == 0 for v in values)


def _suptitle(fig, text):
    fig.suptitle(text, y=0.965, fontsize=11)


# --- figure 2: memory breakdown -------------------------------------------------------------------


def memory_breakdown(comps: list[Comparison], estimates: list[dict], out: Path) -> list[Path]:
    panels = defaultdict(list)  # title -> [(group, method, {cat: bytes}, peak_bytes)]
    used = []
    for comp in comps:
        for title, g, stats in breakdown_rows([comp]):
            peak = g.stat("memory", "peak_bytes")
            model = model_label(g.config.get("model", "?"))
            title_ = f"{title}: {model}, {'/'.join(g.sources())}, {comp.seeds_caption}"
            panels[title_].append(
                (g, g.method, {c: (s.mean if s else 0.0) for c, s in stats.items()},
                 peak.mean if peak else None))
            used.append(g)
    for est in estimates:
        what, source = describe_estimate(est)
        title = f"{source}:\n{what}"
        for r in est["rows"]:
            if r.get("breakdown"):
                parts = {c: float(r["breakdown"].get(c, 0)) for c in CATEGORIES}
                panels[title].append((None, r["method"], parts, float(r["peak_bytes"])))
    if not panels:
        return []
    n = len(panels)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False)
    # recorded runs first, then the estimates, each alphabetically
    order = sorted(panels.items(), key=lambda kv: (kv[0].startswith(SOURCE_WORDS["estimate"]), kv[0]))
    for ax, (title, bars) in zip(axes.flat, order, strict=False):
        labels = _labels([b[0].full for b in bars if b[0] is not None])
        top = max(max(sum(b[2].values()), b[3] or 0) for b in bars)
        unit, div = memory_unit(top)
        xs = range(len(bars))
        bottom = [0.0] * len(bars)
        for cat in CATEGORIES:
            h = [b[2][cat] / div for b in bars]
            ax.bar(xs, h, bottom=bottom, color=CATEGORY_COLORS[cat], width=0.7, label=cat,
                   edgecolor="white", linewidth=0.5)
            bottom = [a + b for a, b in zip(bottom, h, strict=False)]
        for x, b in zip(xs, bars, strict=False):
            if b[3] is not None:
                ax.plot([x - 0.4, x + 0.4], [b[3] / div] * 2, color="black", linewidth=1.5)
                ax.annotate(f"{b[3] / div:.1f}" if div < 2**30 else f"{b[3] / div:.2f}", (x, b[3] / div),
                            xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{labels[id(b[0].full)]} (n={len(b[0].seeds)})" if b[0] is not None else b[1]
                            for b in bars], rotation=30, ha="right")
        for tick, b in zip(ax.get_xticklabels(), bars, strict=False):
            tick.set_color(method_color(b[1]))
            tick.set_fontweight("bold")
        ax.set_ylabel(f"memory at peak ({unit})")
        ax.set_title(title)
        ax.set_ylim(0, top / div * 1.12)
        ax.grid(axis="x", visible=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [Patch(color=CATEGORY_COLORS[c], label=c) for c in reversed(CATEGORIES)]
    handles.append(Line2D([], [], color="black", linewidth=1.5, label="recorded peak (mean over seeds)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="category")
    _suptitle(fig, "Peak-memory breakdown per method")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save(fig, out, "fig2_memory_breakdown", used)


# --- figures 3 and 4: ablations -------------------------------------------------------------------


def _errorbar(ax, xs, stats, scale, method, label, linestyle=None):
    """Mean per point; error bars = 95% t-interval over seeds where a point has two or more; a point
    whose n differs from the line's most common n says its own n."""
    pts = [(x, s) for x, s in zip(xs, stats, strict=False) if s is not None]
    if not pts:
        return
    ls = method_linestyle(method) if linestyle is None else linestyle
    common = max(sorted({s.n for _, s in pts}), key=lambda n: sum(s.n == n for _, s in pts))
    ax.plot([x for x, _ in pts], [s.mean * scale for _, s in pts], color=method_color(method),
            label=f"{label} (n={common})", linestyle=ls, zorder=3 if ls != "-" else 2,
            **method_marker(method))
    err = [(x, s) for x, s in pts if s.half is not None]
    if err:
        ax.errorbar([x for x, _ in err], [s.mean * scale for _, s in err],
                    yerr=[s.half * scale for _, s in err], color=method_color(method), linestyle="none",
                    capsize=3)
    for x, s in pts:
        if s.n != common:
            ax.annotate(f"n={s.n}", (x, s.mean * scale), xytext=(4, 4), textcoords="offset points",
                        fontsize=6, color=method_color(method))


def _adam_line(ax, comp: Comparison, lines, getter, scale):
    """adam's reference row (same seeds): a dashed line at its mean, its 95% interval shaded."""
    seen = set()
    for first, _ in lines:
        a = comp.adam_for(first)
        if a is None or id(a) in seen:
            continue
        s = getter(a)
        if s is not None:
            seen.add(id(a))
            ax.axhline(s.mean * scale, color=method_color("adam"), linestyle="--", linewidth=1,
                       label=f"adam (full rank, reference; n={s.n})")
            if s.half is not None:
                ax.axhspan((s.mean - s.half) * scale, (s.mean + s.half) * scale, color=method_color("adam"),
                           alpha=0.08, linewidth=0)


def _stat_title(comp: Comparison) -> str:
    return f"mean ± 95% t-interval over {comp.seeds_caption}"


def rank_ablation(comps: list[Comparison], out: Path) -> dict[tuple, list[Path]]:
    produced = {}
    for comp in comps:
        lines = comp.sweeps.get("rank") or []
        if not lines:
            continue
        suite, profile = comp.suite, comp.profile
        pts_all = [g for _, pts in lines for g in pts]
        names = corpora(pts_all)
        metrics = panel_metrics(pts_all, comp.headline())
        npan = len(metrics) + 1
        fig, axes = plt.subplots(1, npan, figsize=(4.3 * npan, 3.8), squeeze=False)
        axes = axes[0]
        labels = _labels([first.full for first, _ in lines], ignore=("rank",))
        ranks = sorted({g.config["rank"] for g in pts_all})
        for ax, m in zip(axes, metrics, strict=False):
            for first, pts in lines:
                _errorbar(ax, [g.config["rank"] for g in pts], [g.stat("metrics", m) for g in pts],
                          metric_scale(m), first.method, labels[id(first.full)])
            _adam_line(ax, comp, lines, lambda a, m=m: a.stat("metrics", m), metric_scale(m))
            ax.set_ylabel(_wrap(metric_label(m, names)))
        peaks = [v for g in pts_all for v in g.values("memory", "peak_bytes")]
        unit, div = memory_unit(max(peaks, default=0))
        ax = axes[-1]
        for first, pts in lines:
            _errorbar(ax, [g.config["rank"] for g in pts], [g.stat("memory", "peak_bytes") for g in pts],
                      1.0 / div, first.method, labels[id(first.full)])
        _adam_line(ax, comp, lines, lambda a: a.stat("memory", "peak_bytes"), 1.0 / div)
        sources = sorted({s for g in pts_all for s in g.sources()})
        ax.set_ylabel(f"peak memory ({unit}, {'/'.join(sources)})")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)  # memory is a size: zero on the axis so ratios read right
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(ranks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(r) for r in ranks])
            ax.set_xlabel("rank r")
        _legend_below(fig, axes)
        _suptitle(fig, f"Rank ablation: {suite} ({profile} profile); {_stat_title(comp)}")
        fig.tight_layout(rect=(0, 0.1, 1, 0.93))
        produced[(suite, profile)] = save(fig, out, f"fig3_rank_ablation_{suite}_{profile}", pts_all)
    return produced


def _wrap(label: str, width: int = 42) -> str:
    """Long axis labels (corpus names) on two lines."""
    if len(label) <= width:
        return label
    cut = label.rfind(" ", 0, width)
    return label if cut < 0 else label[:cut] + "\n" + label[cut + 1:]


def _legend_below(fig, axes):
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=False):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 3),
               frameon=False)


def _stable_span(pts: list[Group], metric: str, higher_better: bool):
    """Contiguous run of subspace_lr values around the best point where every seed finished `ok`."""
    ok = [all(r.ok for r in g.runs) and g.stat("metrics", metric) is not None for g in pts]
    if not any(ok):
        return None
    vals = [g.stat("metrics", metric).mean if o else None for g, o in zip(pts, ok, strict=False)]
    best = max((i for i in range(len(pts)) if ok[i]), key=lambda i: vals[i] if higher_better else -vals[i])
    lo = hi = best
    while lo > 0 and ok[lo - 1]:
        lo -= 1
    while hi < len(pts) - 1 and ok[hi + 1]:
        hi += 1
    return pts[lo].config["subspace_lr"], pts[hi].config["subspace_lr"]


def subspace_lr_ablation(comps: list[Comparison], out: Path) -> dict[tuple, list[Path]]:
    produced = {}
    for comp in comps:
        lines = comp.sweeps.get("subspace_lr") or []
        if not lines:
            continue
        suite, profile = comp.suite, comp.profile
        pts_all = [g for _, pts in lines for g in pts]
        names = corpora(pts_all)
        metrics = panel_metrics(pts_all, comp.headline())
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
        axes = axes[0]
        labels = _labels([first.full for first, _ in lines], ignore=("subspace_lr",))
        for ax, m in zip(axes, metrics, strict=False):
            all_x = []
            higher = metric_style(m).higher_is_better
            for first, pts in lines:
                color = method_color(first.method)
                label = labels[id(first.full)]
                xs = [g.config["subspace_lr"] for g in pts]
                _errorbar(ax, xs, [g.stat("metrics", m) if all(r.ok for r in g.runs) else None for g in pts],
                          metric_scale(m), first.method, label)
                span = _stable_span(pts, m, higher)
                if span:
                    ax.axvspan(span[0], span[1], color=color, alpha=0.08, linewidth=0,
                               label=f"{label}: stable (all seeds ok), η {span[0]:g} – {span[1]:g}")
                failed = [g.config["subspace_lr"] for g in pts if any(not r.ok for r in g.runs)]
                if failed:
                    ax.scatter(failed, [0.93] * len(failed), transform=ax.get_xaxis_transform(), marker="x",
                               color=color, s=45, label=f"{label}: diverged / failed on a seed (no mean)")
                all_x += xs
            _adam_line(ax, comp, lines, lambda a, m=m: a.stat("metrics", m), metric_scale(m))
            ax.set_xscale("log")
            pos = [x for x in all_x if x > 0]
            ax.set_xlim(min(pos) / 2.5, max(pos) * 2.5)  # failed points are drawn in axes coordinates
            ax.set_xlabel("subspace learning rate η (log scale)")
            ax.set_ylabel(_wrap(metric_label(m, names)))
        _legend_below(fig, axes)
        _suptitle(fig, f"Subspace learning-rate ablation: {suite} ({profile} profile); {_stat_title(comp)}; "
                       "shaded = stable range")
        fig.tight_layout(rect=(0, 0.12, 1, 0.93))
        produced[(suite, profile)] = save(fig, out, f"fig4_subspace_lr_{suite}_{profile}", pts_all)
    return produced


# --- figures 5 and 6: curves over steps ------------------------------------------------------------


def mean_series(g: Group, *keys, col: int = 1) -> tuple[list[float], list[Stat]]:
    """Per step, mean and 95% interval over the ok seeds of a recorded series ([[step, v, ...], ...] at
    `keys`); only steps every seed recorded (non-null) are kept."""
    per_seed = []
    for r in g.ok_runs:
        series = r.get(*keys)
        if not isinstance(series, list):
            continue
        pts = {}
        for row in series:
            if isinstance(row, (list, tuple)) and len(row) > col and isinstance(row[col], (int, float)) \
                    and math.isfinite(row[col]):
                pts[row[0]] = float(row[col])
        if pts:
            per_seed.append(pts)
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    return steps, [Stat.of([p[s] for p in per_seed]) for s in steps]


def _band(ax, steps, stats, color, label, **kw):
    ys = [s.mean for s in stats]
    ax.plot(steps, ys, color=color, label=label, **kw)
    if any(s.half is not None for s in stats):
        lo = [s.mean - (s.half or 0) for s in stats]
        hi = [s.mean + (s.half or 0) for s in stats]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)


def _series_n(g: Group, *keys) -> int:
    return sum(1 for r in g.ok_runs if isinstance(r.get(*keys), list) and r.get(*keys))


def loss_curves(comps: list[Comparison], out: Path) -> dict[tuple, list[Path]]:
    """Training loss per step (mean, 95% band over seeds); validation loss where recorded: its own panel
    when it was evaluated several times, else markers on the training panel (e.g. one final evaluation)."""
    produced = {}
    for comp in comps:
        suite, profile = comp.suite, comp.profile
        ref = [g for g in comp.rows if g.method in CURVE_METHODS and mean_series(g, "curve")[0]]
        if not ref:
            continue
        ref.sort(key=lambda g: (CURVE_METHODS.index(g.method), g.key))
        evals = {id(g): mean_series(g, "curve", col=2) for g in ref}
        n_eval = max(len(steps) for steps, _ in evals.values())
        split = n_eval >= 3
        fig, axes = plt.subplots(1, 2 if split else 1, figsize=(10 if split else 6, 3.8), squeeze=False)
        axes = axes[0]
        labels = _labels([g.full for g in ref])
        widths = [1.3, 0.8, 2.0, 0.5]  # several configs of one method: same colour and style, other width
        count = defaultdict(int)
        for g in ref:
            ls = method_linestyle(g.method)
            lw = widths[count[g.method] % len(widths)]
            count[g.method] += 1
            label = f"{labels[id(g.full)]} (n={_series_n(g, 'curve')})"
            steps, stats = mean_series(g, "curve", col=1)
            _band(axes[0], steps, stats, method_color(g.method), label, linewidth=lw, linestyle=ls,
                  zorder=3 if ls != "-" else 2)  # dashed lines on top: visible where they coincide
            steps, stats = evals[id(g)]
            if steps:
                ax = axes[1] if split else axes[0]
                ax.errorbar(steps, [s.mean for s in stats], yerr=[s.half or 0.0 for s in stats],
                            color=method_color(g.method), linestyle=ls if split else "none", capsize=3,
                            label=None if not split else label, **method_marker(g.method))
        axes[0].set_ylabel("training loss (nats/token)")
        axes[0].set_title("training loss per step (mean, 95% band)")
        handles, names = axes[0].get_legend_handles_labels()
        if n_eval and not split:
            handles.append(Line2D([], [], color="#555555", marker="o", linestyle="none"))
            names.append("validation loss (markers, 95% CI)")
        axes[0].legend(handles, names)
        if split:
            axes[1].set_ylabel("validation loss (nats/token)")
            axes[1].set_title("validation loss")
            axes[1].legend()
        for ax in axes:
            ax.set_xlabel("optimizer step")
        _suptitle(fig, f"Loss curves: {suite} ({profile} profile), reference configurations, "
                       f"{comp.seeds_caption}")
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        produced[(suite, profile)] = save(fig, out, f"fig5_loss_curves_{suite}_{profile}", ref)
    return produced


def subspace_drift(comps: list[Comparison], out: Path) -> dict[tuple, list[Path]]:
    produced = {}
    for comp in comps:
        suite, profile = comp.suite, comp.profile
        ref = [g for g in comp.rows if g.method in DRIFT_METHODS and mean_series(g, "subspace", "drift")[0]]
        if not ref:
            continue
        fig, ax = plt.subplots(figsize=(7, 3.8))
        labels = _labels([g.full for g in ref])
        all_vals = []
        for g in sorted(ref, key=lambda g: DRIFT_METHODS.index(g.method)):
            steps, stats = mean_series(g, "subspace", "drift")
            color = method_color(g.method)
            label = f"{labels[id(g.full)]} (n={_series_n(g, 'subspace', 'drift')})"
            moved = [(s, st) for s, st in zip(steps, stats, strict=False) if st.mean > 0]
            all_vals += [st.mean for _, st in moved]
            nonzero_fraction = len(moved) / len(steps)
            if nonzero_fraction >= 0.5:  # moves (almost) every step: a line
                _band(ax, [s for s, _ in moved], [st for _, st in moved], color, label, linewidth=1.2)
            else:  # moves at refresh steps only: jumps
                for s, _ in moved:
                    ax.axvline(s, color=color, alpha=0.25, linewidth=0.8, linestyle=":")
                _errorbar(ax, [s for s, _ in moved], [st for _, st in moved], 1.0, g.method,
                          f"{labels[id(g.full)]}: basis refresh (dotted lines)", linestyle="none")
        if spans_decades(all_vals):
            ax.set_yscale("log")
            ax.set_ylim(min(all_vals) / 2, max(all_vals) * 2.5)
            ax.annotate("steps without movement (drift 0) are not drawn on the log axis",
                        xy=(0.01, 0.02), xycoords="axes fraction", fontsize=7, color="#555555")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("subspace drift per step (rad)\nlargest principal angle, mean over bases")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(ref), frameon=False)
        _suptitle(fig, f"Subspace drift: {suite} ({profile} profile); mean, 95% band over "
                       f"{comp.seeds_caption}")
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        produced[(suite, profile)] = save(fig, out, f"fig6_subspace_drift_{suite}_{profile}", ref)
    return produced


TRACKING_METHODS = ("oasis", "pca", "oasis-frozen", "compact")  # bases of layer inputs (measure.tracking)
TRACKING_VARIED = ("subspace_lr", "refresh_every")  # each eta of oasis, each period of pca: one line each
TRACKING_PANELS = (("captured", "captured variance ‖XU‖² / ‖XU*‖²\n(1 = the exact top-r basis)"),
                   ("overlap_init", "net overlap with the initial basis\n‖U₀ᵀU‖² / r"))


def tracking_series(g: Group, score: str, role: str = "mean") -> tuple[list, list[Stat]]:
    """Per diagnostic step, mean and 95% interval over the group's ok seeds of `score` in the records'
    `subspace.tracking` rows of `role` (steps every seed measured)."""
    per_seed = []
    for r in g.ok_runs:
        rows = r.get("subspace", "tracking")
        if isinstance(rows, list):
            pts = {row["step"]: row[score] for row in rows
                   if isinstance(row, dict) and row.get("role") == role
                   and isinstance(row.get(score), (int, float))}
            if pts:
                per_seed.append(pts)
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    return steps, [Stat.of([p[s] for p in per_seed]) for s in steps]


def tracking_groups(comp: Comparison) -> list[Group]:
    """The groups the tracking figure draws: per method in TRACKING_METHODS, its main-table row and every
    group that differs from it only in TRACKING_VARIED keys (oasis at each subspace_lr, pca at each
    period), restricted to the seeds each has; only groups whose records carry the diagnostic."""
    out = []
    for ref in comp.rows:
        if ref.method not in TRACKING_METHODS:
            continue
        def fixed(config):
            return {k: v for k, v in config.items() if k not in TRACKING_VARIED}

        for g in comp.groups:
            if g.method == ref.method and fixed(g.config) == fixed(ref.config) \
                    and tracking_series(g, "captured")[0]:
                out.append(g)
    return sorted(out, key=lambda g: (TRACKING_METHODS.index(g.method),
                                      [g.config.get(k) or 0 for k in TRACKING_VARIED]))


def tracking_quality(comps: list[Comparison], out: Path) -> dict[tuple, list[Path]]:
    """The tracking diagnostic over training: captured variance against the exact top-r eigenbasis of the
    current activations, and net overlap with the initial basis, mean over bases (layer roles) and seeds."""
    produced = {}
    for comp in comps:
        groups = tracking_groups(comp)
        if not groups:
            continue
        fig, axes = plt.subplots(1, len(TRACKING_PANELS), figsize=(11, 3.9), squeeze=False)
        labels = _labels(groups, ignore=("rank",))
        widths = [1.0, 1.6, 2.2, 0.6, 2.8]
        count = defaultdict(int)
        for g in groups:
            lw = widths[count[g.method] % len(widths)]
            count[g.method] += 1
            label = f"{labels[id(g)]} (n={len(g.seeds)})"
            for ax, (score, _) in zip(axes[0], TRACKING_PANELS, strict=True):
                steps, stats = tracking_series(g, score)
                _band(ax, steps, stats, method_color(g.method), label, linewidth=lw,
                      linestyle=method_linestyle(g.method), marker=METHOD_MARKERS.get(g.method, "o"),
                      markersize=3)
        for ax, (_, ylabel) in zip(axes[0], TRACKING_PANELS, strict=True):
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_ylim(0, 1.05)
        _legend_below(fig, axes[0])
        _suptitle(fig, f"Tracking quality: {comp.suite} ({comp.profile} profile), held-out batch, "
                       "mean over layer roles; 95% band over seeds")
        fig.tight_layout(rect=(0, 0.12, 1, 0.93))
        produced[(comp.suite, comp.profile)] = save(fig, out, f"fig7_tracking_{comp.suite}_{comp.profile}",
                                                    groups)
    return produced
