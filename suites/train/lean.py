"""Memory-lean activations for Llama blocks: a generic trick, offered to every method alike.

Hugging Face's LlamaRMSNorm saves a float32 copy of its input plus the normalised bf16 output for backward
(3× the input's bytes in bf16 training), and the SwiGLU MLP saves the gate pre-activation, its SiLU and
the up projection (three d_ff-wide tensors). The autograd functions below compute the same values but
save only what backward cannot recompute cheaply:
  RMSNorm: the input (its own dtype) and the per-token 1/rms (float32, one number per token);
  SwiGLU:  gate and up; SiLU(gate) is recomputed in backward.
Forward outputs are bit-identical to Hugging Face's; gradients agree to rounding. Nothing here depends on
the training method, so runs that use it say so in their config (`lean_activations=true`).

`causal_lm_loss(model, batch, chunk_tokens)`: the causal-LM loss without the whole batch's logits.
A model's own loss materialises the logits of every token (N × vocab in the model dtype), an fp32 copy
and the fp32 log-softmax saved for backward: at 8 × 512 tokens and a 32k vocabulary about 1.3 GB, at a
128k vocabulary about 5 GB. Here the decoder's last hidden state goes through the output layer a chunk
of tokens at a time (the logits are recomputed in backward, chunk by chunk), so only one chunk's
logits exist at once, in forward and in backward, and the output layer's gradient is accumulated into one
buffer. Value and gradients are those of the model's own loss
(mean cross-entropy over tokens whose label is not -100, labels shifted by one; `tests/test_memory.py`
checks both). It applies to causal LMs whose logits are a plain projection of the decoder's last hidden
state (`model.get_decoder()`, `model.get_output_embeddings()`), e.g. the Llama family, also under peft.
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
        # d/dx of x * rstd, applied to g = grad_out * weight (in float32); two float32 temporaries (xhat, g),
        # the rest in place, since this too runs where backward's memory peaks
        g = (grad_out * weight).float()
        hidden = x.shape[-1]
        dot = (g.reshape(-1, 1, hidden) @ xhat.reshape(-1, hidden, 1)).reshape(rstd.shape) / hidden
        grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        gate, up = ctx.saved_tensors
        # two d_ff-wide temporaries, everything else in place: this runs at the deepest point of backward,
        # where the step's memory peaks, and each temporary costs as much as a saved activation
        sig = torch.sigmoid(gate)
        silu = torch.mul(gate, sig)
        # silu'(gate) = sig * (1 + gate * (1 - sig)) = sig - sig * silu + silu
        grad_gate = sig.addcmul_(sig, silu, value=-1).add_(silu).mul_(up).mul_(grad_out)
        grad_up = silu.mul_(grad_out)
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


# --- chunked loss ----------------------------------------------------------------------------------------

IGNORE_INDEX = -100


def model_loss(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """The model's own loss: `model(**batch).loss` (what the harness loop calls)."""
    return model(**batch).loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weightᵀ, labels), one chunk of tokens at a time.

    Forward keeps only the inputs; backward recomputes each chunk's logits, turns them into the logits'
    gradient in place (softmax − one-hot) and accumulates the weight gradient into one buffer (addmm_), so
    at any time one chunk's logits and one weight-sized gradient exist, never one per chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.T).float()
            total += F.cross_entropy(logits, labels[start:start + chunk], ignore_index=IGNORE_INDEX,
                                     reduction="sum")
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            probs = (h @ weight.T).float()
            probs.sub_(probs.amax(-1, keepdim=True)).exp_()              # softmax, in place
            probs.div_(probs.sum(-1, keepdim=True))
            valid = (y != IGNORE_INDEX).unsqueeze(1)
            # softmax − one-hot on tokens with a label; rows without one get no gradient
            probs.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid.to(probs.dtype))
            probs.mul_(valid).mul_(grad_total)
            dlogits = probs.to(hidden.dtype)
            del probs
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[start:start + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(dlogits.T, h)
        return grad_hidden, grad_weight, None, None


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = 256) -> Tensor:
    """Mean next-token cross-entropy, computed `chunk_tokens` tokens at a time (see module docstring)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("causal_lm_loss needs an output layer without bias")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs).last_hidden_state
    labels = batch["labels"]
    # shift the labels, not the hidden states: position t predicts token t+1, the last position nothing
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = _ChunkedLinearCrossEntropy.apply(flat, head.weight, shifted, chunk_tokens or flat.shape[0])
    return total / (shifted != IGNORE_INDEX).sum()
