"""The batched, sync-free OASIS step (`oasis.grouped`) equals the per-layer step it replaced
(`tests/oasis_reference.py`; σ_max as it was, the later normalisations one tracker at a time): weights,
moments and bases after 20 steps with basis moves, to 1e-6 relative in float32 and 1e-12 in float64; also
without transport, moving every 3 steps, with q/k/v and gate/up sharing a basis or not, with two
micro-batches per step, and with the refresh-in-forward policy (periodic PCA)."""

import copy

import pytest
import torch

from baselines.pca import PeriodicPCATracker
from oasis import LLAMA_TARGETS, OasisAdamW, OjaTracker, compress
from oasis.subspace import oja_step, orthonormalize, orthonormalize_cholesky, top_singular_value
from suites.train.models import build_model, llama_config
from tests.oasis_reference import ReferenceOasisAdamW, ReferenceOjaTracker

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def _model(dtype):
    # q (32 out) and k/v (16 out) differ, gate/up (48 out) read the 32-wide input, down reads 48: several
    # groups of each kind
    cfg = llama_config("llama-tiny", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=64, num_hidden_layers=2)
    return build_model(cfg, dtype=dtype, seed=0)


def _build(model, optimizer_cls, tracker_cls, *, transport="ldadam", update_every=1, share_inputs=True,
           pca=False, subspace_lr=0.1, normalization="sigma_max"):
    def make_tracker(name, d_in, rank):
        if pca:
            return PeriodicPCATracker(name, d_in, rank, update_every=update_every)
        return tracker_cls(name, d_in, rank, subspace_lr=subspace_lr, update_every=update_every,
                           init="random", normalization=normalization)

    layers = compress(model, LLAMA_TARGETS, 8, make_tracker, share_inputs=share_inputs)
    return optimizer_cls(model, layers, transport=transport, **HP)


def _run(model, opt, micro_batches: int):
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for _ in range(micro_batches):
            ids = torch.randint(0, 64, (2, 12), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _relative(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


CASES = {
    "moves every step": {},
    "sanger (the default)": {"normalization": "sanger"},
    "trace": {"normalization": "trace"},
    "no transport": {"transport": "none"},
    "moves every 3 steps": {"update_every": 3},
    "no shared bases": {"share_inputs": False},
    "two micro-batches": {"micro_batches": 2},
    "pca refresh in forward": {"pca": True, "update_every": 4},
}


# float32: weights and bases to 1e-6; the moments drift further apart (to ~2.5e-6): the second moment's
# transport subtracts m̂² from v̂, and an ulp of difference in a rotation (a batched GEMM against a single
# one, Cholesky-QR2 against Householder QR) is amplified there over 20 steps.
# float64 models: the bases are float32 by design (`oasis.subspace`), so an Oja move differs in float32
# rounding whatever the model's dtype; 1e-12 pins everything else (foreach Adam, the lifted update, the
# batched transport) with bases that move identically on both sides: the PCA refresh in forward, and frozen
# bases
# (a float32 PCA refresh is left to float64: eigh's eigenvectors amplify the weights' rounding by 1/eigengap)
F32_CASES = [(case, torch.float32, 1e-6, 5e-6) for case in CASES if case != "pca refresh in forward"]
F64_CASES = [(case, torch.float64, 1e-12, 1e-12) for case in
             ("pca refresh in forward", "pca refresh, no shared bases", "pca refresh, two micro-batches",
              "frozen bases")]
CASES.update({"pca refresh, no shared bases": {"pca": True, "update_every": 4, "share_inputs": False},
              "pca refresh, two micro-batches": {"pca": True, "update_every": 4, "micro_batches": 2},
              "frozen bases": {"subspace_lr": 0.0}})


@pytest.mark.parametrize("case, dtype, tol, moment_tol", F32_CASES + F64_CASES)
def test_batched_step_equals_the_per_layer_step(case, dtype, tol, moment_tol):
    options = dict(CASES[case])
    micro_batches = options.pop("micro_batches", 1)
    ref_model = _model(dtype)
    model = copy.deepcopy(ref_model)
    ref = _build(ref_model, ReferenceOasisAdamW, ReferenceOjaTracker, **options)
    opt = _build(model, OasisAdamW, OjaTracker, **options)
    _run(ref_model, ref, micro_batches)
    _run(model, opt, micro_batches)
    worst = {}
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        if not name.endswith("grad_carrier"):
            worst[name] = _relative(p.detach(), q.detach())
    for t, u in zip(opt.trackers, ref.trackers, strict=True):
        worst[f"basis {t.name}"] = _relative(t.basis, u.basis)
    assert max(worst.values()) <= tol, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    moments = {}
    for p, q in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"],
                    ref.param_groups[0]["params"] + ref.param_groups[1]["params"], strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            moments[f"{key} {tuple(p.shape)}"] = max(moments.get(f"{key} {tuple(p.shape)}", 0.0),
                                                    _relative(opt.state[p][key], ref.state[q][key]))
    assert max(moments.values()) <= moment_tol, sorted(moments.items(), key=lambda kv: -kv[1])[:5]
    # the bases did move, the weights were trained, and the reference is not the batched path itself
    start = _model(dtype)
    assert min(_relative(p.detach(), q.detach()) for p, q in zip(ref_model.parameters(), start.parameters())
               if p.shape == q.shape) > 1e-4
    assert sum(t.steps for t in ref.trackers) == STEPS * len(ref.trackers)
    drift = opt.subspace_drift()
    assert drift == pytest.approx(ref.subspace_drift(), rel=1e-4, abs=1e-12)
    assert (drift > 0) == (case != "frozen bases")


def test_top_singular_value_matches_svdvals_on_hard_spectra():
    # top two singular values 1e-6 apart (the squarings cannot separate them) and a zero matrix
    gen = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(40, 8, dtype=torch.float64, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))
    values = torch.tensor([3.0, 3.0 - 3e-6, 2.9, 1.0, 0.5, 0.1, 0.0, 0.0], dtype=torch.float64)
    s = torch.stack([q1 @ torch.diag(values) @ q2.T, torch.zeros(40, 8, dtype=torch.float64)])
    expected = torch.linalg.svdvals(s)[:, 0]
    torch.testing.assert_close(top_singular_value(s), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(top_singular_value(s.float()), expected.float(), rtol=1e-6, atol=0)


def test_cholesky_qr2_is_the_sign_fixed_qr_batched():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 30, 6, dtype=torch.float64, generator=gen)
    expected = torch.stack([orthonormalize(x) for x in a])
    torch.testing.assert_close(orthonormalize_cholesky(a), expected, rtol=0, atol=1e-13)


def test_oja_step_batched_equals_one_at_a_time():
    gen = torch.Generator().manual_seed(0)
    u = orthonormalize_cholesky(torch.randn(3, 20, 4, dtype=torch.float64, generator=gen))
    x = torch.randn(3, 50, 20, dtype=torch.float64, generator=gen)
    c = x.mT @ x / 50
    s, k = c @ u, u.mT @ c @ u
    batched = oja_step(u, s, k, subspace_lr=0.3, normalization="sigma_max")
    for i in range(3):
        sigma = torch.linalg.svdvals(s[i])[0]
        expected = u[i] + (0.3 / sigma) * (s[i] - u[i] @ k[i])
        torch.testing.assert_close(batched[i], expected, rtol=1e-12, atol=1e-14)
