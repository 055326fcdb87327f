"""The Oja step's normalisations (`oasis.subspace.oja_step`, `OJA_NORMS`) on synthetic activation streams.

Where the expected numbers come from. Every stream here has a covariance made of 2-D planes (v_j, w_j),
j = 1..r, with eigenvalues λ_j (on v_j) > μ_j (on w_j), plus the rest of the space; a basis whose column j
lies in plane j at angle θ_j from v_j (u_j = cos θ_j v_j + sin θ_j w_j) has C u_j in plane j too, so
K = UᵀCU is diagonal (Sanger's triu(K) is the same K), and the step keeps every column in its plane:

    u_j + h_j (C u_j − k_j u_j),  k_j = λ_j cos²θ_j + μ_j sin²θ_j
    ⇒ tan θ_j' = tan θ_j · (1 + h_j (μ_j − k_j)) / (1 + h_j (λ_j − k_j))            (columns stay orthogonal:
                                                                                 QR only rescales them)
with h_j = η / norm: σ_max(S) = max_j ‖C u_j‖ = max_j √(λ_j² cos²θ_j + μ_j² sin²θ_j) ("sigma_max"),
‖C u_j‖ of its own column ("sanger"), Σ_j k_j ("trace"), 1 ("none"). A rotating stream turns each plane's
top direction by ω per step, so the angle behind the moving target before a step is the angle after the
previous step plus ω. `_predicted` iterates this scalar map in float64 — an independent calculation from the
geometry, not a call into the implementation — and the tests hold the tracker to it. Near convergence the
map is tan θ' ≈ tan θ (1 − h (λ − μ)), the classic Oja rate; for a rotating stream the steady lag is then
≈ ω (1 − h g)/(h g), g = λ − μ.
"""

from __future__ import annotations

import math

import pytest
import torch

from oasis.subspace import OJA_NORMS, OjaTracker, oja_step, top_singular_value

pytestmark = pytest.mark.usefixtures("one_thread")

D, R = 32, 4
TOP = (10.0, 9.0, 8.0, 7.0)      # λ_j, the top-r eigenvalues (one per plane)
PARTNER = (1.0, 0.9, 0.8, 0.7)   # μ_j, the other eigenvalue of plane j
REST = 0.1                       # every other direction
SCALE_FREE = ("sigma_max", "sanger", "trace", "centred")


def _frame(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return q  # v_j = q[:, j], w_j = q[:, R + j], the rest q[:, 2R:]


def _plane_basis(q, angles) -> torch.Tensor:
    """Column j at angle θ_j from v_j towards w_j."""
    cos = torch.tensor([math.cos(a) for a in angles], dtype=torch.float64)
    sin = torch.tensor([math.sin(a) for a in angles], dtype=torch.float64)
    return q[:, :R] * cos + q[:, R:2 * R] * sin


def _rotated(q, angle: float) -> torch.Tensor:
    """The frame with every plane's (v_j, w_j) turned by `angle`."""
    out = q.clone()
    out[:, :R] = _plane_basis(q, [angle] * R)
    out[:, R:2 * R] = _plane_basis(q, [angle + math.pi / 2] * R)
    return out


def _eigenvalues() -> torch.Tensor:
    return torch.tensor([*TOP, *PARTNER] + [REST] * (D - 2 * R), dtype=torch.float64)


def _exact_rows(frame, mean=None) -> torch.Tensor:
    """2D rows, ±√(D λ_i) f_iᵀ: their covariance is exactly F diag(λ) Fᵀ and their mean exactly 0 (then
    `mean` is added to every row)."""
    rows = (D * _eigenvalues()).sqrt()[:, None] * frame.T
    x = torch.cat([rows, -rows])
    return x if mean is None else x + mean


def _sampled_rows(frame, n, gen) -> torch.Tensor:
    return (torch.randn(n, D, generator=gen, dtype=torch.float64) * _eigenvalues().sqrt()) @ frame.T


def _start(norm: str, eta: float, basis: torch.Tensor) -> OjaTracker:
    tracker = OjaTracker("t", D, basis.shape[1], subspace_lr=eta, normalization=norm)
    tracker.load_state_dict({"basis": basis.float(), "steps": 0, "refreshed_at": 0, "rotation": None})
    return tracker


def _step(tracker: OjaTracker, x: torch.Tensor) -> None:
    tracker.project(x.float())
    tracker.statistics()
    tracker.advance()
    tracker.step()


def _angle(basis, target) -> float:
    """Largest principal angle between span(basis) and span(target), as asin σ_max((I − T Tᵀ) U) in float64
    (arccos of the smallest cosine loses ~1e-3 rad to float32 rounding near 0)."""
    t, u = target.double(), basis.double()
    sine = torch.linalg.svdvals(u - t @ (t.T @ u))[0]
    return math.asin(min(1.0, float(sine)))


def _predicted(norm, eta, angles, steps, omega=0.0, extra_norm=0.0):
    """Largest plane angle after each step, from the scalar map of the module docstring (float64), for
    the first len(angles) planes. `extra_norm`: a column outside the planes with C u = extra_norm · u (the
    dominant mean direction): its ‖C u‖ and k enter σ_max and the trace; it never moves."""
    theta = list(angles)
    n = len(theta)
    out = []
    for _ in range(steps):
        theta = [t + omega for t in theta]
        cu = [math.hypot(lam * math.cos(t), mu * math.sin(t)) for t, lam, mu in zip(theta, TOP, PARTNER)]
        k = [lam * math.cos(t) ** 2 + mu * math.sin(t) ** 2 for t, lam, mu in zip(theta, TOP, PARTNER)]
        if norm in ("sigma_max", "centred"):
            h = [eta / max(*cu, extra_norm)] * n
        elif norm == "sanger":
            h = [eta / c for c in cu]
        elif norm == "trace":
            h = [eta / (sum(k) + extra_norm)] * n
        else:
            h = [eta] * n
        theta = [math.atan2(math.sin(t) * (1 + hj * (mu - kj)), math.cos(t) * (1 + hj * (lam - kj)))
                 for t, hj, kj, lam, mu in zip(theta, h, k, TOP, PARTNER)]
        out.append(max(abs(t) for t in theta))
    return out


# ---------------------------------------------------------------------------------- the step itself


def test_sigma_max_by_repeated_squaring_matches_svdvals_batched():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 40, 6, generator=gen, dtype=torch.float64)
    s[3, :, 1] = s[3, :, 0] * 0.9999  # near-equal top singular values
    s[4] = 0  # all-zero statistics: 0, not NaN
    got = top_singular_value(s)
    want = torch.linalg.svdvals(s)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def _reference_step(u, s, k, eta, norm, mean=None):
    """The five steps written out in float64 from their definitions (svdvals, explicit column loops)."""
    u, s, k = u.double(), s.double(), k.double()
    if norm == "centred":
        m = mean.double()
        s = s - torch.outer(m, m @ u)
        k = k - torch.outer(u.T @ m, u.T @ m)
    if norm == "sanger":
        cols = []
        for j in range(u.shape[1]):
            deflated = s[:, j] - sum(u[:, i] * k[i, j] for i in range(j + 1))
            cols.append(u[:, j] + eta * deflated / torch.linalg.vector_norm(s[:, j]))
        return torch.stack(cols, dim=1)
    if norm in ("sigma_max", "centred"):
        norm_value = torch.linalg.svdvals(s)[0]
    else:
        norm_value = torch.trace(k) if norm == "trace" else torch.tensor(1.0, dtype=torch.float64)
    return u + eta / norm_value * (s - u @ k)


@pytest.mark.parametrize("norm", OJA_NORMS)
def test_oja_step_matches_its_definition_and_batches(norm):
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 50, 12, generator=gen) + 2.0  # a non-zero mean
    us = torch.linalg.qr(torch.randn(3, 12, 4, generator=gen))[0]
    s = xs.mT @ (xs @ us) / 50
    k = us.mT @ s
    mean = xs.mean(1)
    batched = oja_step(us, s, k, 0.3, norm, mean=mean)
    for i in range(3):
        want = _reference_step(us[i], s[i], k[i], 0.3, norm, mean[i])
        torch.testing.assert_close(batched[i].double(), want, rtol=0, atol=2e-5)


def test_unknown_normalisation_and_missing_mean_are_errors():
    u = torch.linalg.qr(torch.randn(6, 2))[0]
    with pytest.raises(ValueError, match="normalization must be one of"):
        oja_step(u, u, torch.eye(2), 0.1, "l2")
    with pytest.raises(ValueError, match="needs the mean"):
        oja_step(u, u, torch.eye(2), 0.1, "centred")
    with pytest.raises(ValueError, match="normalization must be one of"):
        OjaTracker("t", 6, 2, normalization="l2")


@pytest.mark.parametrize("norm", OJA_NORMS)
def test_which_steps_are_scale_free(norm):
    """Activations × 1e-3 and × 1e3 (S, K scale by c², the mean by c): the scale-free steps give the same
    basis; the plain step ("none") does not (its step scales by c²)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, D, generator=gen, dtype=torch.float64) * _eigenvalues().sqrt() + 0.5
    bases = {}
    for scale in (1e-3, 1.0, 1e3):
        tracker = _start(norm, 0.3, _plane_basis(_frame(3), [0.7] * R))
        _step(tracker, scale * x)
        bases[scale] = tracker.basis
    moved = {c: float(torch.linalg.matrix_norm(bases[c] - bases[1.0])) for c in (1e-3, 1e3)}
    if norm == "none":
        assert not min(moved.values()) < 0.05, moved  # NaN (a blown-up step) counts as moved
    else:
        assert max(moved.values()) < 1e-5, moved


# ---------------------------------------------------------------------------------- streams


@pytest.mark.parametrize(("norm", "eta"), [("sigma_max", 0.1), ("sanger", 0.1), ("trace", 0.1),
                                           ("centred", 0.1), ("none", 0.01)])
def test_stationary_stream_converges_within_the_predicted_steps(norm, eta):
    """Sampled Gaussian rows (4096 a step), every column 1.2 rad from its plane's top direction: the
    largest principal angle to the top-r eigenspace goes below 0.05 rad within 1.2 × (the noise-free
    prediction) + 5 steps, and stays below it. The map predicts 55 steps for sigma_max and centred (71
    allowed), 36 for sanger (49), 171 for trace (211), 62 for none at η = 0.01 (80). (Sampling noise:
    ~√(λ μ / N_eff) / g ≈ 0.003 rad at the averaging length N_eff = 4096 / (h g) rows, well under 0.05.)"""
    q = _frame(4)
    predicted = _predicted(norm, eta, [1.2] * R, 2000)
    within = next(i + 1 for i, a in enumerate(predicted) if a < 0.05)
    budget = math.ceil(1.2 * within) + 5
    tracker = _start(norm, eta, _plane_basis(q, [1.2] * R))
    gen = torch.Generator().manual_seed(5)
    angles = []
    for _ in range(budget + 20):
        _step(tracker, _sampled_rows(q, 4096, gen))
        angles.append(_angle(tracker.basis, q[:, :R]))
    assert angles[0] > 0.9  # it starts far away
    assert max(angles[budget - 1:]) < 0.05, (within, budget, angles[budget - 1:])


ROTATING = [("sigma_max", 0.1), ("sanger", 0.1), ("trace", 0.3), ("none", 0.01)]


@pytest.mark.parametrize(("norm", "eta"), ROTATING)
def test_rotating_stream_lags_by_the_predicted_angle(norm, eta):
    """Exact-covariance rows; the top-r eigenspace turns by ω = 0.01 rad per step (each plane's top
    direction towards its partner). From the exact eigenspace, the lag (largest principal angle to the
    current top-r eigenspace after each step) settles where the scalar map says: mean over steps 300-400
    within 3% of the prediction. The map gives 0.151 rad for sigma_max at η = 0.1 (≈ ω(1 − hg)/(hg) with
    h = η/λ_1, g = 7 − 0.7 of the slowest plane: 0.149), 0.101 for sanger (h = η/λ_j), 0.170 for trace at
    η = 0.3, 0.152 for none at η = 0.01."""
    q, omega = _frame(6), 0.01
    predicted = _predicted(norm, eta, [0.0] * R, 400, omega=omega)
    tracker = _start(norm, eta, q[:, :R])
    lags = []
    for t in range(1, 401):
        frame = _rotated(q, omega * t)
        _step(tracker, _exact_rows(frame))
        lags.append(_angle(tracker.basis, frame[:, :R]))
    measured, expected = sum(lags[300:]) / 100, sum(predicted[300:]) / 100
    assert 0.02 < expected < 0.6  # the bound is a real, bounded lag
    assert abs(measured - expected) < 0.03 * expected, (measured, expected)


def test_dominant_mean_slows_sigma_max_by_the_predicted_factor_and_not_sanger():
    """LLM-like activations: the rotating stream (ω = 0.002 rad per step) plus a mean of squared norm
    100 × λ_1 along a fixed direction outside the planes. The uncentred top-r space is that direction plus
    the top directions of planes 1..r−1; the basis starts on it exactly (column 0 the mean direction). With
    σ_max(S) = ‖mean‖² every plane moves at η (λ − μ)/‖mean‖², 100 times slower than without the mean;
    Sanger's per-column norm ‖C u_j‖ is unaffected. Both lags, mean over steps 300-400, within 3% of the
    scalar map (mean column: C u = ‖mean‖² u, never moving, entering σ_max and the trace): 0.629 rad for
    sigma_max, 0.0202 for sanger; σ_max must lag at least 10× Sanger. "centred" drops the mean
    direction altogether: it tracks a different space."""
    q, omega, eta = _frame(7), 0.002, 0.1
    mean_dir = q[:, 2 * R]
    mean2 = 100 * TOP[0]
    mean = math.sqrt(mean2) * mean_dir
    lags = {}
    for norm in ("sigma_max", "sanger", "centred"):
        planes = [0.0] * (R - 1)
        start = torch.cat([mean_dir[:, None], q[:, :R - 1]], dim=1)
        tracker = OjaTracker("t", D, R, subspace_lr=eta, normalization=norm)
        tracker.load_state_dict({"basis": start.float(), "steps": 0, "refreshed_at": 0, "rotation": None})
        seen = []
        for t in range(1, 401):
            frame = _rotated(q, omega * t)
            _step(tracker, _exact_rows(frame, mean))
            seen.append(_angle(tracker.basis, torch.cat([mean_dir[:, None], frame[:, :R - 1]], dim=1)))
        lags[norm] = sum(seen[300:]) / 100
    for norm in ("sigma_max", "sanger"):
        # planes 1..r-1 only (plane r is not in the uncentred top-r space): the map over R-1 planes
        predicted = _predicted(norm, eta, planes, 400, omega=omega, extra_norm=mean2)
        expected = sum(predicted[300:]) / 100
        assert abs(lags[norm] - expected) < 0.03 * expected, (norm, lags[norm], expected)
    assert lags["sigma_max"] > 10 * lags["sanger"], lags
    assert lags["centred"] > 1.0, lags


def test_centred_statistics_are_reduced_across_ranks():
    """Two ranks' statistics summed (the row sum included, as `statistics()` hands it to the reduce)
    give one process's basis on the concatenated batch."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(80, D, generator=gen) + 3.0) * torch.linspace(0.2, 2.0, D)
    start = _plane_basis(_frame(9), [0.5] * R)
    single = _start("centred", 0.5, start)
    _step(single, x)
    ranks = [_start("centred", 0.5, start) for _ in range(2)]
    for tracker, part in zip(ranks, (x[:50], x[50:])):
        tracker.project(part)
    stats = [tracker.statistics() for tracker in ranks]
    assert len(stats[0]) == 4  # S, K, N and the row sum
    total = [a + b for a, b in zip(*stats)]
    for tracker, mine in zip(ranks, stats):
        for t, summed in zip(mine, total):
            t.copy_(summed)
        tracker.advance()
        tracker.step()
    torch.testing.assert_close(ranks[0].basis, single.basis, rtol=0, atol=1e-5)
    torch.testing.assert_close(ranks[1].basis, single.basis, rtol=0, atol=1e-5)


def test_the_harness_option_reaches_every_tracker():
    from suites.core.registry import build_method, method_defaults
    from suites.train.models import build_model, llama_config

    common = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "rank": 4, "seed": 0}
    model = build_model(llama_config("llama-tiny", vocab_size=64), seed=0)
    _, opt = build_method("oasis", model, {**method_defaults("oasis"), **common, "oja_norm": "sanger"})
    assert {t.normalization for t in opt.trackers} == {"sanger"}
    model = build_model(llama_config("llama-tiny", vocab_size=64), seed=0)
    with pytest.raises(ValueError, match="oja_norm='l2' is not valid; choose from sigma_max"):
        build_method("oasis", model, {**method_defaults("oasis"), **common, "oja_norm": "l2"})
