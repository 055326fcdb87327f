"""The Oja tracker: when the basis moves (once per step, from the whole step's statistics), convergence to the
top-r eigenspace, orthonormality, scale-free step, drift, the reduce hook."""

import math
import threading

import pytest
import torch

from oasis.subspace import OjaTracker, largest_principal_angle

pytestmark = pytest.mark.usefixtures("one_thread")


def _spectrum(d, rank, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    eig = torch.cat([torch.linspace(10.0, 6.0, rank), torch.linspace(1.0, 0.1, d - rank)]).double()
    return q, eig


def _batch(q, eig, n, gen):
    """Gaussian activations with covariance Q diag(eig) Qᵀ."""
    return (torch.randn(n, len(eig), generator=gen, dtype=torch.float64) * eig.sqrt()) @ q.T


def _angle_to(basis, q, rank):
    return float(largest_principal_angle(q[:, :rank].T.float() @ basis))


def _step(tracker, *micro_batches):
    """One optimizer step as OasisAdamW drives a tracker: the forwards, then (reduce,) advance, step."""
    for x in micro_batches:
        tracker.project(x)
    stats = tracker.statistics()
    if stats and tracker.reduce is not None:
        tracker.reduce(stats)
    rotation = tracker.advance()
    tracker.step()
    return rotation


def _oja_reference(u, xs, eta):
    """U' = qr(U + η (S − U K)/σ_max(S)), S and K averaged over the step's rows (float64, signs fixed)."""
    x = torch.cat(xs).double()
    u = u.double()
    s = x.T @ (x @ u) / x.shape[0]
    k = u.T @ s
    q, r = torch.linalg.qr(u + eta / torch.linalg.svdvals(s)[0] * (s - u @ k))
    return q * torch.sign(torch.diagonal(r))


def test_tracker_reaches_the_top_r_eigenspace():
    gen = torch.Generator().manual_seed(0)
    d, rank = 32, 4
    q, eig = _spectrum(d, rank, gen)
    tracker = OjaTracker("t", d, rank, subspace_lr=0.05, init="random", seed=3)
    tracker.project(_batch(q, eig, 8, gen).float())  # random init ignores the data
    start = _angle_to(tracker.basis, q, rank)
    for _ in range(600):
        _step(tracker, _batch(q, eig, 4096, gen).float())
    end = _angle_to(tracker.basis, q, rank)
    assert start > 1.0  # a random start is far from the answer
    assert end < 1e-2, end


def test_orthonormal_after_10k_float32_updates():
    gen = torch.Generator().manual_seed(1)
    d, rank = 24, 6
    q, eig = _spectrum(d, rank, gen)
    tracker = OjaTracker("t", d, rank, subspace_lr=0.5, init="random")
    for _ in range(10_000):
        _step(tracker, _batch(q, eig, 16, gen).float())
    u = tracker.basis
    assert u.dtype == torch.float32
    assert torch.linalg.matrix_norm(u.T @ u - torch.eye(rank)) < 1e-5


def test_step_is_invariant_to_activation_scale():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=gen)
    bases = []
    for scale in (1e-3, 1.0, 1e3):
        tracker = OjaTracker("t", 16, 3, subspace_lr=0.3, init="random")
        _step(tracker, scale * x)
        bases.append(tracker.basis)
    torch.testing.assert_close(bases[0], bases[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(bases[2], bases[1], rtol=0, atol=1e-5)


def test_pca_init_is_the_top_r_eigenspace_and_identity_init_is_exact():
    gen = torch.Generator().manual_seed(3)
    q, eig = _spectrum(20, 3, gen)
    tracker = OjaTracker("t", 20, 3, init="pca")
    tracker.project(_batch(q, eig, 20_000, gen).float())
    assert _angle_to(tracker.basis, q, 3) < 0.05
    ident = OjaTracker("t", 20, 3, init="identity")
    ident.project(torch.randn(4, 20))
    assert torch.equal(ident.basis, torch.eye(20, 3))


def test_basis_moves_at_the_step_from_the_statistics_of_every_micro_batch():
    gen = torch.Generator().manual_seed(4)
    tracker = OjaTracker("t", 10, 2, subspace_lr=0.7, init="random", normalization="sigma_max")
    xs = [torch.randn(n, 10, generator=gen) for n in (30, 50, 7)]  # unequal micro-batches
    z = tracker.project(xs[0])  # initialises
    start = tracker.basis.clone()
    torch.testing.assert_close(z, xs[0] @ start)
    for x in xs[1:]:
        tracker.project(x)
        assert torch.equal(tracker.basis, start)  # fixed within the step
    s_sum, k_sum, count = tracker.statistics()
    assert s_sum.dtype == k_sum.dtype == torch.float32 and float(count) == 87
    rotation = tracker.advance()
    tracker.step()
    expected = _oja_reference(start, xs, 0.7)
    torch.testing.assert_close(tracker.basis.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotation, tracker.basis.T @ start)
    assert tracker.stats is None and tracker.pop_rotation() is None  # nothing but the basis survives
    drift = tracker.pop_drift()
    assert 0 < drift <= math.pi / 2 and tracker.pop_drift() == 0.0
    # only the first micro-batch: a different basis (the statistics of the whole step are used)
    alone = _oja_reference(start, xs[:1], 0.7)
    assert float(largest_principal_angle(alone.T @ expected)) > 1e-3


def test_update_every_moves_after_every_kth_step_only():
    gen = torch.Generator().manual_seed(5)
    tracker = OjaTracker("t", 10, 2, subspace_lr=0.5, init="random", update_every=3)
    moved = []
    for _ in range(7):
        before = None if tracker.basis is None else tracker.basis.clone()
        x = torch.randn(20, 10, generator=gen)
        tracker.project(x)
        if before is None:
            before = tracker.basis.clone()
        collecting = tracker.stats is not None
        _step(tracker)
        moved.append(not torch.equal(before, tracker.basis))
        assert collecting == moved[-1]  # statistics are kept only in steps that move the basis
    assert moved == [False, False, True, False, False, True, False]


def test_zero_subspace_lr_freezes_the_basis_and_keeps_no_statistics():
    tracker = OjaTracker("t", 10, 2, subspace_lr=0.0)
    tracker.project(torch.randn(30, 10))
    first = tracker.basis.clone()
    assert tracker.stats is None and tracker.statistics() == []
    _step(tracker, torch.randn(30, 10))
    assert torch.equal(tracker.basis, first)


def test_reduce_hook_makes_two_ranks_equal_one_process_on_the_global_batch():
    """Two trackers standing for two ranks: with a sum-reduce of their statistics (and of the PCA init's
    Gram), both compute the basis one tracker computes from the concatenated micro-batches."""
    gen = torch.Generator().manual_seed(6)
    q, eig = _spectrum(12, 3, gen)
    steps = [[_batch(q, eig, 40, gen).float() for _rank in range(2)] for _ in range(4)]
    single = OjaTracker("t", 12, 3, subspace_lr=0.5)
    for a, b in steps:
        _step(single, torch.cat([a, b]))

    ranks = [OjaTracker("t", 12, 3, subspace_lr=0.5) for _ in range(2)]
    posted, barrier = {}, threading.Barrier(2)

    def make_reduce(me):
        def reduce(tensors):  # a blocking sum-all-reduce between the two threads
            posted[me] = [t.clone() for t in tensors]
            barrier.wait()
            for mine, theirs in zip(tensors, posted[1 - me], strict=True):
                mine.add_(theirs)
            barrier.wait()
        return reduce

    def run(me):
        ranks[me].reduce = make_reduce(me)
        for step in steps:
            _step(ranks[me], step[me])  # PCA init at the first forward: the Grams are summed there

    threads = [threading.Thread(target=run, args=(me,)) for me in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(ranks[0].basis, ranks[1].basis)
    torch.testing.assert_close(ranks[0].basis, single.basis, rtol=0, atol=2e-5)
    assert float(largest_principal_angle(ranks[0].basis.T @ single.basis)) < 1e-3


def test_recomputed_forward_neither_initialises_nor_accumulates():
    tracker = OjaTracker("t", 10, 2, subspace_lr=0.5, init="random")
    x = torch.randn(30, 10)
    with pytest.raises(RuntimeError, match="use_reentrant"):
        tracker.project(x, recompute=True)  # no forward in this step: a reentrant recomputation
    tracker.project(x)
    stats = [t.clone() for t in tracker.stats]
    z = tracker.project(x, recompute=True)
    torch.testing.assert_close(z, x @ tracker.basis)
    assert all(torch.equal(a, b) for a, b in zip(stats, tracker.stats, strict=True))


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(rank=11), dict(init="svd"), dict(subspace_lr=-1.0),
                                    dict(update_every=0)])
def test_bad_hyper_parameters_are_clear_errors(kwargs):
    args = dict(rank=2, subspace_lr=0.1) | kwargs
    with pytest.raises(ValueError, match="must be"):
        OjaTracker("t", 10, args.pop("rank"), **args)
