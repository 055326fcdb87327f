"""Memory-lean activations for Llama blocks: a generic trick, offered to every method alike.

Hugging Face's LlamaRMSNorm saves a float32 copy of its input plus the normalised bf16 output for backward
(3× the input's bytes in bf16 training), and the SwiGLU MLP saves the gate pre-activation, its SiLU and
the up projection (three d_ff-wide tensors). The autograd functions below compute the same values but
save only what backward cannot recompute cheaply:
  RMSNorm: the input (its own dtype) and the per-token 1/rms (float32, one number per token);
  SwiGLU:  gate and up; SiLU(gate) is recomputed in backward.
Forward outputs are bit-identical to Hugging Face's; gradients agree to rounding. Nothing here depends on
the training method, so runs that use it say so in their config (`lean_activations=true`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        # d/dx of x * rstd, applied to g = grad_out * weight (in float32)
        g = (grad_out * weight).float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad_out * silu
        grad_gate = grad_out * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_up


def _rmsnorm_forward(self, hidden_states: Tensor) -> Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _is_silu(act) -> bool:
    # transformers' ACT2FN["silu"] is its own SiLUActivation class, not nn.SiLU
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def apply_lean_activations(model: nn.Module) -> int:
    """Swap the forward of every RMSNorm and SiLU-gated MLP in `model` for the lean versions, in place.

    Returns how many modules were patched (0 means the model has none of them; callers should say so).
    """
    patched = 0
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            patched += 1
        elif (kind.endswith("MLP") and all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
              and _is_silu(getattr(module, "act_fn", None))):
            module.forward = types.MethodType(_mlp_forward, module)
            patched += 1
    return patched
