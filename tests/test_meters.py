"""Memory meters: exact byte counts on known cases, determinism, the warm-up window, fake estimates."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from suites.measure.meters import fake_construction, make_meter
from suites.measure.trackers import CATEGORIES
from suites.train.models import build_model

F32 = 4


def _linear_adam(d_in=64, d_out=32):
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    return layer, opt


def _step(model, opt, x):
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _measure(kind, model, opt, step):
    meter = make_meter(kind, model, opt)
    with meter:
        step()
        meter.start_window()
        step()
    return meter.result()


def test_linear_adamw_exact_bytes():
    layer, opt = _linear_adam()
    x = torch.randn(8, 64)
    rec = _measure("cpu", layer, opt, lambda: _step(layer, opt, x))
    n_params = 64 * 32 + 32
    b = rec["breakdown"]
    assert rec["source"] == "cpu-tracked"
    assert b["params"] == n_params * F32
    # exp_avg + exp_avg_sq per parameter, plus AdamW's 0-dim float32 `step` tensor per parameter
    assert b["optimizer"] == 2 * n_params * F32 + 2 * F32
    assert sum(b.values()) == rec["peak_bytes"]
    assert set(b) == set(CATEGORIES)
    # the peak is inside the optimizer step, where the gradients are alive
    assert b["grads"] == n_params * F32


def test_identical_runs_give_identical_bytes():
    def run():
        model = build_model("llama-tiny", dtype=torch.float32, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return _measure("cpu", model, opt, step)

    a, b = run(), run()
    assert a == b
    assert a["breakdown"]["grads"] > 0 and a["breakdown"]["optimizer"] > 0


def test_peak_is_taken_after_warmup():
    layer, opt = _linear_adam()
    x = torch.randn(8, 64)
    big = 4 * 2**20
    meter = make_meter("cpu", layer, opt)
    with meter:
        scratch = torch.empty(big // F32)  # a warm-up-only temporary, freed before the window
        del scratch
        _step(layer, opt, x)
        meter.start_window()
        _step(layer, opt, x)
    small = meter.result()["peak_bytes"]
    assert small < big

    meter = make_meter("cpu", layer, opt)
    with meter:
        _step(layer, opt, x)
        meter.start_window()
        scratch = torch.empty(big // F32)  # the same temporary inside the window counts
        del scratch
        _step(layer, opt, x)
    assert meter.result()["peak_bytes"] >= big


def test_result_needs_a_window():
    layer, opt = _linear_adam()
    meter = make_meter("cpu", layer, opt)
    with meter:
        _step(layer, opt, torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="start_window"):
        meter.result()


def test_saved_activations_are_counted_and_released():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    x = torch.randn(32, 64)
    meter = make_meter("cpu", model, None)
    with meter:
        meter.start_window()
        loss = model(x).sum()
        during = meter.tracker.classify()
        loss.backward()
        del loss
        after = meter.tracker.classify()
    # relu's output (saved by ReLU and by the second Linear, one storage): 32 x 256 floats; the first
    # Linear saves x, which is an input made before tracking: also saved for backward
    assert during["activations"] == (32 * 256 + 32 * 64) * F32
    assert after["activations"] == 0


def test_lowrank_grad_counts_as_grads():
    from oasis import OasisConfig, prepare

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 32, bias=False))
    opt = prepare(model, OasisConfig(rank=4, init="random", targets=("q_proj",)))
    meter = make_meter("cpu", model, opt)
    with meter:
        meter.start_window()
        model(torch.randn(8, 64)).sum().backward()  # the d_out × r gradient on the layer's carrier
        assert model.q_proj.lowrank_grad.shape == (32, 4)
        assert meter.tracker.classify()["grads"] == 32 * 4 * F32


def test_galore_projector_state_counts_as_optimizer():
    from galore_torch import GaLoreAdamW

    torch.manual_seed(0)
    layer = nn.Linear(64, 32, bias=False)
    opt = GaLoreAdamW([{"params": [layer.weight], "rank": 4, "update_proj_gap": 200, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-3)
    rec = _measure("cpu", layer, opt, lambda: _step(layer, opt, torch.randn(8, 64)))
    # W is 32 x 64: galore projects from the left; moments are 4 x 64. Its ortho_matrix is
    # U[:, :4] of the SVD, a view that keeps all of U (32 x 32) alive for float32 weights
    state = opt.state[layer.weight]
    assert state["projector"].ortho_matrix.shape == (32, 4)
    assert rec["breakdown"]["optimizer"] == (32 * 32 + 2 * 4 * 64) * F32


def test_estimate_matches_cpu_and_allocates_nothing():
    ids_shape = (2, 16)

    def run(kind):
        if kind == "estimate":
            with fake_construction():
                model = build_model("llama-tiny", dtype=torch.bfloat16)
        else:
            model = build_model("llama-tiny", dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            ids = torch.randint(0, 32000, ids_shape)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        rec = _measure(kind, model, opt, step)
        return model, rec

    fake_model, est = run("estimate")
    _, cpu = run("cpu")
    assert all(isinstance(p, FakeTensor) for p in fake_model.parameters())
    assert est["source"] == "estimate"
    assert est["peak_bytes"] == cpu["peak_bytes"]
    assert est["breakdown"] == cpu["breakdown"]


def test_estimate_needs_a_fake_model_and_kinds_are_checked():
    layer, opt = _linear_adam()
    with pytest.raises(ValueError, match="fake"):
        make_meter("estimate", layer, opt)
    with pytest.raises(ValueError, match="cuda, cpu, estimate"):
        make_meter("disk", layer, opt)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_meter_needs_cuda():
    layer, opt = _linear_adam()
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_meter("cuda", layer, opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_meter_peak_covers_the_tracked_bytes():
    torch.manual_seed(0)
    layer = nn.Linear(256, 256).cuda()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(64, 256, device="cuda")
    rec = _measure("cuda", layer, opt, lambda: _step(layer, opt, x))
    assert rec["source"] == "cuda" and rec["reserved_bytes"] >= rec["peak_bytes"]
    assert rec["breakdown"]["params"] == (256 * 256 + 256) * F32
    assert sum(rec["breakdown"].values()) == rec["peak_bytes"]
