"""The compressed linear layer: exact forward, low-rank memory for backward.

For input X (N × d_in), weight W (d_out × d_in) and basis U (d_in × r):
  forward    Y = X Wᵀ (+ b)                 exact, and only Z = X U (N × r) is saved, never X
  backward   ∂L/∂X = δ W                    exact
             Ĝ = δᵀ Z = G U                 the weight gradient G = δᵀ X seen through the basis
                                            (d_out × r), accumulated in `lowrank_grad`; no d_out × d_in
                                            gradient is ever allocated
Layers that read one input (q/k/v, gate/up) can share a tracker: the first of them computes Z, the others
reuse that very tensor, so autograd stores it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .subspace import SubspaceTracker


class _CompressedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, layer: CompressedLinear):
        ctx.save_for_backward(weight, z)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, z = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        delta = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            ctx.layer._accumulate(delta.T @ z.reshape(-1, z.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_bias = delta.sum(0)
        return grad_x, None, grad_bias, None, None


class SharedProjection:
    """Lets layers that read the same input share one stored projection Z = X U.

    The first member of a group computes Z and leaves it here; the other members find it by the identity of
    their input tensor. The entry is dropped once every member has taken it, so nothing outlives autograd's
    own reference.
    """

    def __init__(self, members: int):
        self.members = members
        self._x: Tensor | None = None
        self._z: Tensor | None = None
        self._left = 0

    def take(self, x: Tensor) -> Tensor | None:
        if self._x is not x:
            return None
        z = self._z
        self._left -= 1
        if self._left <= 0:
            self._x = self._z = None
        return z

    def put(self, x: Tensor, z: Tensor) -> None:
        if self.members > 1:
            self._x, self._z, self._left = x, z, self.members - 1


class CompressedLinear(nn.Linear):
    """An `nn.Linear` whose weight gradient lives in the subspace of a tracked basis.

    It keeps the replaced layer's own `weight` (and `bias`) Parameter objects, so optimizers, state dicts and
    parameter counts see the same tensors. `weight.grad` stays None; the gradient is `lowrank_grad`.
    """

    def __init__(self, linear: nn.Linear, tracker: SubspaceTracker, shared: SharedProjection | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.tracker = tracker
        self.shared = shared or SharedProjection(1)
        self.lowrank_grad: Tensor | None = None

    @property
    def basis(self) -> Tensor | None:
        return self.tracker.basis

    @property
    def rank(self) -> int:
        return self.tracker.rank

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        z = self.shared.take(x)
        if z is None:
            z = self._project(x)
            self.shared.put(x, z)
        return _CompressedLinearFn.apply(x, self.weight, self.bias, z, self)

    @torch.no_grad()
    def _project(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if self.training and self.tracker.due():
            self.tracker.observe(x2d)
        return (x2d @ self.tracker.basis.to(x.dtype)).reshape(*x.shape[:-1], self.tracker.rank)

    def _accumulate(self, lowrank: Tensor) -> None:
        # float32 accumulation for low-precision weights: the gradient is small (d_out × r), precision is not
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        if self.lowrank_grad is None:
            self.lowrank_grad = lowrank.to(dtype)
        else:
            self.lowrank_grad.add_(lowrank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.tracker.rank}, tracker={type(self.tracker).__name__}"
