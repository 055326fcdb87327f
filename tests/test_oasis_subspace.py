"""The Oja tracker: convergence to the top-r eigenspace, orthonormality, scale-free step, drift."""

import math

import pytest
import torch

from oasis.subspace import OjaTracker, largest_principal_angle


def _spectrum(d, rank, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = torch.cat([torch.linspace(10.0, 6.0, rank), torch.linspace(1.0, 0.1, d - rank)]).double()
    return q, eig


def _batch(q, eig, n, gen):
    """Gaussian activations with covariance Q diag(eig) Qᵀ."""
    return (torch.randn(n, len(eig), generator=gen, dtype=torch.float64) * eig.sqrt()) @ q.T


def _angle_to(basis, q, rank):
    return float(largest_principal_angle(q[:, :rank].T.float() @ basis))


def test_tracker_reaches_the_top_r_eigenspace():
    gen = torch.Generator().manual_seed(0)
    d, rank = 32, 4
    q, eig = _spectrum(d, rank, gen)
    tracker = OjaTracker("t", d, rank, subspace_lr=0.05, init="random", seed=3)
    tracker.observe(_batch(q, eig, 8, gen).float())  # random init ignores the data
    start = _angle_to(tracker.basis, q, rank)
    for _ in range(600):
        tracker.step()
        tracker.observe(_batch(q, eig, 4096, gen).float())
    end = _angle_to(tracker.basis, q, rank)
    assert start > 1.0  # a random start is far from the answer
    assert end < 1e-2, end


def test_orthonormal_after_10k_float32_updates():
    gen = torch.Generator().manual_seed(1)
    d, rank = 24, 6
    q, eig = _spectrum(d, rank, gen)
    tracker = OjaTracker("t", d, rank, subspace_lr=0.5, init="random")
    tracker.observe(torch.zeros(1, d))
    for _ in range(10_000):
        tracker.step()
        tracker.observe(_batch(q, eig, 16, gen).float())
    u = tracker.basis
    assert u.dtype == torch.float32
    assert torch.linalg.matrix_norm(u.T @ u - torch.eye(rank)) < 1e-5


def test_step_is_invariant_to_activation_scale():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=gen)
    bases = []
    for scale in (1e-3, 1.0, 1e3):
        tracker = OjaTracker("t", 16, 3, subspace_lr=0.3, init="random")
        tracker.observe(x)
        tracker.step()
        tracker.observe(scale * x)
        bases.append(tracker.basis)
    torch.testing.assert_close(bases[0], bases[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(bases[2], bases[1], rtol=0, atol=1e-5)


def test_pca_init_is_the_top_r_eigenspace_and_identity_init_is_exact():
    gen = torch.Generator().manual_seed(3)
    q, eig = _spectrum(20, 3, gen)
    tracker = OjaTracker("t", 20, 3, init="pca")
    tracker.observe(_batch(q, eig, 20_000, gen).float())
    assert _angle_to(tracker.basis, q, 3) < 0.05
    ident = OjaTracker("t", 20, 3, init="identity")
    ident.observe(torch.randn(4, 20))
    assert torch.equal(ident.basis, torch.eye(20, 3))


def test_basis_moves_once_per_step_and_reports_rotation_and_drift():
    tracker = OjaTracker("t", 10, 2, subspace_lr=1.0, init="random")
    x = torch.randn(50, 10)
    tracker.observe(x)
    assert not tracker.due() and tracker.pop_rotation() is None  # init is not a move
    tracker.step()
    assert tracker.due()
    old = tracker.basis.clone()
    tracker.observe(x)
    assert not tracker.due()
    rotation = tracker.pop_rotation()
    torch.testing.assert_close(rotation, tracker.basis.T @ old)
    drift = tracker.pop_drift()
    assert 0 < drift <= math.pi / 2 and tracker.pop_drift() == 0.0


def test_zero_subspace_lr_freezes_the_basis():
    tracker = OjaTracker("t", 10, 2, subspace_lr=0.0)
    tracker.observe(torch.randn(30, 10))
    tracker.step()
    assert not tracker.due()


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=11), dict(init="svd"), dict(subspace_lr=-1.0),
                                    dict(update_every=0)])
def test_bad_hyper_parameters_are_clear_errors(kwargs):
    args = dict(rank=2, subspace_lr=0.1) | kwargs
    with pytest.raises(ValueError, match="must be"):
        OjaTracker("t", 10, args.pop("rank"), **args)
