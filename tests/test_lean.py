"""Lean activations: same forward values, same gradients, fewer saved bytes."""

import copy

import pytest
import torch

from suites.train.lean import apply_lean_activations
from suites.train.models import build_model, llama_config


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_llama_matches_and_saves_less(dtype):
    # a small vocabulary, so that the blocks' activations, not the logits, dominate what is saved
    ref = build_model(llama_config("llama-tiny", vocab_size=128), dtype=dtype)
    lean = copy.deepcopy(ref)
    assert apply_lean_activations(lean) == 2 * 2 + 1 + 2  # 2 norms per block + final norm, 1 MLP per block
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_bytes, ref_loss = _saved_bytes(lambda: ref(input_ids=ids, labels=ids).loss)
    lean_bytes, lean_loss = _saved_bytes(lambda: lean(input_ids=ids, labels=ids).loss)
    assert torch.equal(ref_loss, lean_loss)
    ref_loss.backward()
    lean_loss.backward()
    for (name, p), q in zip(ref.named_parameters(), lean.parameters()):
        tol = dict(rtol=2e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(q.grad, p.grad, msg=name, **tol)
    assert lean_bytes < ref_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_modules_save_exactly_what_backward_needs(dtype):
    model = build_model(llama_config("llama-tiny", vocab_size=128), dtype=dtype)
    block = model.model.layers[0]
    n_tok, hidden, inter = 64, block.mlp.hidden_size, block.mlp.intermediate_size
    item = torch.finfo(dtype).bits // 8
    x = torch.randn(1, n_tok, hidden, dtype=dtype, requires_grad=True)
    norm, mlp = block.input_layernorm, block.mlp
    hf_norm, _ = _saved_bytes(lambda: norm(x))
    hf_mlp, _ = _saved_bytes(lambda: mlp(x))
    apply_lean_activations(block)
    lean_norm, _ = _saved_bytes(lambda: norm(x))
    lean_mlp, _ = _saved_bytes(lambda: mlp(x))
    # lean norm: the input and one float32 1/rms per token; HF: a float32 copy and the normalised output too
    assert lean_norm == n_tok * hidden * item + n_tok * 4
    assert hf_norm >= n_tok * hidden * (4 + item)
    # lean MLP: one d_ff-wide tensor fewer, SiLU(gate) is recomputed
    assert hf_mlp - lean_mlp == n_tok * inter * item
