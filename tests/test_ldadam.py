"""LDAdam (baselines/ldadam.py): moment transport, error feedback, projector, buffer lifetime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.ldadam import LDAdamW, lift, power_step, project, top_subspace, transport_moments

BETAS = (0.908, 0.99)


pytestmark = pytest.mark.usefixtures("one_thread")


def _moments(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    v = m * m + torch.rand(shape, generator=g, dtype=torch.float64)  # a valid second moment: v >= m^2
    return m, v


@pytest.mark.parametrize("left", [True, False])
def test_identity_change_of_basis_leaves_moments_alone(left):
    shape = (6, 11) if left else (11, 6)
    m, v = _moments(shape)
    m_new, v_new = transport_moments(m, v, torch.eye(6, dtype=torch.float64), step=5, betas=BETAS, left=left)
    torch.testing.assert_close(m_new, m)
    torch.testing.assert_close(v_new, v)


@pytest.mark.parametrize("left", [True, False])
def test_permutation_permutes_moments(left):
    r = 6
    shape = (r, 11) if left else (11, r)
    m, v = _moments(shape, seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    C = torch.eye(r, dtype=torch.float64)[perm]  # new coordinate i = old coordinate perm[i]
    m_new, v_new = transport_moments(m, v, C, step=3, betas=BETAS, left=left)
    index = (perm, slice(None)) if left else (slice(None), perm)
    torch.testing.assert_close(m_new, m[index])
    torch.testing.assert_close(v_new, v[index])


def test_rotation_mixes_variances_with_squared_weights():
    # a 90-degree-free hand case: C = [[c, -s], [s, c]] on two independent coordinates
    c, s = 0.6, 0.8
    C = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    m = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    var = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    step, (b1, b2) = 4, BETAS
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    v = (var + (m / bc1) ** 2) * bc2  # stored v such that v_hat - m_hat^2 = var
    m_new, v_new = transport_moments(m, v, C, step, BETAS, left=True)
    torch.testing.assert_close(m_new, C @ m)
    expected_var = torch.tensor([[c * c * 0.5 + s * s * 3.0], [s * s * 0.5 + c * c * 3.0]],
                                dtype=torch.float64)
    torch.testing.assert_close(v_new, (expected_var + (m_new / bc1) ** 2) * bc2)


def test_first_projector_is_top_singular_subspace_and_power_step_keeps_exact_subspace():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 3, generator=g))
    V, _ = torch.linalg.qr(torch.randn(20, 3, generator=g))
    A = U @ torch.diag(torch.tensor([5.0, 3.0, 2.0])) @ V.T  # rank 3, known subspaces
    P_left = top_subspace(A, 3, left=True)
    torch.testing.assert_close(P_left @ P_left.T, U @ U.T, atol=1e-5, rtol=0)
    P_right = top_subspace(A, 3, left=False)
    torch.testing.assert_close(P_right @ P_right.T, V @ V.T, atol=1e-5, rtol=0)
    # a warm start that overlaps the true subspace reaches it in one step when B has rank r
    start, _ = torch.linalg.qr(U + 0.3 * torch.randn(12, 3, generator=g))
    P = power_step(start, torch.zeros(3, 20), 0.0, A, 1.0, left=True)
    torch.testing.assert_close(P.T @ P, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ P.T, U @ U.T, atol=1e-4, rtol=0)


@pytest.mark.parametrize("left", [True, False])
def test_factored_power_step_equals_the_step_on_explicit_B(left):
    g = torch.Generator().manual_seed(4)
    shape, r = ((9, 14) if left else (14, 9)), 3
    P_prev, _ = torch.linalg.qr(torch.randn(9, r, generator=g, dtype=torch.float64))
    m_prev = torch.randn((r, 14) if left else (14, r), generator=g, dtype=torch.float64)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    c_m, c_a = 0.908 / (1 - 0.908 ** 3), 1 - 0.908
    B = c_m * lift(P_prev, m_prev, left) + c_a * a
    Y = B @ (B.T @ P_prev) if left else B.T @ (B @ P_prev)
    expected = torch.linalg.qr(Y.float())[0]
    P = power_step(P_prev, m_prev, c_m, a, c_a, left)
    torch.testing.assert_close(P @ P.T, (expected @ expected.T).double(), atol=1e-5, rtol=0)


def _single(shape, beta1, rank=3, seed=0, error_feedback=True):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(shape))
    opt = LDAdamW([{"params": [w], "rank": rank}], lr=1e-2, betas=(beta1, 0.99),
                  error_feedback=error_feedback)
    return w, opt


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
@pytest.mark.parametrize("beta1", [0.0, 0.908])
def test_error_feedback_conserves_gradient(shape, beta1):
    """Per step: lift(P_t, g~) + e_new = a (gradient + old buffer) up to the generalised-EF momentum term,
    which is zero when beta1 = 0 and otherwise beta1/(1-beta1)·(lift(P_{t-1} m_{t-1}) - lift(P_t m~))."""
    w, opt = _single(shape, beta1)
    left = shape[0] <= shape[1]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grad = torch.randn(shape, generator=g)
        st = opt.state[w]
        old_error = st["error"].clone() if step else torch.zeros(shape)
        if step:
            P_old, m_old = st["proj"].clone(), st["exp_avg"].clone()
            w.grad.add_(grad)  # what autograd does: accumulate into the kept buffer
        else:
            w.grad = grad.clone()
        a = grad + old_error
        opt.step()
        P, m_new, e_new = st["proj"], st["exp_avg"], st["error"]
        assert e_new is w.grad
        g_low = project(P, a, left)
        applied = lift(P, g_low, left)
        if beta1 == 0.0 or step == 0:
            momentum_term = torch.zeros(shape)
        else:
            # the old momentum carried into the new basis, from the formula (C = P_tᵀ P_{t-1})
            C = P.T @ P_old
            m_transported = C @ m_old if left else m_old @ C.T
            momentum_term = beta1 / (1 - beta1) * (lift(P_old, m_old, left) - lift(P, m_transported, left))
            expected_m = beta1 * m_transported + (1 - beta1) * g_low
            torch.testing.assert_close(m_new, expected_m, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(applied + e_new - momentum_term, a, atol=1e-5, rtol=1e-5)
        if beta1 == 0.0:
            torch.testing.assert_close(lift(P, m_new, left) + e_new, a, atol=1e-5, rtol=1e-5)
        assert e_new.abs().sum() > 0  # rank 3 < 8: something is always left over


def test_error_buffer_survives_zero_grad_and_model_zero_grad_gives_same_result():
    from torch import nn

    def run(clear):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
        opt = LDAdamW([{"params": [net[0].weight, net[2].weight], "rank": 2},
                       {"params": [net[0].bias, net[2].bias], "rank": None}], lr=1e-2)
        x = torch.randn(32, 10, generator=torch.Generator().manual_seed(3))
        for _ in range(4):
            net(x).pow(2).mean().backward()
            opt.step()
            kept = net[0].weight.grad
            clear(net, opt)
        return net, opt, kept

    net, opt, kept = run(lambda net, opt: opt.zero_grad())
    assert net[0].weight.grad is kept is opt.state[net[0].weight]["error"]  # buffer kept by zero_grad
    assert kept.abs().sum() > 0
    assert net[0].bias.grad is None  # plain AdamW params are cleared as usual
    net2, _, _ = run(lambda net, opt: net.zero_grad())  # drops .grad; the buffer is re-added from state
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_without_error_feedback_zero_grad_clears_and_no_buffer_is_kept():
    w, opt = _single((8, 20), 0.9, error_feedback=False)
    w.grad = torch.randn(8, 20)
    opt.step()
    assert "error" not in opt.state[w]
    opt.zero_grad()
    assert w.grad is None


def test_rank_above_layer_size_is_a_clear_error():
    w = torch.nn.Parameter(torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"1\.\.4"):
        LDAdamW([{"params": [w], "rank": 5}])


def test_update_is_lr_times_lifted_adam_direction():
    # first step: m = (1-b1) g~, v = (1-b2) g~^2 -> direction = sign(g~) (up to eps): W -= lr P sign(g~)
    w, opt = _single((6, 15), 0.9, rank=2)
    w0 = w.detach().clone()
    w.grad = torch.randn(6, 15, generator=torch.Generator().manual_seed(2))
    a = w.grad.clone()
    opt.step()
    # P = top-2 left singular vectors of a (numpy's SVD; P sign(Pᵀa) does not depend on their signs)
    u, _, _ = np.linalg.svd(a.double().numpy())
    P = torch.from_numpy(u[:, :2]).float()
    expected = w0 - 1e-2 * lift(P, torch.sign(project(P, a, True)), True)
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=1e-5)


def test_subspace_drift_reports_projector_movement():
    w, opt = _single((8, 20), 0.9)
    assert opt.subspace_drift() == 0.0
    g = torch.Generator().manual_seed(5)
    w.grad = torch.randn(8, 20, generator=g)
    opt.step()
    assert opt.subspace_drift() == 0.0  # first step: SVD, no previous projector
    P_old = opt.state[w]["proj"].clone()
    w.grad.add_(torch.randn(8, 20, generator=g))
    opt.step()
    cos = torch.linalg.svdvals(opt.state[w]["proj"].T @ P_old).min().clamp(max=1.0)
    assert opt.subspace_drift() == pytest.approx(float(torch.arccos(cos)), abs=1e-6)
    assert opt.subspace_drift() == 0.0  # reset by the query


# ---- the whole trajectory against a float64 reference from the update rule (numpy, no project code) ----

def _qr(a):
    return np.linalg.qr(a)[0]


def _ldadam_reference(w0, grads, rank, lr, betas, eps, wd, rho):
    """LDAdam (DESIGN §4 / module docstring) in numpy float64: returns per-step (P, m, v, e, W)."""
    b1, b2 = betas
    w = w0.copy()
    left = w.shape[0] <= w.shape[1]

    def lift(P, low):
        return P @ low if left else low @ P.T

    P = m = v = None
    e = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        a = g + e
        if t == 1:
            u, _, vh = np.linalg.svd(a)
            P = u[:, :rank] if left else vh[:rank].T
            m_t = v_t = np.zeros((rank, w.shape[1]) if left else (w.shape[0], rank))
            P_old = None
        else:
            P_old = P
            B = rho * lift(P_old, m) / (1 - b1 ** (t - 1)) + (1 - rho) * a
            P = _qr(B @ B.T @ P_old) if left else _qr(B.T @ B @ P_old)
            C = P.T @ P_old
            bc1, bc2 = 1 - b1 ** (t - 1), 1 - b2 ** (t - 1)
            var = v / bc2 - (m / bc1) ** 2
            if left:
                m_t = C @ m
                v_t = np.abs((C * C) @ var + (m_t / bc1) ** 2) * bc2
            else:
                m_t = m @ C.T
                v_t = np.abs(var @ (C * C).T + (m_t / bc1) ** 2) * bc2
        g_low = P.T @ a if left else a @ P
        e = a - lift(P, g_low)
        if P_old is not None:
            e += b1 / (1 - b1) * (lift(P_old, m) - lift(P, m_t))
        m = b1 * m_t + (1 - b1) * g_low
        v = b2 * v_t + (1 - b2) * g_low ** 2
        d = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        w = (1 - lr * wd) * w - lr * lift(P, d)
        out.append((P, m, v, e, w.copy()))
    return out


@pytest.mark.parametrize("shape", [(6, 15), (15, 6)])
def test_moments_follow_a_moving_projector_as_a_float64_reference_says(shape):
    rank, lr, eps, wd, rho = 3, 1e-2, 1e-8, 0.1, 0.908
    left = shape[0] <= shape[1]
    gen = np.random.default_rng(0)
    w0 = gen.standard_normal(shape)
    grads = [gen.standard_normal(shape) for _ in range(6)]
    reference = _ldadam_reference(w0, grads, rank, lr, BETAS, eps, wd, rho)

    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = LDAdamW([{"params": [w], "rank": rank}], lr=lr, betas=BETAS, eps=eps, weight_decay=wd, rho=rho)
    angles = []
    for g, (P_ref, m_ref, v_ref, e_ref, w_ref) in zip(grads, reference, strict=True):
        if w.grad is None:
            w.grad = torch.from_numpy(g.copy())
        else:
            w.grad.add_(torch.from_numpy(g))  # what autograd does: accumulate into the kept buffer
        opt.step()
        opt.zero_grad()
        st = opt.state[w]
        P = st["proj"].numpy()
        signs = np.sign(np.diag(P_ref.T @ P))  # QR/SVD column signs are a convention: align them
        np.testing.assert_allclose(P, P_ref * signs, atol=1e-10)
        m_aligned = signs[:, None] * m_ref if left else m_ref * signs
        np.testing.assert_allclose(st["exp_avg"].numpy(), m_aligned, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(st["exp_avg_sq"].numpy(), v_ref, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(st["error"].numpy(), e_ref, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(w.detach().numpy(), w_ref, rtol=1e-10, atol=1e-12)
        angles.append(opt.subspace_drift())
    assert max(angles[1:]) > 0.1  # the projector really moved (radians), so the transport mattered
