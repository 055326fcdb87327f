"""The tracking diagnostic (`suites.measure.tracking`): its scores against hand-computed subspaces, and wired
to real methods (llama-tiny, the registry's builders): the layer inputs it measures are the ones a basis was
computed from, refreshes are counted as the published rules say, and a frozen basis keeps overlap 1."""

import math

import pytest
import torch

from suites.core import profiles
from suites.core.registry import method_defaults
from suites.launch import recipe
from suites.measure import tracking
from suites.train.models import run_fields


def _diag_inputs(d=12, n=400, seed=0):
    """X (n × d) with covariance diag(d, d-1, ..., 1) in a random orthonormal frame Q."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = torch.linalg.qr(z)[0] * math.sqrt(n)  # exactly white: ZᵀZ = n I
    lam = torch.arange(d, 0, -1, dtype=torch.float64)
    return z * lam.sqrt() @ q.T, q, lam


def test_exact_top_basis_scores_one_and_angle_zero():
    x, q, _ = _diag_inputs()
    captured, angle = tracking.subspace_scores(x, q[:, :3] @ torch.linalg.qr(torch.randn(3, 3).double())[0])
    assert captured == pytest.approx(1.0, abs=1e-9)
    assert angle == pytest.approx(0.0, abs=1e-6)


def test_captured_ratio_and_angle_of_a_known_wrong_basis():
    x, q, lam = _diag_inputs()
    # directions 1, 2 of the top three and the 5th: captured = (12 + 11 + 8) / (12 + 11 + 10), an angle of 90°
    u = torch.stack([q[:, 0], q[:, 1], q[:, 4]], 1)
    captured, angle = tracking.subspace_scores(x, u)
    assert captured == pytest.approx((12 + 11 + 8) / (12 + 11 + 10), abs=1e-9)
    assert angle == pytest.approx(math.pi / 2, abs=1e-6)
    # halfway between the 3rd and the 4th direction: cos = 1/√2
    tilted = torch.stack([q[:, 0], q[:, 1], (q[:, 2] + q[:, 3]) / math.sqrt(2)], 1)
    captured, angle = tracking.subspace_scores(x, tilted.float())
    assert captured == pytest.approx((12 + 11 + (10 + 9) / 2) / 33, abs=1e-6)
    assert angle == pytest.approx(math.pi / 4, abs=1e-5)


def test_net_overlap():
    q = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))[0]
    assert tracking.overlap(q[:, :4].numpy(), q[:, :4]) == pytest.approx(1.0)
    assert tracking.overlap(q[:, :4].numpy(), q[:, 4:8]) == pytest.approx(0.0, abs=1e-12)
    theta = 0.3
    turned = torch.cat([q[:, :3], (math.cos(theta) * q[:, 3] + math.sin(theta) * q[:, 9])[:, None]], 1)
    assert tracking.overlap(q[:, :4], turned) == pytest.approx((3 + math.cos(theta) ** 2) / 4)


def test_points_and_roles():
    assert tracking.points(100, 10, 4) == [0, 11, 55, 99]
    assert tracking.points(100, 10, 0) == []
    assert tracking.points(6, 1, 2) == [0, 5]
    assert tracking.role_of("model.layers.3.self_attn.k_proj") == "qkv"
    assert tracking.role_of("model.layers.3.mlp.up_proj.weight") == "gate_up"
    assert tracking.role_of("model.layers.0.mlp.down_proj") == "down"


def _session(method: str, **overrides):
    prof = profiles.profile("c4", "smoke")
    prof.update(overrides)
    cfg = profiles.resolve("c4", "smoke", prof, method, method_defaults(method), "cpu")
    cfg.update(run_fields(cfg))
    cfg.update({k: v for k, v in overrides.items() if k in cfg or k in method_defaults(method)})
    return recipe.setup({"config": cfg, "out_dir": "unused", "position": 0})


def _train(session, steps):
    for step in range(steps):
        recipe.optimizer_step(session, step, recipe.step_batches(session, step))
        session.tracking.maybe_measure(step)


@pytest.mark.usefixtures("one_thread")
def test_a_pca_basis_measured_on_its_own_batch_is_exact_and_refreshes_are_counted():
    # lr 0: the weights never move, so the inputs the diagnostic sees on step 4's batch are the ones the
    # basis was refreshed from at step 4 (refresh_every 2: refreshes at steps 2 and 4 after the first basis)
    session = _session("pca", steps=6, mem_window=1, track_points=2, refresh_every=2, lr=0.0,
                       lrs={"pca": 0.0, "default": 0.0})
    assert session.tracking.points == {0, 5}
    session.tracking.batch = session.batches[4]
    _train(session, 6)
    rows = {r["role"]: r for r in session.tracking.rows if r["step"] == 5}
    assert set(rows) == {"qkv", "o", "gate_up", "down", "mean"}
    for row in rows.values():
        assert row["captured"] == pytest.approx(1.0, abs=1e-4)
        assert row["angle"] < 2e-2
        assert 0 < row["overlap_init"] < 1
    assert session.tracking.result()["refreshes"] == 2


@pytest.mark.usefixtures("one_thread")
def test_a_frozen_oasis_basis_keeps_its_initial_subspace_and_a_moving_one_leaves_it():
    frozen = _session("oasis", steps=4, mem_window=1, track_points=2, subspace_lr=0.0)
    _train(frozen, 4)
    assert frozen.tracking.result()["refreshes"] == 0
    assert all(r["overlap_init"] == pytest.approx(1.0, abs=1e-9) for r in frozen.tracking.rows)
    moving = _session("oasis", steps=4, mem_window=1, track_points=2, subspace_lr=1.0)
    _train(moving, 4)
    assert moving.tracking.result()["refreshes"] == 4
    last = [r for r in moving.tracking.rows if r["step"] == 3 and r["role"] == "mean"][0]
    assert last["overlap_init"] < 0.999


@pytest.mark.usefixtures("one_thread")
def test_galore_projector_refreshes_follow_update_proj_gap():
    session = _session("galore", steps=7, mem_window=1, track_points=2, update_proj_gap=3)
    _train(session, 7)
    out = session.tracking.result()
    assert out["refreshes"] == 2  # galore-torch recomputes at its step counts 3 and 6 (0 is the first)
    rows = [r for r in out["tracking"] if r["role"] == "mean"]
    assert [r["step"] for r in rows] == [0, 6]
    assert rows[0]["overlap_init"] == pytest.approx(1.0) and rows[0]["captured"] is None
    assert rows[1]["overlap_init"] < 1
