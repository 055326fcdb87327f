"""Generic memory tricks for the training step, offered to every method alike.

`causal_lm_loss(model, batch, chunk_tokens)`: the causal-LM loss without the whole batch's logits.
A model's own loss materialises the logits of every token (N × vocab in the model dtype), an fp32
copy, and the fp32 log-softmax saved for backward: at 8 × 512 tokens and a 32k vocabulary that is
about 1.3 GB, at a 128k vocabulary about 5 GB. Here the decoder's last hidden state goes through the
output layer a chunk of tokens at a time, each chunk under (non-reentrant) activation checkpointing,
so only one chunk's logits exist at once, in forward and in backward. The value and the gradients
are those of the model's own loss (mean cross-entropy over tokens whose label is not -100, labels
shifted by one); `tests/test_memory.py` checks both.

Applies to causal LMs whose logits are a plain projection of the decoder's last hidden state
(`model.get_decoder()`, `model.get_output_embeddings()`), e.g. the Llama family, also wrapped by peft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def model_loss(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """The model's own loss: `model(**batch).loss` (what the harness loop calls)."""
    return model(**batch).loss


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy, computed `chunk_tokens` tokens at a time (see module docstring)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs).last_hidden_state
    labels = batch["labels"]
    # shift the labels, not the hidden states: position t predicts token t+1, the last position nothing
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or flat.shape[0]
    total = None
    for start in range(0, flat.shape[0], chunk):
        part = checkpoint(_chunk_loss, head, flat[start:start + chunk], shifted[start:start + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / (shifted != IGNORE_INDEX).sum()
