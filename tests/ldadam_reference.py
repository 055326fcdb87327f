"""Test-only reference: LDAdam's per-weight step as it was before the batched one, kept verbatim in its
maths so that the batched step (`baselines.ldadam.LDAdamW._ldadam`) can be pinned to it
(tests/test_ldadam_batched.py).

`ReferenceLDAdamW` replaces only the compressed weights' step: one weight at a time, with the per-weight
power step and Cholesky-QR2 below. Construction, param groups, state, the AdamW (foreach) step of the other
parameters, `zero_grad` and `subspace_drift` are `LDAdamW`'s own.
"""

from __future__ import annotations

import torch

from baselines.ldadam import LDAdamW, add_lifted_, project, top_subspace
from oasis.optim import adam_direction, transport_moments


def _factor_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def reference_orthonormal(x, fallback):
    a = x.to(torch.float64)
    infos = []
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(a.mT @ a)
        a = torch.linalg.solve_triangular(chol.mT, a, upper=True, left=False)
        infos.append(info)
    dtype = _factor_dtype(x)
    return torch.where((infos[0] == 0) & (infos[1] == 0), a.to(dtype), fallback.to(dtype))


def reference_power_step(P_prev, m_prev, c_m, a, c_a, left):
    if left:
        V = torch.add(a.T @ P_prev, m_prev.T, alpha=c_m / c_a) if c_a else m_prev.T * c_m
        Y = torch.add(a @ V, P_prev @ (m_prev @ V), alpha=c_m / c_a) if c_a else P_prev @ (m_prev @ V)
    else:
        U = torch.add(a @ P_prev, m_prev, alpha=c_m / c_a) if c_a else m_prev * c_m
        Y = torch.add(a.T @ U, P_prev @ (m_prev.T @ U), alpha=c_m / c_a) if c_a else P_prev @ (m_prev.T @ U)
    return reference_orthonormal(Y, P_prev).to(a.dtype)


class ReferenceLDAdamW(LDAdamW):
    def _ldadam(self, params, group):
        for p in params:
            self._reference_step(p, group)

    def _reference_step(self, p, group):
        st = self.state[p]
        beta1 = group["betas"][0]
        rank, rho = group["rank"], group["rho"]
        left = p.shape[0] <= p.shape[1]
        a = p.grad
        if "error" in st and st["error"] is not a:
            a.add_(st["error"])
        k = st.get("step", 0)

        if k == 0:
            P = top_subspace(a, rank, left)
            P_old = m = m_new = v_new = None
        else:
            P_old, m, v = st["proj"], st["exp_avg"], st["exp_avg_sq"]
            P = reference_power_step(P_old, m, rho / (1 - beta1 ** k), a, 1 - rho, left)
            C = P.T @ P_old
            m_new, v_new = transport_moments(m, v, C, k, group["betas"], left=left)
            self._moved.setdefault(id(p), []).append(C)

        g_low = project(P, a, left)
        if group["error_feedback"]:
            add_lifted_(a, P, g_low, left, -1.0)
            if m is not None:
                coef = beta1 / (1 - beta1)
                add_lifted_(a, P_old, m, left, coef)
                add_lifted_(a, P, m_new, left, -coef)
            st["error"] = a

        if m_new is None:
            m_new, v_new = torch.zeros_like(g_low), torch.zeros_like(g_low)
        d, step_size = adam_direction(m_new, v_new, g_low, k + 1, group["betas"], group["eps"], group["lr"])
        st["step"], st["proj"], st["exp_avg"], st["exp_avg_sq"] = k + 1, P, m_new, v_new
        p.mul_(1 - group["lr"] * group["weight_decay"])
        add_lifted_(p, P, d, left, -step_size)
