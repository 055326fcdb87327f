"""Test-only reference: the per-layer OASIS step as it was before the batched one (`oasis.grouped`), kept
verbatim in its maths so that the batched, sync-free step can be pinned to it (tests/test_oasis_grouped.py).

`ReferenceOjaTracker` moves its basis with `svdvals` for σ_max and a Householder QR with sign-fixed columns;
`ReferenceOasisAdamW` does one layer at a time: Adam per tensor, the lifted update per layer, the moment
transport per layer, the basis move per tracker (`tracker.advance()`, which a reference tracker computes
the old way). Only the optimizer's `step()` is replaced; construction, param groups and state are
`OasisAdamW`'s own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oasis.optim import OasisAdamW, adam_direction, local
from oasis.subspace import OjaTracker, oja_step


def reference_orthonormalize(u: Tensor) -> Tensor:
    q, r = torch.linalg.qr(u)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def reference_transport(exp_avg, exp_avg_sq, rotation, step, betas):
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rotation = rotation.to(exp_avg.dtype)
    squared = rotation.square()
    m_hat = exp_avg / bc1
    variance = exp_avg_sq / bc2 - m_hat.square()
    new_m = exp_avg @ rotation.T
    v_hat = (variance @ squared.T).add_((m_hat @ rotation.T).square_())
    return new_m, v_hat.abs_().mul_(bc2)


class ReferenceOjaTracker(OjaTracker):
    def _next_basis(self) -> Tensor:
        s_sum, k_sum, count = self.stats
        count = count.clamp_min(1)
        s, k = s_sum / count, k_sum / count
        u = self.basis
        if self.normalization != "sigma_max":
            # the normalisations added after the batched step: their formula is pinned against its
            # definition in tests/test_oja_streams.py; here one tracker at a time, Householder QR
            return reference_orthonormalize(oja_step(u, s, k, self.subspace_lr, self.normalization))
        sigma = torch.linalg.svdvals(s)[0].clamp_min(torch.finfo(s.dtype).tiny)
        return reference_orthonormalize(u + (self.subspace_lr / sigma) * (s - u @ k))


class ReferenceOasisAdamW(OasisAdamW):
    @torch.no_grad()
    def step(self, closure=None):
        for tracker in self._trackers:
            self._reference_transport(tracker, tracker.pop_rotation())
        for group in self.param_groups:
            if group.get("in_backward"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["compressed"]:
                    self._reference_compressed_step(self._layer_of[id(p)], group)
                else:
                    self._reference_adamw_step(p, group)
        due = [t for t in self._trackers if t.moves_this_step()]
        stats = [s for t in due for s in t.statistics()]
        if stats and self._stats_reduce is not None:
            self._stats_reduce(stats)
        for tracker in due:
            self._reference_transport(tracker, tracker.advance())
        for tracker in self._trackers:
            tracker.step()

    def _reference_transport(self, tracker, rotation):
        if rotation is None or self.transport == "none":
            return
        for layer in self._layers_of[id(tracker)]:
            state = self.state[layer.grad_carrier]
            if state.get("step", 0) > 0:
                new_m, new_v = reference_transport(state["exp_avg"], state["exp_avg_sq"], rotation,
                                                   int(state["step"]), self.param_groups[0]["betas"])
                state["exp_avg"], state["exp_avg_sq"] = new_m, new_v

    def _reference_adam(self, state, grad, group):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        return adam_direction(state["exp_avg"], state["exp_avg_sq"], grad, state["step"], group["betas"],
                              group["eps"], group["lr"])

    def _reference_compressed_step(self, layer, group):
        direction, step_size = self._reference_adam(self.state[layer.grad_carrier], layer.grad_carrier.grad,
                                                    group)
        weight = local(layer.weight)
        if group["weight_decay"] != 0:
            weight.mul_(1 - group["lr"] * group["weight_decay"])
        basis = layer.tracker.basis.to(weight.dtype)
        weight.addmm_(direction.to(weight.dtype), basis.T, alpha=-step_size * layer.tracker.scale)

    def _reference_adamw_step(self, p, group):
        direction, step_size = self._reference_adam(self.state[p], p.grad, group)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-step_size)
