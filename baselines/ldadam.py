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

The step is batched (issue 21): weights of equal shape, dtypes, device and step count are stepped together
(stacked power step and Cholesky-QR2, moment transport, Adam direction); only the products with each m x n
gradient, the error update and the lifted weight update run per weight, so the gradients are never
stacked (copied). Each weight's state stays its own (`state[p]`, saved by `state_dict()`); after a step
its tensors are views of the batch's stacks. The per-weight step it replaced is kept as the test reference
(tests/ldadam_reference.py).
"""

from __future__ import annotations

import torch

from baselines._common import adam_kwargs, check_rank, split_params, unit_interval
from oasis.grouped import _by, adamw_step
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
    """Orthonormal columns spanning `x` (..., m, r; a leading batch dim allowed), by Cholesky-QR2 in float64
    (`oasis.subspace.orthonormalize_cholesky`'s two passes, keeping the factorisations' infos: no host sync,
    unlike a QR that may synchronise on CUDA; column signs differ from Householder's, which LDAdam's
    transport is blind to): exact to working precision while cond(x) < ~1e7. Where a Cholesky
    factorisation fails (x singular or worse conditioned) the projector stays `fallback`, decided on the
    device, per matrix."""
    a = x.to(torch.float64)
    infos = []
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(a.mT @ a)
        a = torch.linalg.solve_triangular(chol.mT, a, upper=True, left=False)
        infos.append(info)
    dtype = _factor_dtype(x)
    ok = ((infos[0] == 0) & (infos[1] == 0))[..., None, None]
    return torch.where(ok, a.to(dtype), fallback.to(dtype))


def top_subspace(a: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """First step: top-r left (or right) singular vectors of `a`, exactly (float32 at least)."""
    U, _, Vh = torch.linalg.svd(a.to(_factor_dtype(a)), full_matrices=False)
    return (U[:, :rank] if left else Vh[:rank].T).to(a.dtype)


def _times(a, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """aᵀx (`transpose`) or ax; `a` one tensor (batch dims allowed) or a list of m x n tensors, one per x[i]
    of a stack (the gradients stay where they are: stacking them would copy every m x n buffer)."""
    if isinstance(a, torch.Tensor):
        return (a.mT if transpose else a) @ x
    return torch.stack([(ai.T if transpose else ai) @ xi for ai, xi in zip(a, x.unbind(0), strict=True)])


def power_step(P_prev, m_prev, c_m: float, a, c_a: float, left: bool) -> torch.Tensor:
    """One block power-iteration step, warm-started at P_prev, then QR, on B B^T (left) or B^T B (right) for
    B = c_m * lift(P_prev, m_prev) + c_a * a. B (m x n) is never formed: with P_prev^T P_prev = I,
      left:  B^T P_prev = c_m m_prev^T + c_a a^T P_prev,   B V = c_m P_prev (m_prev V) + c_a a V
      right: B P_prev   = c_m m_prev   + c_a a P_prev,     B^T U = c_m P_prev (m_prev^T U) + c_a a^T U
    Batched: P_prev and m_prev stacked (k, ...) and `a` a list of k gradients (or a stacked tensor)."""
    dtype = a.dtype if isinstance(a, torch.Tensor) else a[0].dtype
    if left:
        V = torch.add(_times(a, P_prev, True), m_prev.mT, alpha=c_m / c_a) if c_a else m_prev.mT * c_m
        Y = (torch.add(_times(a, V, False), P_prev @ (m_prev @ V), alpha=c_m / c_a) if c_a
             else P_prev @ (m_prev @ V))
    else:
        U = torch.add(_times(a, P_prev, False), m_prev, alpha=c_m / c_a) if c_a else m_prev * c_m
        Y = (torch.add(_times(a, U, True), P_prev @ (m_prev.mT @ U), alpha=c_m / c_a) if c_a
             else P_prev @ (m_prev.mT @ U))
    return _orthonormal(Y, P_prev).to(dtype)  # overall scale (c_a) does not change the span


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
        # one stack per rank (param groups may differ); smallest singular value of C = cos(largest angle),
        # in float32 as ever
        total = sum(torch.linalg.svdvals(torch.stack(rotations))[..., -1].clamp(-1.0, 1.0).arccos().sum()
                    for rotations in _by((c.float() for cs in self._moved.values() for c in cs),
                                         lambda c: (c.shape, c.device)).values())
        self._moved = {}
        return float(total) / weights

    def gradient_projectors(self):
        """[(weight, its current projector P_t)] for the tracking diagnostic (`suites.measure.tracking`)."""
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
            self._ldadam(params, group)
        return loss

    def _ldadam(self, params, group):
        """One batched step per set of weights of equal shape, dtypes, device and step count; only the
        products with the m x n gradients and the lifted updates run per weight (in-place GEMMs)."""
        states = [self.state[p] for p in params]
        grads = []
        for p, st in zip(params, states):
            a = p.grad  # gradient + error buffer (accumulated in place by autograd, or added just below)
            if "error" in st and st["error"] is not a:
                a.add_(st["error"])
            grads.append(a)
        key = lambda i: (tuple(params[i].shape), params[i].dtype, grads[i].dtype, grads[i].device,  # noqa: E731
                         states[i].get("step", 0))
        for (*_, k), idx in _by(range(len(params)), key).items():
            self._ldadam_batch([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx],
                               group, k)

    def _ldadam_batch(self, params, grads, states, group, k):
        beta1 = group["betas"][0]
        rank, rho = group["rank"], group["rho"]
        left = params[0].shape[0] <= params[0].shape[1]  # compress the smaller side
        # k = steps taken before this one; the projectors, moments and rotations are stacked (..., r-sized)
        if k == 0:  # one SVD per weight: a stacked SVD would hold every weight's factors at once
            P = torch.stack([top_subspace(a, rank, left) for a in grads])
            P_old = m = m_new = v_new = None
        else:
            P_old = torch.stack([st["proj"] for st in states])
            m = torch.stack([st["exp_avg"] for st in states])
            v = torch.stack([st["exp_avg_sq"] for st in states])
            # B = rho * (lifted, bias-corrected momentum) + (1 - rho) * (gradient + error buffer)
            P = power_step(P_old, m, rho / (1 - beta1 ** k), grads, 1 - rho, left)
            C = P.mT @ P_old
            m_new, v_new = transport_moments(m, v, C, k, group["betas"], left=left)
            for p, c in zip(params, C.unbind(0)):
                self._moved.setdefault(id(p), []).append(c)

        g_low = torch.stack([project(P_i, a, left) for P_i, a in zip(P.unbind(0), grads)])
        if group["error_feedback"]:  # all in place on a: the buffer costs no m x n temporary
            # a -= lift(P, g~) (gradient-compression error) and, with a previous projector, the
            # optimizer-state-compression error (generalised EF): a += coef (lift(P_old, m) - lift(P, m~)),
            # i.e. a -= lift([P | P_old], [g~ + coef m~ ; -coef m]): one GEMM per weight, over 2r
            coef = beta1 / (1 - beta1)
            if m is None:
                bases, lows = P, g_low
            else:
                bases = torch.cat([P, P_old], dim=-1)
                lows = torch.cat([torch.add(g_low, m_new, alpha=coef), m * -coef], dim=-2 if left else -1)
            for a, st, basis, low in zip(grads, states, bases.unbind(0), lows.unbind(0)):
                add_lifted_(a, basis, low, left, -1.0)
                st["error"] = a

        if m_new is None:
            m_new, v_new = torch.zeros_like(g_low), torch.zeros_like(g_low)
        d, step_size = adam_direction(m_new, v_new, g_low, k + 1, group["betas"], group["eps"], group["lr"])
        for st, P_i, m_i, v_i in zip(states, P.unbind(0), m_new.unbind(0), v_new.unbind(0)):
            st["step"], st["proj"], st["exp_avg"], st["exp_avg_sq"] = k + 1, P_i, m_i, v_i
        if group["weight_decay"] != 0:  # (a factor 1 is exact: skipped)
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        for p, P_i, d_i in zip(params, P.unbind(0), d.unbind(0)):
            add_lifted_(p, P_i, d_i, left, -step_size)


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
