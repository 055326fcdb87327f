"""One colour per method, used by every figure; metric and unit formatting shared by tables and figures."""

from __future__ import annotations

import math

from reports.load import Stat

# The single colour table (colour-blind-friendly Okabe-Ito / tab10 mix). Variants of a method share its hue.
METHOD_COLORS = {
    "adam": "#222222",
    "adam8bit": "#888888",
    "lora": "#0072B2",
    "galore": "#009E73",
    "galore8bit": "#7FCDB9",
    "ldadam": "#8E44AD",
    "pca": "#E69F00",
    "compact": "#8C564B",
    "oasis": "#D55E00",
    "oasis-notransport": "#F4A582",
    "oasis-frozen": "#CC79A7",
}
_SPARE = ("#17BECF", "#BCBD22", "#7F7F7F", "#1F77B4", "#9467BD")

# Markers keep methods apart where their lines coincide (pca and oasis share the compressed layer, so
# their memory often matches exactly): hollow markers for the baseline drawn under OASIS.
METHOD_MARKERS = {"adam": "s", "adam8bit": "s", "lora": "o", "galore": "^", "galore8bit": "^", "ldadam": "v",
                  "pca": "D", "compact": "P", "oasis": "o", "oasis-notransport": "X", "oasis-frozen": "*"}
HOLLOW = ("pca", "compact", "galore8bit", "adam8bit")


def method_marker(method: str) -> dict:
    """Matplotlib marker keywords for a method (same in every figure)."""
    kw = {"marker": METHOD_MARKERS.get(method, "o"), "markersize": 7 if method in HOLLOW else 4}
    if method in HOLLOW:
        kw["markerfacecolor"] = "none"
    return kw


CATEGORY_COLORS = {  # memory breakdown categories (stacked bars)
    "params": "#4C72B0",
    "grads": "#DD8452",
    "optimizer": "#55A868",
    "activations": "#C44E52",
    "other": "#B0B0B0",
}


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE[sum(map(ord, method)) % len(_SPARE)]  # stable across runs (no hash randomisation)


# How each metric is shown: (label with unit, scale applied for display, decimals, higher_is_better).
# Accuracy-type metrics are recorded as fractions (lm-eval convention) and shown in percent.
METRICS = {
    "accuracy": ("GSM8K accuracy (%)", 100.0, 2, True),
    "pass@1": ("HumanEval pass@1 (%)", 100.0, 2, True),
    "eval_loss": ("validation loss (nats/token)", 1.0, 3, False),
    "eval_ppl": ("validation perplexity", 1.0, 2, False),
    "answer_nll": ("answer NLL (nats/token)", 1.0, 3, False),
    "solution_nll": ("solution NLL (nats/token)", 1.0, 3, False),
    "nll": ("NLL (nats/token)", 1.0, 3, False),
}
METRIC_ORDER = tuple(METRICS)


def metric_label(name: str) -> str:
    return METRICS.get(name, (name, 1.0, 3, False))[0]


def metric_scale(name: str) -> float:
    return METRICS.get(name, (name, 1.0, 3, False))[1]


def ordered_metrics(names) -> list[str]:
    names = set(names)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def fmt_stat(stat: Stat | None, decimals: int, scale: float = 1.0) -> str:
    """'mean ± std' (sample std over seeds), or just 'mean' for one seed; '–' when nothing recorded."""
    if stat is None:
        return "–"
    s = f"{stat.mean * scale:.{decimals}f}"
    if stat.std is not None:
        s += f" ± {stat.std * scale:.{decimals}f}"
    return s


def fmt_metric(name: str, stat: Stat | None) -> str:
    _, scale, decimals, _ = METRICS.get(name, (name, 1.0, 3, False))
    return fmt_stat(stat, decimals, scale)


MIB, GIB = 2**20, 2**30


def memory_unit(max_bytes: float) -> tuple[str, float]:
    """GiB when the largest value reaches 1 GiB, otherwise MiB (binary units, as torch reports)."""
    return ("GiB", GIB) if max_bytes >= GIB else ("MiB", MIB)


def fmt_bytes(stat: Stat | None, unit: tuple[str, float]) -> str:
    decimals = 2 if unit[0] == "GiB" else 1
    return fmt_stat(stat, decimals, 1.0 / unit[1])


def fmt_rate(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    return fmt_stat(stat, 0 if stat.mean >= 100 else 1)


def spans_decades(values, decades: float = 1.0) -> bool:
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and math.log10(max(pos) / min(pos)) >= decades
