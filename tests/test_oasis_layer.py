"""The compressed layer: exact forward and input gradient, projected weight gradient on a gradient carrier
that standard tooling sees (zero_grad, clip_grad_norm_, GradScaler), saved bytes, tied weights refused."""

import pytest
import torch
from torch import nn

from oasis import CompressedLinear, OasisAdamW, OasisConfig, compress, orthonormalize, prepare
from oasis.linear import SharedProjection
from oasis.subspace import OjaTracker

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(d_in=24, d_out=16, rank=5, dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    plain = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    tracker = OjaTracker("l", d_in, rank, subspace_lr=0.0, init="random")
    ref = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    ref.load_state_dict(plain.state_dict())
    return ref, CompressedLinear(plain, tracker)


def test_forward_and_input_grad_exact_weight_grad_projected_on_the_carrier():
    ref, layer = _layer()
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), layer(x2)
    assert torch.equal(y, y_ref)
    upstream = torch.randn_like(y)
    y_ref.backward(upstream)
    y.backward(upstream)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=0)
    assert layer.weight.grad is None and not layer.weight.requires_grad  # no full-size weight gradient
    u = layer.basis.double()
    g = ref.weight.grad
    assert layer.lowrank_grad is layer.grad_carrier.grad
    torch.testing.assert_close(layer.grad_carrier.grad, g @ u, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-12, atol=0)
    with pytest.raises(AttributeError):
        layer.lowrank_grad = None  # a read-only alias


def test_autograd_accumulates_the_lowrank_grad_over_micro_batches_in_one_basis():
    ref, layer = _layer()
    layer.tracker.subspace_lr = 1.0  # a moving basis: it must not move within a step
    opt = OasisAdamW(layer, [layer], lr=0.0)
    xs = [torch.randn(4, 24, dtype=torch.float64) for _ in range(4)]
    layer(xs[0]).sum().backward()
    opt.step()  # the basis moves here, at the end of the step
    opt.zero_grad()
    assert layer.grad_carrier.grad is None
    moved = layer.basis.clone()
    for x in xs[1:]:
        layer(x).sum().backward()
        ref(x).sum().backward()
        assert torch.equal(layer.basis, moved)
    torch.testing.assert_close(layer.grad_carrier.grad, ref.weight.grad @ moved.double(),
                               rtol=1e-10, atol=1e-12)
    layer.zero_grad()  # module.zero_grad() clears it too
    assert layer.grad_carrier.grad is None


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(12, 10, bias=False).double())
    model.add_module("act", nn.Tanh())
    model.add_module("o_proj", nn.Linear(10, 6, bias=True).double())
    return model


def test_clip_grad_norm_sees_the_lowrank_gradients_and_scales_them():
    ref = _model()
    model = _model()
    opt = prepare(model, OasisConfig(rank=4, init="random", targets=("q_proj", "o_proj")), lr=1e-3)
    x = torch.randn(9, 12, dtype=torch.float64)
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    # independent: the true gradients projected on the bases, lifted back (‖G U Uᵀ‖ = ‖G U‖)
    q, o = model.q_proj, model.o_proj
    lifted = [ref.q_proj.weight.grad @ q.basis.double() @ q.basis.double().T,
              ref.o_proj.weight.grad @ o.basis.double() @ o.basis.double().T, ref.o_proj.bias.grad]
    expected = torch.sqrt(sum(t.square().sum() for t in lifted))
    before = q.grad_carrier.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float(expected) / 4)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)  # float32 bases: U Uᵀ to ~1e-8
    torch.testing.assert_close(q.grad_carrier.grad, before / 4, rtol=1e-6, atol=0)  # scaled in place
    opt.zero_grad()
    assert q.grad_carrier.grad is None and o.grad_carrier.grad is None


def test_grad_scaler_unscales_the_lowrank_gradient_and_skips_a_step_on_inf():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(12, 10, bias=False))
    opt = prepare(model, OasisConfig(rank=4, init="random", targets=("q_proj",)), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(9, 12)
    model(x).sum().backward()
    plain = model.q_proj.grad_carrier.grad.clone()
    opt.zero_grad()
    scaler.scale(model(x).sum()).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(model.q_proj.grad_carrier.grad, plain)
    weight = model.q_proj.weight.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(model.q_proj.weight, weight)  # a finite step is taken
    opt.zero_grad()
    # the only gradient is the low-rank one: an inf in it must be seen, and the step skipped
    weight = model.q_proj.weight.detach().clone()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(model.q_proj.weight, weight)
    assert scaler.get_scale() < 1024.0


def test_carriers_share_one_buffer_and_stay_out_of_the_state_dict():
    model = _model()
    plain_keys = set(_model().state_dict())
    prepare(model, OasisConfig(rank=4, init="random", targets=("q_proj", "o_proj")))
    carriers = [model.q_proj.grad_carrier, model.o_proj.grad_carrier]
    assert [tuple(c.shape) for c in carriers] == [(10, 4), (6, 4)]
    assert all(c.dtype == torch.float64 and c.requires_grad for c in carriers)
    storages = {c.untyped_storage().data_ptr() for c in carriers}
    assert len(storages) == 1 and carriers[0].untyped_storage().nbytes() == 10 * 4 * 8  # the largest one
    assert set(model.state_dict()) == plain_keys
    fresh = _model(seed=1)
    prepare(fresh, OasisConfig(rank=4, init="random", targets=("q_proj", "o_proj")))
    fresh.load_state_dict(model.state_dict())  # strict: the carrier is not asked for
    assert torch.equal(fresh.q_proj.weight, model.q_proj.weight)


def test_tied_weights_are_refused_in_one_line():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(10, 8))
    model.add_module("lm_head", nn.Linear(8, 10, bias=False))
    model.lm_head.weight = model.embed.weight
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to embed.weight") as err:
        prepare(model, OasisConfig(rank=2, targets=("lm_head",)))
    assert "\n" not in str(err.value)


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
    with pytest.raises(ValueError, match=r"rank 9 exceeds.*\[1, 8\]"):
        prepare(model, OasisConfig(rank=9, targets=("q_proj",)))


def test_orthonormalize_keeps_an_orthonormal_basis_and_its_signs():
    torch.manual_seed(0)
    q0, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    q0 = q0 * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)  # any signs
    torch.testing.assert_close(orthonormalize(q0), q0, rtol=0, atol=1e-12)
    torch.testing.assert_close(orthonormalize(3.0 * q0), q0, rtol=0, atol=1e-12)
