"""OASIS-only memory options: `compress_lm_head` and `embedding_update="backward"` (state shapes, bytes saved
as the CPU tracker measures them, equivalence where there must be one, training still works, tied weights
refused)."""

from __future__ import annotations

import math

import pytest
import torch

from oasis import CompressedLinear
from suites.core.registry import build_method, method_defaults
from suites.measure.meters import make_meter
from suites.train.models import build_model, llama_config

RANK, VOCAB, F32 = 8, 512, 4
COMMON = {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "rank": RANK, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(tied=False, **options):
    model = build_model(llama_config("llama-tiny", vocab_size=VOCAB, tie_word_embeddings=tied), seed=0)
    return build_method("oasis", model, {**method_defaults("oasis"), **COMMON, **options})


def _batch(seed=1234):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _measure(model, opt, batch):
    """(the CPU tracker's result over one step after a warm-up step, live bytes per category after it)."""
    meter = make_meter("cpu", model, opt)
    with meter:
        _step(model, opt, batch)
        meter.start_window()
        _step(model, opt, batch)
        after = meter.tracker.classify()
    return meter.result(), after


def test_compressed_lm_head_keeps_vocab_by_r_state_and_saves_the_bytes_it_should():
    batch = _batch()
    model, opt = _build(compress_lm_head=True)
    head = model.lm_head
    assert isinstance(head, CompressedLinear) and head.weight not in opt.state
    d = model.config.hidden_size
    (plain_peak, plain), (lean_peak, lean) = _measure(*_build(), batch), _measure(model, opt, batch)
    peak_plain, peak_lean = plain_peak["peak_bytes"], lean_peak["peak_bytes"]
    state = opt.state[head.grad_carrier]
    assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (VOCAB, RANK)
    assert head.basis.shape == (d, RANK)
    # moments V×d -> V×r (float32), plus one more tracker: its d×r basis and its last move's r×r rotation,
    # kept until drift is asked for
    assert plain["optimizer"] - lean["optimizer"] == 2 * VOCAB * (d - RANK) * F32 - (d * RANK * F32
                                                                                    + RANK * RANK * F32)
    # the V×d weight gradient is gone from the peak (a V×r one remains), and more (the saved input)
    assert peak_plain - peak_lean >= VOCAB * (d - RANK) * F32, (peak_plain, peak_lean)
    print(f"compress_lm_head: peak {peak_plain} -> {peak_lean} bytes (-{peak_plain - peak_lean})")


def test_compressed_lm_head_is_refused_when_tied_to_the_embedding():
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to model.embed_tokens.weight") as err:
        _build(tied=True, compress_lm_head=True)
    assert "\n" not in str(err.value)


def test_embedding_updated_in_backward_equals_the_step_update_and_frees_its_gradient():
    batches = [_batch(seed) for seed in range(4)]
    runs = []
    for mode in ("step", "backward"):
        model, opt = _build(embedding_update=mode)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # must reach its group
        embedding = model.get_input_embeddings().weight
        for batch in batches:
            before = embedding.detach().clone()
            model(**batch).loss.backward()
            if mode == "backward":
                assert embedding.grad is None  # freed inside backward
                assert not torch.equal(embedding, before)  # already updated
            opt.step()
            sched.step()
            opt.zero_grad()
        runs.append((model, opt))
    (plain, plain_opt), (model, opt) = runs
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    emb = model.get_input_embeddings().weight
    assert opt.state[emb]["step"] == 4 and opt.state[emb]["exp_avg"].shape == emb.shape


def test_embedding_update_in_backward_saves_the_embedding_gradient_at_the_peak():
    # one 4-token sequence: activations are tiny, so the peak is in the optimizer step, where every gradient
    # is alive (with long batches the peak is in forward/backward and this option does not move it)
    ids = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, _ = _measure(*_build(), batch)
    model, opt = _build(embedding_update="backward")
    lean, _ = _measure(model, opt, batch)
    embedding_grad = VOCAB * model.config.hidden_size * F32
    # the embedding's gradient is not part of the peak ...
    assert plain["breakdown"]["grads"] - lean["breakdown"]["grads"] == embedding_grad
    # ... and no temporary replaces it: its update writes the Adam direction into the dying gradient
    peak_plain, peak_lean = plain["peak_bytes"], lean["peak_bytes"]
    assert peak_plain - peak_lean > 0.95 * embedding_grad, (peak_plain, peak_lean)
    print(f"embedding_update=backward: peak {peak_plain} -> {peak_lean} bytes (-{peak_plain - peak_lean})")


def test_embedding_update_in_backward_is_refused_when_tied():
    with pytest.raises(ValueError, match="untied input embedding") as err:
        _build(tied=True, embedding_update="backward")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("options", [{"compress_lm_head": True}, {"embedding_update": "backward"},
                                     {"compress_lm_head": True, "embedding_update": "backward"}])
def test_training_still_lowers_the_loss(options):
    model, opt = _build(**options)
    batch = _batch()
    losses = [_step(model, opt, batch) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses


@pytest.mark.parametrize(("key", "value", "pattern"), [
    ("compress_lm_head", "yes", "choose from True, False"),
    ("embedding_update", "later", "choose from step, backward"),
])
def test_bad_option_values_are_one_clear_error(key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        _build(**{key: value})
