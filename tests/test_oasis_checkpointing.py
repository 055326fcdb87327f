"""OASIS under Hugging Face non-reentrant activation checkpointing: the forward recomputed in backward neither
adds statistics nor initialises or moves a basis nor stores a second projection, so gradients, statistics and
bases equal the run without checkpointing."""

from __future__ import annotations

import pytest
import torch

import oasis.linear
from oasis import OasisConfig, prepare
from suites.train.models import build_model, llama_config

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128


def _run(checkpointing: bool, steps: int = 3, micro_batches: int = 2):
    model = build_model(llama_config("llama-tiny", vocab_size=VOCAB), dtype=torch.float64, seed=0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = prepare(model, OasisConfig(rank=4, subspace_lr=0.5, init="pca"), lr=1e-2)
    layers = [m for m in model.modules() if isinstance(m, oasis.CompressedLinear)]
    calls = {"forward": 0, "recompute": 0}
    for tracker in opt.trackers:
        project = tracker.project

        def counted(x2d, *, project=project, **kwargs):
            calls["recompute" if kwargs.get("recompute") else "forward"] += 1
            return project(x2d, **kwargs)

        tracker.project = counted
    gen = torch.Generator().manual_seed(0)
    record = []
    for _ in range(steps):
        for _ in range(micro_batches):
            ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
        assert all(layer.shared._z is None for layer in layers)  # no projection outlives its backward
        grads = [layer.grad_carrier.grad.clone() for layer in layers]
        stats = [[s.clone() for s in t.stats] for t in opt.trackers]
        opt.step()
        opt.zero_grad()
        record.append((grads, stats, [t.basis.clone() for t in opt.trackers]))
    return record, calls, len(opt.trackers)


def _same(a, b):
    for (ga, sa, ba), (gb, sb, bb) in zip(a, b, strict=True):
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        for xs, ys in zip(sa, sb, strict=True):
            for x, y in zip(xs, ys, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        for x, y in zip(ba, bb, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_checkpointed_run_equals_the_plain_run():
    plain, plain_calls, trackers = _run(checkpointing=False)
    ckpt, ckpt_calls, _ = _run(checkpointing=True)
    _same(plain, ckpt)
    assert plain_calls == {"forward": 3 * 2 * trackers, "recompute": 0}
    # one recomputation per forward and per basis: q/k/v and gate/up still share one recomputed projection
    assert ckpt_calls == {"forward": 3 * 2 * trackers, "recompute": 3 * 2 * trackers}


def test_a_recompute_that_accumulates_statistics_breaks_the_equality(monkeypatch):
    """The mutant the test above must catch: the layer no longer recognises a recomputation."""
    plain, _, _ = _run(checkpointing=False, steps=1)
    monkeypatch.setattr(oasis.linear, "in_backward", lambda: False)
    ckpt, _, _ = _run(checkpointing=True, steps=1)
    with pytest.raises(AssertionError):
        _same(plain, ckpt)


def test_reentrant_checkpointing_is_refused_in_one_line():
    model = build_model(llama_config("llama-tiny", vocab_size=VOCAB), seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.config.use_cache = False
    model.train()
    prepare(model, OasisConfig(rank=4))
    ids = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(RuntimeError, match="use_reentrant': False") as err:
        model(input_ids=ids, labels=ids).loss.backward()
    assert "\n" not in str(err.value)
