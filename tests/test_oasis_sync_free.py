"""OASIS's forward, backward and optimizer step read nothing back to the host (no `.item()`, no linalg whose
info is checked on the host, no device-changing copy, no tensor built from Python data), and its step
compiles as one graph (`torch.compile(fullgraph=True)`) that computes what eager does. The guard is
`suites.measure.dispatch.NoHostSync` in its strict mode (every tensor taken as a device tensor): what counts
as a sync is listed there, once for the speed tool, the op-count check and these tests."""

import copy

import pytest
import torch

from baselines import ldadam, pca
from oasis import OasisConfig, prepare
from suites.measure.dispatch import HostSyncError, NoHostSync
from tests.tiny_lm import TinyLM

pytestmark = pytest.mark.usefixtures("one_thread")

def _model():
    # a Llama-shaped block in plain torch: transformers' own forward reads values back (its packed-sequence
    # check), which is not what this file pins
    torch.manual_seed(0)
    return TinyLM(vocab=64, d=32, hidden=48)


def _ids(seed):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _train_step(model, opt, seed):
    model(_ids(seed)).backward()
    opt.step()
    opt.zero_grad()


def _method(name, model):
    cfg = {"lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "rank": 8, "seed": 0}
    if name == "oasis":
        return prepare(model, OasisConfig(rank=8, init="random"), lr=1e-3, weight_decay=0.01)
    if name == "pca":  # a refresh at every step
        return pca.build(model, {**pca.DEFAULTS, **cfg, "refresh_every": 1, "transport": "ldadam"})[1]
    return ldadam.build(model, {**ldadam.DEFAULTS, **cfg})[1]


@pytest.mark.parametrize("method", ["oasis", "ldadam"])
def test_training_steps_read_nothing_back(method):
    model = _model()
    opt = _method(method, model)
    _train_step(model, opt, 0)  # the first step initialises (a PCA start, LDAdam's SVD): not guarded
    with NoHostSync():
        for seed in (1, 2):  # bases move at every step and the moments follow
            _train_step(model, opt, seed)
    assert opt.subspace_drift() > 0  # the guarded steps did move the bases


def test_pca_steps_read_nothing_back_but_the_refresh():
    # the refresh itself is an eigh in forward (every `refresh_every` steps; it synchronises on CUDA); the
    # steps between refreshes, and the step that transports the moments across one, do not
    model = _model()
    opt = _method("pca", model)
    for tracker in opt.trackers:
        tracker.update_every = 2
    _train_step(model, opt, 0)
    with NoHostSync():
        _train_step(model, opt, 1)
    model(_ids(2)).backward()  # refreshes in forward
    with NoHostSync():
        opt.step()
    opt.zero_grad()
    assert opt.subspace_drift() > 0


def test_the_guard_catches_what_the_old_step_did():
    # the per-layer step read σ_max with svdvals and the drift angle with an fp64 svdvals at every move
    from oasis import LLAMA_TARGETS, compress
    from tests.oasis_reference import ReferenceOasisAdamW, ReferenceOjaTracker

    model = _model()
    layers = compress(model, LLAMA_TARGETS, 8, lambda n, d, r: ReferenceOjaTracker(n, d, r, init="random",
                                                                            normalization="sigma_max"))
    opt = ReferenceOasisAdamW(model, layers, lr=1e-3)
    assert all(type(t) is ReferenceOjaTracker for t in opt.trackers)
    _train_step(model, opt, 0)
    with pytest.raises(HostSyncError), NoHostSync():
        _train_step(model, opt, 1)


def test_compiled_step_equals_eager():
    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    eager = prepare(eager_model, OasisConfig(rank=8, init="random"), lr=1e-3, weight_decay=0.01)
    opt = prepare(compiled_model, OasisConfig(rank=8, init="random"), lr=1e-3, weight_decay=0.01)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        for model, do_step in ((eager_model, eager.step), (compiled_model, step)):
            model(_ids(seed)).backward()
            do_step()
            for p in model.parameters():
                p.grad = None
    for p, q in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for t, u in zip(opt.trackers, eager.trackers, strict=True):
        torch.testing.assert_close(t.basis, u.basis, rtol=1e-5, atol=1e-6)
    assert opt.subspace_drift() == pytest.approx(eager.subspace_drift(), rel=1e-4)
