"""Gradient accumulation in the recipe: k micro-batches of one step equal one batch holding them all.

The reference is the same recipe step given one batch (the micro-batches concatenated), in float64 weights, so
the only difference between the two runs is the accumulation itself (transformers computes the loss from
float32 logits: Adam turns that rounding into weight differences of about 2e-5 after four steps of lr
1e-2, which sets the tolerance; weighting micro-batches 1/k instead of by tokens moves them by far more).
One micro-batch has fewer supervised
tokens than the other (labels -100 on part of it), so a plain 1/k weighting would not be equal.
"""

import pytest
import torch

from suites.core.registry import build_method, method_defaults
from suites.launch import recipe
from suites.train.models import build_model, llama_config

STEPS = 4


def _micro_batches(vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for masked in (0, 9):  # the second micro-batch supervises 9 tokens fewer per row
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        labels = ids.clone()
        if masked:
            labels[:, :masked] = -100  # a prompt that is not supervised (answer-only loss)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _concatenated(micro: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in micro]) for k in micro[0]}


def _session(method: str, extra: dict) -> recipe.Session:
    config = llama_config("llama-tiny")
    model = build_model(config, dtype=torch.float64, seed=0)
    cfg = {**method_defaults(method), "lr": 1e-2, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
           "rank": 8, "seed": 0, **extra}
    model, optimizer = build_method(method, model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return recipe.Session({"device": "cpu"}, None, None, [], model, optimizer, scheduler, meter=None)


@pytest.mark.parametrize("method, extra", [
    ("adam", {}),
    # a data-free start: the default PCA start reads the first forward's batch, which is the first
    # micro-batch with accumulation and the whole batch without
    ("oasis", {"init": "random"}),
])
def test_k_micro_batches_equal_one_batch_of_all(method, extra, one_thread):
    vocab = llama_config("llama-tiny").vocab_size
    accumulated, whole = _session(method, extra), _session(method, extra)
    for step in range(STEPS):
        micro = _micro_batches(vocab, seed=step)
        loss_acc = recipe.optimizer_step(accumulated, step, micro)
        loss_one = recipe.optimizer_step(whole, step, [_concatenated(micro)])
        assert loss_acc == pytest.approx(loss_one, rel=1e-6)
    for (name, a), b in zip(accumulated.model.state_dict().items(), whole.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=name)
    if method == "oasis":
        bases_acc = [t.basis for t in accumulated.optimizer._trackers]
        bases_one = [t.basis for t in whole.optimizer._trackers]
        assert len(bases_acc) > 0
        for a, b in zip(bases_acc, bases_one):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_supervised_tokens_counts_shifted_labels_that_are_not_ignored():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, 9]])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels}
    assert recipe.supervised_tokens(batch) == 2 + 2  # positions 1..3 of each row: (6, 7) and (8, 9)


def test_step_batches_gives_each_step_its_own_consecutive_micro_batches():
    batches = [{"input_ids": torch.tensor([[i]])} for i in range(6)]
    session = recipe.Session({"device": "cpu", "grad_accum": 3}, None, None, batches, None, None, None, None)
    assert [int(b["input_ids"]) for b in recipe.step_batches(session, 1)] == [3, 4, 5]
    assert [int(b["input_ids"]) for b in recipe.step_batches(session, 2)] == [0, 1, 2]  # cycled
