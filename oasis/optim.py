"""Projection-aware AdamW.

Compressed weights: Adam moments m, v (d_out × r) on the low-rank gradient Ĝ; the update is lifted back with
the basis, W ← W − lr·scale·(Δ Uᵀ) − lr·wd·W with Δ = m̂ / (√v̂ + ε). When a basis has moved since the last
step (R = U_newᵀ U_old), the moments are first carried into the new coordinates:
  m ← m Rᵀ                                   (exact for the part of m U_oldᵀ inside span(U_new))
  v̂ ← |(v̂ − m̂²)(R∘R)ᵀ + (m̂ Rᵀ)²|            (LDAdam: old coordinates as independent with variance v̂ − m̂²)
`transport="none"` leaves m, v as they are (GaLore / CompAct behaviour).
Every other trainable parameter gets plain AdamW, computed exactly as `torch.optim.AdamW` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .linear import CompressedLinear

TRANSPORTS = ("ldadam", "none")


def transport_moments(exp_avg: Tensor, exp_avg_sq: Tensor, rotation: Tensor, step: int,
                      betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Carry Adam moments (rows × r) from old basis coordinates to new ones; returns new (m, v).

    `rotation` is U_newᵀ U_old. `step` is the number of updates the moments have seen (for bias correction).
    """
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rotation = rotation.to(exp_avg.dtype)
    m_hat = exp_avg / bc1
    variance = exp_avg_sq / bc2 - m_hat.square()
    new_m = exp_avg @ rotation.T
    v_hat = (variance @ rotation.square().T).add_((m_hat @ rotation.T).square_()).abs_()
    return new_m, v_hat.mul_(bc2)


class OasisAdamW(torch.optim.Optimizer):
    """AdamW that trains compressed layers in their subspaces and everything else in full.

    Args:
        model: the model whose trainable parameters are optimised (all of them).
        compressed: the `CompressedLinear` modules of `model` (from `oasis.compress`).
        transport: "ldadam" (carry moments when a basis moves) or "none".
    Param groups: group 0 holds the compressed weights, group 1 the rest; both follow `lr` changes by LR
    schedulers as usual.
    """

    def __init__(self, model: nn.Module, compressed: list[CompressedLinear], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 transport: str = "ldadam"):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self._layers = list(compressed)
        weights = [m.weight for m in self._layers]
        ids = {id(w) for w in weights}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": weights, "compressed": True}, {"params": others, "compressed": False}]
        groups = [g for g in groups if g["params"]]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.transport = transport
        self._layer_of = {id(m.weight): m for m in self._layers}
        self._trackers = list({id(m.tracker): m.tracker for m in self._layers}.values())

    @property
    def trackers(self):
        return self._trackers

    def subspace_drift(self) -> float:
        """Mean over bases of the largest principal angle (radians) moved since the previous call."""
        if not self._trackers:
            return 0.0
        return sum(t.pop_drift() for t in self._trackers) / len(self._trackers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for layer in self._layers:
            if set_to_none or layer.lowrank_grad is None:
                layer.lowrank_grad = None
            else:
                layer.lowrank_grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rotations = {id(t): t.pop_rotation() for t in self._trackers}
        for group in self.param_groups:
            for p in group["params"]:
                if group["compressed"]:
                    layer = self._layer_of[id(p)]
                    self._compressed_step(p, layer, rotations[id(layer.tracker)], group)
                elif p.grad is not None:
                    self._adamw_step(p, p.grad, group)
        for tracker in self._trackers:
            tracker.step()
        return loss

    def _compressed_step(self, weight: Tensor, layer: CompressedLinear, rotation: Tensor | None, group):
        state = self.state[weight]
        beta1, beta2 = group["betas"]
        if rotation is not None and self.transport == "ldadam" and state.get("step", 0) > 0:
            state["exp_avg"], state["exp_avg_sq"] = transport_moments(
                state["exp_avg"], state["exp_avg_sq"], rotation, int(state["step"]), (beta1, beta2))
        grad = layer.lowrank_grad
        if grad is None:
            return
        direction, step_size = self._adam_direction(state, grad, group)
        if group["weight_decay"] != 0:
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        # in-place GEMM: the lifted d_out × d_in update is never materialised
        basis = layer.tracker.basis.to(weight.dtype)
        weight.addmm_(direction.to(weight.dtype), basis.T, alpha=-step_size * layer.tracker.scale)

    def _adamw_step(self, p: Tensor, grad: Tensor, group) -> None:
        direction, step_size = self._adam_direction(self.state[p], grad, group)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-step_size)

    @staticmethod
    def _adam_direction(state: dict, grad: Tensor, group) -> tuple[Tensor, float]:
        """(m / (√v̂ + ε), lr / (1 − β1ᵗ)): Adam's step split as torch.optim.AdamW computes it, so that with
        rank = d_in and a fixed identity basis the two agree to rounding."""
        beta1, beta2 = group["betas"]
        if "step" not in state:  # lazily, shaped like the gradient: d_out × r for compressed weights
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
        return exp_avg / denom, group["lr"] / bias_correction1

    # --- checkpointing: the bases live in the trackers, so they travel with the optimizer state ---------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["trackers"] = [t.state_dict() for t in self._trackers]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        trackers = state_dict.pop("trackers", None)
        # torch casts floating state to each param's dtype on load; low-rank moments stay in their own dtype
        saved = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()}
                 for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if group["compressed"] and index in saved:
                    self.state[p] = {n: (v.to(p.device) if torch.is_tensor(v) else v)
                                     for n, v in saved[index].items()}
                index += 1
        if trackers is not None:
            if len(trackers) != len(self._trackers):
                raise ValueError(f"state has {len(trackers)} bases, optimizer has {len(self._trackers)}")
            for tracker, ts in zip(self._trackers, trackers):
                tracker.load_state_dict(ts)
