"""Published reference numbers (DESIGN §7), each with its citation.

These are *other people's* numbers, measured in their setups (their hardware, batch sizes, token budgets).
Reports print them beside ours, always labelled "published", and never mix them into our statistics.
Model names use our preset names (`suites/core/presets.py`) so a published entry can be matched to a record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CITATIONS = {
    "oasis": "Choudhary, Saxena, Roy. OASIS: Online Activation Subspace Learning for Memory-Efficient "
             "Training. arXiv:2604.09406, 2026.",
    "galore": "Zhao et al. GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection. "
              "ICML 2024, arXiv:2403.03507.",
    "compact": "Shamshoum, Hodos, Sieradzki, Schuster. CompAct: Compressed Activations for Memory-Efficient "
               "LLM Training. NAACL 2025, arXiv:2410.15352.",
    "prac": "Li, Zhang, Fang. PRAC: Principal-Random Subspace for LLM Activation Compression and "
            "Memory-Efficient Training. arXiv:2602.23111, 2026.",
}


@dataclass(frozen=True)
class Published:
    cite: str     # key into CITATIONS
    suite: str    # our suite name the number belongs to: "gsm8k" | "c4"
    model: str    # our preset name
    method: str   # our method name ("adam" = full-rank AdamW baseline)
    metric: str   # our metric name, or "peak_gb" for a published peak-memory number
    value: float  # as published (accuracy in %, peak in GB as the paper reports it)
    setting: str  # what the number was measured on, in words
    eval_set: str | None = None  # words our record's config.eval_corpus must contain to be comparable
                                 # (C4 validation numbers match our held-out eval_* only when the run
                                 # evaluated on C4 validation; never our C4 train-split sample)


C4_VALIDATION = "c4 validation"


def _rows(cite, suite, metric, setting, models, by_method, eval_set=None):
    return [Published(cite, suite, model, method, metric, values[i], setting, eval_set)
            for method, values in by_method.items() for i, model in enumerate(models)]


PUBLISHED: tuple[Published, ...] = tuple(
    [
        Published("oasis", "gsm8k", "llama-3.2-1b", "oasis", "accuracy", 23.78, "fine-tuning, r=32"),
        Published("oasis", "gsm8k", "llama-3.2-1b", "adam", "accuracy", 27.09, "fine-tuning, full AdamW"),
        Published("oasis", "c4", "llama-130m", "oasis", "eval_loss", 3.28,
                  "pretraining on C4, C4 validation loss", C4_VALIDATION),
        Published("oasis", "c4", "llama-130m", "adam", "eval_loss", 3.21,
                  "pretraining on C4, full AdamW, C4 validation loss", C4_VALIDATION),
    ]
    + _rows("galore", "c4", "eval_ppl", "C4 pretraining, C4 validation perplexity",
            ("llama-60m", "llama-130m", "llama-350m", "llama-1b"),
            {"adam": (34.06, 25.08, 18.80, 15.56), "galore": (34.88, 25.36, 18.95, 15.64)}, C4_VALIDATION)
    + _rows("compact", "c4", "peak_gb", "C4 pretraining, measured GPU peak (CompAct r=n/4)",
            ("llama-60m", "llama-130m", "llama-350m"),
            {"adam": (11.59, 18.66, 39.97), "galore": (11.56, 18.48, 39.24),
             "compact": (10.80, 16.78, 34.71)})
    + _rows("prac", "c4", "peak_gb", "C4 pretraining, measured GPU peak",
            ("llama-130m", "llama-350m"),
            {"adam": (21.26, 46.10), "galore": (21.08, 45.37), "prac": (15.65, 32.21)})
)

# Claims the OASIS paper states as ratios rather than as table entries (quoted, not numbers to match).
PUBLISHED_CLAIMS: tuple[tuple[str, str], ...] = (
    ("oasis", "up to 2x lower peak memory than full fine-tuning"),
    ("oasis", "30-40% lower peak memory than LoRA / GaLore / LDAdam at r=32"),
)


def comparable(p: Published, eval_corpus) -> bool:
    """Our run evaluated on the set the published number was measured on (as far as records say)."""
    if p.eval_set is None:
        return True
    words = re.split(r"[^a-z0-9]+", str(eval_corpus or "").lower())
    return all(w in words for w in p.eval_set.split())


def lookup(suite: str, model: str, method: str, metric: str, eval_corpus=None) -> list[Published]:
    """Published numbers for exactly this (suite, model, method, metric), measured on the set our run
    evaluated on (`eval_corpus`, from config.eval_corpus); empty when none exist."""
    return [p for p in PUBLISHED
            if (p.suite, p.model, p.method, p.metric) == (suite, model, method, metric)
            and comparable(p, eval_corpus)]


def for_suite(suite: str) -> list[Published]:
    return [p for p in PUBLISHED if p.suite == suite]
