"""The compressed linear layer: exact forward, low-rank memory for backward.

For input X (N × d_in), weight W (d_out × d_in) and basis U (d_in × r):
  forward    Y = X Wᵀ (+ b)                 exact, and only Z = X U (N × r) is saved, never X
  backward   ∂L/∂X = δ W                    exact
             Ĝ = δᵀ Z = G U                 the weight gradient G = δᵀ X seen through the basis (d_out × r);
                                            no d_out × d_in gradient is ever allocated
Ĝ is the `.grad` of a small parameter the layer owns, its *gradient carrier* (`grad_carrier`, d_out × r,
whose value is never read). So autograd accumulates Ĝ across micro-batches, `zero_grad()` clears it, and
standard tooling sees it: `clip_grad_norm_` (‖Ĝ‖ = ‖Ĝ Uᵀ‖, the lifted gradient's norm, since U is
orthonormal), `GradScaler` (unscale and inf checks), and DDP, which all-reduces exactly these d_out × r
tensors. The weight itself does not require grad (DDP would otherwise bucket a d_out × d_in gradient that
never comes); the optimizer updates it in place. The carriers of one `compress()` call are views of one
shared zero buffer (as long as the largest carrier), so they cost no d_out × r storage each; they are left
out of the module's state_dict.
FSDP2 (`fully_shard`) is fine with that: it copies each carrier into sharded storage of its own, a
Shard(0) DTensor of (d_out / world) × r per rank (the sharing is then gone), all-gathers it with the weight
in forward (its value unused; small next to the weight) and reduce-scatters Ĝ by rows.

Layers that read one input (q/k/v, gate/up) can share a tracker: the first of them computes Z, the others
reuse that very tensor, so autograd stores it once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .subspace import SubspaceTracker

CARRIER = "grad_carrier"


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass: a forward run now is a recomputation
    (activation checkpointing), not a new micro-batch."""
    return torch._C._current_graph_task_id() != -1


class _CompressedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, carrier: Tensor):
        ctx.save_for_backward(weight, z)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, z = ctx.saved_tensors
        grad_x = grad_bias = grad_carrier = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        delta = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = delta.sum(0)
        if ctx.needs_input_grad[4]:
            # autograd casts it to the carrier's dtype (float32 for low-precision weights) and accumulates
            grad_carrier = delta.T @ z.reshape(-1, z.shape[-1])
        return grad_x, None, grad_bias, None, grad_carrier


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


def carrier_dtype(weight: Tensor) -> torch.dtype:
    # float32 accumulation for low-precision weights: the gradient is small (d_out × r), precision is not
    return torch.promote_types(weight.dtype, torch.float32)


class CompressedLinear(nn.Linear):
    """An `nn.Linear` whose weight gradient lives in the subspace of a tracked basis.

    It keeps the replaced layer's own `weight` (and `bias`) Parameter objects, so optimizers, state dicts
    and parameter counts see the same tensors; `weight.requires_grad` is False and `weight.grad` stays None.
    The gradient is `grad_carrier.grad` (d_out × r), also readable as `lowrank_grad`. `carrier` is the
    d_out × r tensor to use as the carrier (a view of a shared buffer, see `compress`); by default a fresh
    zeros tensor.
    """

    def __init__(self, linear: nn.Linear, tracker: SubspaceTracker, shared: SharedProjection | None = None,
                 carrier: Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        trainable = linear.weight.requires_grad
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        self.tracker = tracker
        self.shared = shared or SharedProjection(1)
        shape = (self.out_features, tracker.rank)
        if carrier is None:
            carrier = torch.zeros(shape, dtype=carrier_dtype(self.weight), device=self.weight.device)
        if tuple(carrier.shape) != shape:
            raise ValueError(f"gradient carrier must be {shape}, got {tuple(carrier.shape)}")
        self.grad_carrier = nn.Parameter(carrier, requires_grad=trainable)
        # the carrier's dtype is part of the design (a float32 gradient for low-precision weights):
        # tools that cast a model's parameters to one dtype should leave it alone
        self.grad_carrier.keep_dtype = True

    @property
    def basis(self) -> Tensor | None:
        return self.tracker.basis

    @property
    def rank(self) -> int:
        return self.tracker.rank

    @property
    def lowrank_grad(self) -> Tensor | None:
        """Ĝ = G U (d_out × r): the gradient carrier's `.grad` (read-only alias)."""
        return self.grad_carrier.grad

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.grad_carrier.requires_grad):
            return F.linear(x, self.weight, self.bias)
        z = self.shared.take(x)
        if z is None:
            x2d = x.reshape(-1, x.shape[-1])
            z = self.tracker.project(x2d, training=self.training, recompute=in_backward())
            z = z.reshape(*x.shape[:-1], self.tracker.rank)
            self.shared.put(x, z)
        return _CompressedLinearFn.apply(x, self.weight, self.bias, z, self.grad_carrier)

    # the carrier's value is never used: keep it out of checkpoints, and do not ask for it on load
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + CARRIER, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + CARRIER in missing_keys:
            missing_keys.remove(prefix + CARRIER)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.tracker.rank}, tracker={type(self.tracker).__name__}"
