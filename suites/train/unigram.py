"""The unigram reference of a run: what a model that learnt only token frequencies scores.

An add-½ smoothed unigram model of the run's own training targets (every labelled next-token position of
its training batches, as the loss sees them), p(t) = (c_t + ½) / (N + ½V) over the tokenizer's V ids,
scored by the mean NLL (nats per token) of the labelled targets of the evaluation batches. A trained model
that does not beat it has learnt token frequencies and nothing else (issue 20); the suites record it in
every record's metrics (`unigram_*`), and reports show it as a row beside step 0.
"""

from __future__ import annotations

import torch

from suites.train.data import IGNORE

SMOOTHING = 0.5


def targets(batch: dict) -> torch.Tensor:
    """The next-token targets a causal-LM loss scores: labels (HF, unshifted) after the shift, minus -100."""
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    keep = labels != IGNORE
    if "labels" not in batch:
        keep &= batch["attention_mask"][:, 1:].bool()
    return labels[keep].long()


def counts(batches, vocab_size: int) -> torch.Tensor:
    total = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in batches:
        total += torch.bincount(targets(batch), minlength=vocab_size)[:vocab_size].double()
    return total


def unigram_nll(train_batches, eval_batches, vocab_size: int, smoothing: float = SMOOTHING) -> float:
    """Mean NLL (nats/token) of the eval targets under the smoothed unigram of the train targets."""
    c = counts(train_batches, vocab_size)
    log_p = torch.log((c + smoothing) / (c.sum() + smoothing * vocab_size))
    scored = torch.cat([targets(b) for b in eval_batches])
    if scored.numel() == 0:
        raise ValueError("no labelled evaluation tokens to score the unigram reference on")
    return float(-log_p[scored].mean())


def vocab_size(tokenizer) -> int:
    return len(tokenizer)
