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

DEFAULTS = {"betas": (0.908, 0.99), "rho": 0.908, "error_feedback": True}


# ---- low-dimensional algebra; `left` means P spans the column space (m <= n) ----

def project(P: torch.Tensor, full: torch.Tensor, left: bool) -> torch.Tensor:
    return P.T @ full if left else full @ P


def lift(P: torch.Tensor, low: torch.Tensor, left: bool) -> torch.Tensor:
    return P @ low if left else low @ P.T


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x.float())[0]


def top_subspace(a: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    """First step: top-r left (or right) singular vectors of `a`, exactly, in float32."""
    U, _, Vh = torch.linalg.svd(a.float(), full_matrices=False)
    return (U[:, :rank] if left else Vh[:rank].T).to(a.dtype)


def power_step(B: torch.Tensor, P_prev: torch.Tensor, left: bool) -> torch.Tensor:
    """One block power-iteration step on B B^T (left) or B^T B (right), warm-started at P_prev, then QR."""
    Y = B @ (B.T @ P_prev) if left else B.T @ (B @ P_prev)
    return _orthonormal(Y).to(B.dtype)


def transport_moments(m, v, C, step: int, betas, left: bool):
    """Carry Adam moments from the old basis to the new one (C = P_new^T P_old, r x r; `step` = steps taken).

    m is rotated linearly. For v, the old coordinates are treated as independent with mean m_hat and
    variance v_hat - m_hat^2; the new coordinates are linear combinations, so their second moment is
    (C o C) applied to the variances plus the squared transported mean. |.| guards against the negative
    values rounding can give; bias correction is undone so the running average continues unchanged."""
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    C2 = C * C
    m_new = C @ m if left else m @ C.T
    var = v / bc2 - (m * m) / bc1 ** 2
    v_new = C2 @ var if left else var @ C2.T
    v_new = (v_new + (m_new * m_new) / bc1 ** 2).abs_().mul_(bc2)
    return m_new, v_new


class LDAdamW(torch.optim.Optimizer):
    """LDAdam for param groups with a `rank`; plain AdamW for groups whose rank is None."""

    def __init__(self, params, lr=1e-3, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0, rank=None,
                 rho=0.908, error_feedback=True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, rho=rho,
                        error_feedback=error_feedback)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is None:
                continue
            for p in group["params"]:
                if p.dim() != 2 or not 1 <= group["rank"] <= min(p.shape):
                    raise ValueError(f"LDAdam rank={group['rank']} is out of range for a {tuple(p.shape)} "
                                     f"weight: must be in 1..{min(p.shape) if p.dim() == 2 else 0}")

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
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["rank"] is None:
                    self._adamw(p, group)
                else:
                    self._ldadam(p, group)
        return loss

    def _adamw(self, p, group):
        st = self.state[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        g = p.grad
        st["step"] += 1
        st["exp_avg"].lerp_(g, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (st["exp_avg_sq"] / (1 - beta2 ** st["step"])).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** st["step"]))

    def _ldadam(self, p, group):
        st = self.state[p]
        beta1, beta2 = group["betas"]
        rank, rho = group["rank"], group["rho"]
        left = p.shape[0] <= p.shape[1]  # compress the smaller side
        a = p.grad  # gradient + error buffer (accumulated in place by autograd, or added just below)
        if "error" in st and st["error"] is not a:
            a.add_(st["error"])
        k = st.get("step", 0)  # steps taken before this one

        if k == 0:
            P = top_subspace(a, rank, left)
            m_new = v_new = None
            lifted_old = None
        else:
            P_old, m, v = st["proj"], st["exp_avg"], st["exp_avg_sq"]
            lifted_old = lift(P_old, m, left)
            B = lifted_old.mul(rho / (1 - beta1 ** k)).add_(a, alpha=1 - rho)
            P = power_step(B, P_old, left)
            del B
            m_new, v_new = transport_moments(m, v, P.T @ P_old, k, group["betas"], left)

        g_low = project(P, a, left)
        if group["error_feedback"]:
            a.sub_(lift(P, g_low, left))  # gradient-compression error
            if lifted_old is not None:    # optimizer-state-compression error (generalised EF)
                a.add_(lifted_old.sub_(lift(P, m_new, left)), alpha=beta1 / (1 - beta1))
            st["error"] = a
        del lifted_old

        if m_new is None:
            m_new, v_new = torch.zeros_like(g_low), torch.zeros_like(g_low)
        m_new.mul_(beta1).add_(g_low, alpha=1 - beta1)
        v_new.mul_(beta2).addcmul_(g_low, g_low, value=1 - beta2)
        st["step"], st["proj"], st["exp_avg"], st["exp_avg_sq"] = k + 1, P, m_new, v_new

        t = k + 1
        d = (v_new / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        d = torch.div(m_new, d).div_(1 - beta1 ** t)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(lift(P, d, left), alpha=group["lr"])


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
