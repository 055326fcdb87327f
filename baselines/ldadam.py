"""LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics (Robert et al., ICLR 2025).

Not on PyPI, so implemented here from the paper's update rule (checked against the authors' public
`ldadamw_torch`). For a weight W (m x n) only the smaller side is compressed: P_t is min(m, n) x r with
orthonormal columns; the low-dimensional gradient and Adam moments are r x n ("left", m <= n) or m x r
("right", m > n). One step, with a = gradient + error buffer:

    B   = rho * lift(P_{t-1}, m_{t-1}) / (1 - beta1^{t-1}) + (1 - rho) * a       (t = 1: B = a, exact SVD)
    P_t = QR(B B^T P_{t-1})  (left)  or  QR(B^T B P_{t-1})  (right)                one warm-started power step
    g~  = P_t^T a  (left)  or  a P_t  (right)
    C   = P_t^T P_{t-1};   m~ = C m (left) / m C^T (right)
    v~  = |rot(C o C, v/(1-beta2^{t-1}) - m^2/(1-beta1^{t-1})^2) + m~^2/(1-beta1^{t-1})^2| * (1-beta2^{t-1})
    e   = a - lift(P_t, g~) + beta1/(1-beta1) * (lift(P_{t-1}, m_{t-1}) - lift(P_t, m~))   (generalised EF)
    m   = beta1 m~ + (1-beta1) g~;   v = beta2 v~ + (1-beta2) g~^2
    W  <- (1 - lr wd) W - lr * lift(P_t, (m / (1-beta1^t)) / (sqrt(v / (1-beta2^t)) + eps))

The error buffer e (m x n) is kept IN the gradient tensor, as in the authors' code: after a step `p.grad`
is the buffer, `optimizer.zero_grad()` leaves it in place and the next backward accumulates the new
gradient into it, so gradient plus buffer cost one m x n tensor. The same tensor is also held as
`state["error"]` so that `state_dict()` saves it; if `p.grad` was dropped meanwhile (`model.zero_grad()`,
or a freshly loaded optimizer) the buffer is added back to the new gradient, with the same result.
Parameters other than the attention/MLP weights (embeddings, norms, lm_head) get plain AdamW with the same
betas, as in the authors' training script.
"""

from __future__ import annotations

import torch

from baselines._common import adam_kwargs, check_rank, split_params, unit_interval
from oasis.grouped import adamw_step
from oasis.optim import adam_direction, transport_moments

__all__ = ["LDAdamW", "adam_direction", "build", "lift", "power_step", "project", "top_subspace",
           "transport_moments"]

DEFAULTS = {"betas": (0.908, 0.99), "rho": 0.908, "error_feedback": True}


# ---- low-dimensional algebra; `left` means P spans the column space (m <= n) ----

def project(P: torch.Tensor, full: torch.Tensor, left: bool) -> torch.Tensor:
    return P.T @ full if left else full @ P


def lift(P: torch.Tensor, low: torch.Tensor, left: bool) -> torch.Tensor:
    return P @ low if left else low @ P.T


def add_lifted_(out: torch.Tensor, P: torch.Tensor, low: torch.Tensor, left: bool, alpha: float) -> None:
    """out += alpha * lift(P, low), as one in-place GEMM: no m x n temporary."""
    if left:
        out.addmm_(P, low, alpha=alpha)
    else:
        out.addmm_(low, P.T, alpha=alpha)


def _factor_dtype(x: torch.Tensor) -> torch.dtype:
    # QR / SVD in float32 at least (bf16 has none), float64 for float64 weights
    return torch.promote_types(x.dtype, torch.float32)


def _orthonormal(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning `x`, by Cholesky-QR2 in float64 (no host sync, unlike a QR that may
    synchronise on CUDA; column signs differ from Householder's, which LDAdam's transport is blind to):
    exact to working precision while cond(x) < ~1e7. Where a Cholesky factorisation fails (x singular or
    worse conditioned) the projector stays `fallback`, decided on the device."""
    a = x.to(torch.float64)
    infos = []
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(a.mT @ a)
        a = torch.linalg.solve_triangular(chol.mT, a, upper=True, left=False)
        infos.append(info)
    dtype = _factor_dtype(x)
    return torch.where((infos[0] == 0) & (infos[1] == 0), a.to(dtype), fallback.to(dtype))


def top_subspace(a: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """First step: top-r left (or right) singular vectors of `a`, exactly (float32 at least)."""
    U, _, Vh = torch.linalg.svd(a.to(_factor_dtype(a)), full_matrices=False)
    return (U[:, :rank] if left else Vh[:rank].T).to(a.dtype)


def power_step(P_prev, m_prev, c_m: float, a, c_a: float, left: bool) -> torch.Tensor:
    """One block power-iteration step, warm-started at P_prev, then QR, on B B^T (left) or B^T B (right) for
    B = c_m * lift(P_prev, m_prev) + c_a * a. B (m x n) is never formed: with P_prev^T P_prev = I,
      left:  B^T P_prev = c_m m_prev^T + c_a a^T P_prev,   B V = c_m P_prev (m_prev V) + c_a a V
      right: B P_prev   = c_m m_prev   + c_a a P_prev,     B^T U = c_m P_prev (m_prev^T U) + c_a a^T U"""
    if left:
        V = torch.add(a.T @ P_prev, m_prev.T, alpha=c_m / c_a) if c_a else m_prev.T * c_m
        Y = torch.add(a @ V, P_prev @ (m_prev @ V), alpha=c_m / c_a) if c_a else P_prev @ (m_prev @ V)
    else:
        U = torch.add(a @ P_prev, m_prev, alpha=c_m / c_a) if c_a else m_prev * c_m
        Y = torch.add(a.T @ U, P_prev @ (m_prev.T @ U), alpha=c_m / c_a) if c_a else P_prev @ (m_prev.T @ U)
    return _orthonormal(Y, P_prev).to(a.dtype)  # overall scale (c_a) does not change the span


class LDAdamW(torch.optim.Optimizer):
    """LDAdam for param groups with a `rank`; plain AdamW for groups whose rank is None."""

    def __init__(self, params, lr=1e-3, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0, rank=None,
                 rho=0.908, error_feedback=True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, rho=rho,
                        error_feedback=error_feedback)
        super().__init__(params, defaults)
        # per weight: the rotations C = P_tᵀ P_(t-1) since the last query, whose angles are computed only when
        # asked (an SVD synchronises on CUDA); one r × r per step and weight, dropped at each query
        self._moved: dict[int, list[torch.Tensor]] = {}
        for group in self.param_groups:
            if group["rank"] is None:
                continue
            for p in group["params"]:
                if p.dim() != 2 or not 1 <= group["rank"] <= min(p.shape):
                    raise ValueError(f"LDAdam rank={group['rank']} is out of range for a {tuple(p.shape)} "
                                     f"weight: must be in 1..{min(p.shape) if p.dim() == 2 else 0}")

    def subspace_drift(self) -> float:
        """Mean over compressed weights of the largest principal angle (radians) between successive
        projectors, summed since the previous call; 0.0 when nothing moved."""
        if not self._moved:
            return 0.0
        weights = len(self._moved)
        rotations = torch.stack([c.float() for cs in self._moved.values() for c in cs])
        # smallest singular value of C = cos(largest angle), in float32 as ever
        angles = torch.linalg.svdvals(rotations)[..., -1].clamp(-1.0, 1.0).arccos()
        self._moved = {}
        return float(angles.sum()) / weights

    def gradient_projectors(self):
        """[(weight, its current projector P_t)] for the tracking diagnostic (`suites.tracking`)."""
        return [(p, st["proj"]) for p, st in self.state.items() if "proj" in st]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Like torch's, except that a gradient tensor holding an error buffer is kept (it IS the buffer)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.grad is self.state.get(p, {}).get("error"):
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["rank"] is None:  # foreach, as torch.optim.AdamW(foreach=True)
                if params:
                    adamw_step(params, [self.state[p] for p in params], group, lambda t: t)
                continue
            for p in params:
                self._ldadam(p, group)
        return loss

    def _ldadam(self, p, group):
        st = self.state[p]
        beta1 = group["betas"][0]
        rank, rho = group["rank"], group["rho"]
        left = p.shape[0] <= p.shape[1]  # compress the smaller side
        a = p.grad  # gradient + error buffer (accumulated in place by autograd, or added just below)
        if "error" in st and st["error"] is not a:
            a.add_(st["error"])
        k = st.get("step", 0)  # steps taken before this one

        if k == 0:
            P = top_subspace(a, rank, left)
            P_old = m = m_new = v_new = None
        else:
            P_old, m, v = st["proj"], st["exp_avg"], st["exp_avg_sq"]
            # B = rho * (lifted, bias-corrected momentum) + (1 - rho) * (gradient + error buffer)
            P = power_step(P_old, m, rho / (1 - beta1 ** k), a, 1 - rho, left)
            C = P.T @ P_old
            m_new, v_new = transport_moments(m, v, C, k, group["betas"], left=left)
            self._moved.setdefault(id(p), []).append(C)

        g_low = project(P, a, left)
        if group["error_feedback"]:  # all in place on a: the buffer costs no m x n temporary
            add_lifted_(a, P, g_low, left, -1.0)  # gradient-compression error
            if m is not None:  # optimizer-state-compression error (generalised EF)
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


def build(model, cfg):
    rank = check_rank(model, cfg["rank"])
    kwargs = adam_kwargs(cfg)
    rho = unit_interval(cfg, "rho")
    error_feedback = cfg["error_feedback"]
    if not isinstance(error_feedback, bool):
        raise ValueError(f"error_feedback={error_feedback!r} is not valid; choose from True, False")
    matrices, rest = split_params(model)
    groups = [{"params": rest, "rank": None}, {"params": matrices, "rank": rank}]
    return model, LDAdamW(groups, rho=rho, error_feedback=error_feedback, **kwargs)
