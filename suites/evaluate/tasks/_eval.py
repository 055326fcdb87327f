"""Evaluation helpers shared by the suites: token-weighted NLL over labelled batches, the prompt format."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from suites.train.data import IGNORE


def prompt_format(cfg: dict) -> str:
    """How a fine-tuning suite formats prompts (`run_fields` records it; older configs lack it: plain)."""
    return cfg.get("prompt_format", "plain")


@torch.no_grad()
def scored_batches(model, batches, device):
    """Each batch with its logits, the model in eval mode meanwhile (train mode restored after)."""
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            yield batch, model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    finally:
        model.train()


def token_nll(model, batches, device) -> tuple[float, int]:
    """(sum of next-token NLL over labelled tokens, number of those tokens); labels follow HF (unshifted)."""
    total, count = 0.0, 0
    for batch, logits in scored_batches(model, batches, device):
        labels = batch["labels"].to(device)[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return total, count


def mean_nll(model, batches, device) -> float:
    total, count = token_nll(model, batches, device)
    return total / max(1, count)


def ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0))
