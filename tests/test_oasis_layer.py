"""The compressed layer's maths: exact forward and input gradient, projected weight gradient, saved bytes."""

import torch
from torch import nn

from oasis import CompressedLinear, OasisConfig, compress, orthonormalize, prepare
from oasis.linear import SharedProjection
from oasis.subspace import OjaTracker


def _layer(d_in=24, d_out=16, rank=5, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    tracker = OjaTracker("l", d_in, rank, subspace_lr=0.0, init="random")
    ref = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    ref.load_state_dict(plain.state_dict())
    return ref, CompressedLinear(plain, tracker)


def test_forward_and_input_grad_exact_weight_grad_projected():
    ref, layer = _layer()
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), layer(x2)
    assert torch.equal(y, y_ref)
    upstream = torch.randn_like(y)
    y_ref.backward(upstream)
    y.backward(upstream)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=0)
    assert layer.weight.grad is None  # no full-size weight gradient exists
    u = layer.basis.double()
    g = ref.weight.grad
    torch.testing.assert_close(layer.lowrank_grad @ u.T, g @ u @ u.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=0)


def test_lowrank_grad_accumulates_over_micro_batches_in_one_basis():
    ref, layer = _layer()
    layer.tracker.subspace_lr = 1.0  # a moving basis: it must still move at most once per step
    xs = [torch.randn(4, 24, dtype=torch.float64) for _ in range(3)]
    layer(xs[0]).sum().backward()           # initialises the basis
    layer.tracker.step()                    # as the optimizer would: the next forward may move it
    layer.lowrank_grad = None
    layer(xs[1]).sum().backward()
    basis_after_first = layer.basis.clone()
    layer(xs[2]).sum().backward()
    assert torch.equal(layer.basis, basis_after_first)
    for x in xs[1:]:
        ref(x).sum().backward()
    u = layer.basis.double()
    torch.testing.assert_close(layer.lowrank_grad, ref.weight.grad @ u, rtol=1e-10, atol=1e-12)


def _saved_bytes(fn):
    """Bytes autograd saves for backward, excluding parameters (they exist anyway), each storage once."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_saved_bytes_at_most_r_over_d_in_plus_r_squared():
    d_in, d_out, rank = 256, 128, 8
    ref, layer = _layer(d_in, d_out, rank, dtype=torch.float32)
    x = torch.randn(64, d_in, requires_grad=True)
    plain, _ = _saved_bytes(lambda: ref(x))
    comp, _ = _saved_bytes(lambda: layer(x))
    assert plain >= x.numel() * 4  # the plain layer keeps X
    assert comp <= plain * rank / d_in + 16 * rank * rank, (comp, plain)


def test_shared_inputs_store_one_projection_for_qkv():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, x):
            return self.q_proj(x) + self.k_proj(x) + self.v_proj(x)

    torch.manual_seed(0)
    block = Block()
    layers = compress(block, ("q_proj", "k_proj", "v_proj"), 4,
                      lambda n, d, r: OjaTracker(n, d, r, subspace_lr=0.1), share_inputs=True)
    assert layers[0].tracker is layers[1].tracker is layers[2].tracker
    x = torch.randn(32, 64, requires_grad=True)
    saved, out = _saved_bytes(lambda: block(x))
    assert saved == 32 * 4 * 4  # one N × r float32 projection for the three layers
    out.sum().backward()
    assert all(layer.lowrank_grad.shape == (64, 4) for layer in layers)
    # separately compressed, the same block stores three projections
    torch.manual_seed(0)
    block2 = Block()
    compress(block2, ("q_proj", "k_proj", "v_proj"), 4,
             lambda n, d, r: OjaTracker(n, d, r, subspace_lr=0.1), share_inputs=False)
    saved2, _ = _saved_bytes(lambda: block2(x))
    assert saved2 == 3 * saved


def test_shared_projection_falls_back_on_a_different_input():
    shared = SharedProjection(2)
    x, z = torch.randn(2, 3), torch.randn(2, 1)
    shared.put(x, z)
    assert shared.take(torch.randn(2, 3)) is None
    assert shared.take(x) is z and shared.take(x) is None  # dropped once every member took it


def test_no_compression_without_grad():
    ref, layer = _layer()
    x = torch.ones(2, 24, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))
    assert layer.basis is None  # eval forwards neither initialise nor move the basis


def test_rank_above_layer_size_is_a_clear_error():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    try:
        prepare(model, OasisConfig(rank=9, targets=("q_proj",)))
    except ValueError as err:
        assert "rank 9 exceeds" in str(err) and "[1, 8]" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_orthonormalize_keeps_an_orthonormal_basis_and_its_signs():
    torch.manual_seed(0)
    q0, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    q0 = q0 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # any signs
    torch.testing.assert_close(orthonormalize(q0), q0, rtol=0, atol=1e-12)
    torch.testing.assert_close(orthonormalize(3.0 * q0), q0, rtol=0, atol=1e-12)
