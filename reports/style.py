"""One colour per method, used by every figure; metric and unit formatting shared by tables and figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

from reports.stats import Stat

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


METHOD_LINESTYLES = {"pca": "--", "compact": ":", "oasis-notransport": "-.", "oasis-frozen": ":"}


def method_linestyle(method: str) -> str:
    """Dashed for the periodic-PCA baseline etc., so a line exactly under OASIS's stays visible."""
    return METHOD_LINESTYLES.get(method, "-")


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


@dataclass(frozen=True)
class MetricStyle:
    label: str                     # axis label / column header, with unit
    scale: float = 1.0             # display = recorded * scale (fractions shown in %)
    decimals: int = 3
    higher_is_better: bool = False
    shown: bool = True  # a Markdown/LaTeX column and figure-panel candidate (the CSV keeps every metric)


# Names as the suites record them (suites/evaluate/tasks/*.py). Accuracy-type metrics are recorded as
# fractions (lm-eval convention) and shown in percent. Order = column / panel order. Labels say what was
# measured on what: the c4 suite's held-out loss is labelled with the recorded corpora (see metric_label), and
# its C4 sample is C4 *train*-split documents the run never trained on, never "C4 validation".
C4_SAMPLE = "C4 sample (1,000 train-split docs, never trained on)"
METRICS = {
    "accuracy": MetricStyle("GSM8K accuracy, strict match (%)", 100.0, 2, True),
    "final_answer_acc_tf": MetricStyle("final-answer accuracy, teacher-forced (%)", 100.0, 2, True),
    "pass@1": MetricStyle("HumanEval pass@1 (%)", 100.0, 2, True),
    "answer_nll": MetricStyle("answer NLL (nats/token)"),
    "canonical_nll": MetricStyle("canonical-solution NLL (nats/token)"),
    "eval_loss": MetricStyle("held-out loss (nats/token)"),
    "c4_sample_loss": MetricStyle(f"loss on the {C4_SAMPLE} (nats/token)"),
    "c4_eval_loss": MetricStyle("loss on a C4 train-split sample, recorded as c4_eval_loss; "
                                "not C4 validation (nats/token)"),
    "val_loss": MetricStyle("validation-slice loss, chooses the learning rate (nats/token)"),
    "eval_ppl": MetricStyle("held-out perplexity", decimals=2, shown=False),
    # the unigram reference (suites/train/unigram.py): shown as its own row under the metric it refers to
    "unigram_eval_loss": MetricStyle("unigram reference of the held-out loss", shown=False),
    "unigram_c4_sample_loss": MetricStyle("unigram reference on the C4 sample", shown=False),
    "unigram_val_loss": MetricStyle("unigram reference on the validation slice", shown=False),
    "unigram_answer_nll": MetricStyle("unigram reference of the answer NLL", shown=False),
    "c4_sample_ppl": MetricStyle(f"perplexity on the {C4_SAMPLE}", decimals=2, shown=False),
    "c4_eval_ppl": MetricStyle("perplexity on a C4 train-split sample (c4_eval_ppl)", decimals=2,
                               shown=False),
    "accuracy_flexible": MetricStyle("GSM8K accuracy, flexible extract (%)", 100.0, 2, True, shown=False),
    "answer_ppl": MetricStyle("answer perplexity", decimals=2, shown=False),
    "canonical_ppl": MetricStyle("canonical-solution perplexity", decimals=2, shown=False),
}
METRIC_ORDER = tuple(METRICS)
# Sizes and limits of the evaluation, not quality: reported under "evaluated on", never as a metric.
# gen_ceiling: share of reference solutions that fit in max_gen_toks (no model can score above it).
EVAL_SIZES = {"eval_problems": "problems", "eval_tokens": "tokens", "gen_ceiling": "generation ceiling",
              "passed": None}
HELD_OUT = ("eval_loss", "eval_ppl")  # labelled with config.train_corpus / config.eval_corpus


# metric -> the record's unigram reference of it (the same tokens scored by an add-1/2 unigram model of the
# run's own training tokens): the "unigram" row of the quality tables
UNIGRAM_OF = {"eval_loss": "unigram_eval_loss", "c4_sample_loss": "unigram_c4_sample_loss",
              "val_loss": "unigram_val_loss", "answer_nll": "unigram_answer_nll"}


def metric_style(name: str) -> MetricStyle:
    return METRICS.get(name) or MetricStyle(name)


def metric_label(name: str, corpora: tuple | None = None) -> str:
    """Column / axis label. `corpora` = (train_corpus, eval_corpus) as recorded in the configs, for the
    held-out loss ("held-out loss on wikipedia-en validation (trained on wikipedia-en train)")."""
    label = metric_style(name).label
    if name in HELD_OUT and corpora and corpora[1]:
        what = "loss" if name == "eval_loss" else "perplexity"
        trained = f", trained on {corpora[0]}" if corpora[0] else ""
        unit = " (nats/token)" if name == "eval_loss" else ""
        label = f"held-out {what} on {corpora[1]}{trained}{unit}"
    return label


def metric_scale(name: str) -> float:
    return metric_style(name).scale


def ordered_metrics(names, shown_only: bool = False) -> list[str]:
    names = set(names) - set(EVAL_SIZES)
    if shown_only:
        names = {n for n in names if metric_style(n).shown}
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def fmt_stat(stat: Stat | None, decimals: int, scale: float = 1.0) -> str:
    """'mean ± h' (h = half-width of the 95% t-interval over seeds), or just 'mean' for one seed; '–' when
    nothing recorded."""
    if stat is None:
        return "–"
    s = f"{stat.mean * scale:.{decimals}f}"
    if stat.half is not None:
        s += f" ± {stat.half * scale:.{decimals}f}"
    return s


DAGGER = "†"  # the paired 95% interval excludes zero


def _signed(v: float, decimals: int) -> str:
    return f"{v:+.{decimals}f}".replace("-", "−")


def fmt_diff(name: str, d: Stat | None) -> str:
    """Paired difference vs adam: '+0.041 [+0.030, +0.052] †', or '+0.041 (n=1)'; '–' when none."""
    if d is None:
        return "–"
    style = metric_style(name)
    k, sc = style.decimals, style.scale
    if d.half is None:
        return f"{_signed(d.mean * sc, k)} (n={d.n})"
    mark = f" {DAGGER}" if d.excludes_zero else ""
    return f"{_signed(d.mean * sc, k)} [{_signed(d.low * sc, k)}, {_signed(d.high * sc, k)}]{mark}"


def fmt_metric(name: str, stat: Stat | None) -> str:
    style = metric_style(name)
    return fmt_stat(stat, style.decimals, style.scale)


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
