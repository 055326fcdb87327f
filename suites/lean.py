"""Generic memory tricks for the training step, offered to every method alike.

`causal_lm_loss(model, batch, chunk_tokens)`: the causal-LM loss without the whole batch's logits.
A model's own loss materialises the logits of every token (N × vocab in the model dtype), an fp32
copy, and the fp32 log-softmax saved for backward: at 8 × 512 tokens and a 32k vocabulary that is
about 1.3 GB, at a 128k vocabulary about 5 GB. Here the decoder's last hidden state goes through the
output layer a chunk of tokens at a time, each chunk under (non-reentrant) activation checkpointing,
so only one chunk's logits exist at once, in forward and in backward. The value and the gradients
are those of the model's own loss (mean cross-entropy over tokens whose label is not -100, labels
shifted by one); `tests/test_memory.py` checks both.

Applies to causal LMs whose logits are a plain projection of the decoder's last hidden state
(`model.get_decoder()`, `model.get_output_embeddings()`), e.g. the Llama family, also wrapped by peft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def model_loss(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """The model's own loss: `model(**batch).loss` (what the harness loop calls)."""
    return model(**batch).loss


def _chunk_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model, batch: dict, chunk_tokens: int | None = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy, computed `chunk_tokens` tokens at a time (see module docstring)."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = decoder(**inputs).last_hidden_state
    labels = batch["labels"]
    # shift the labels, not the hidden states: position t predicts token t+1, the last position nothing
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or flat.shape[0]
    total = None
    for start in range(0, flat.shape[0], chunk):
        part = checkpoint(_chunk_loss, head, flat[start:start + chunk], shifted[start:start + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total / (shifted != IGNORE_INDEX).sum()


# --- lean blocks: the same maths, fewer tensors kept for backward ------------------------------------------
#
# A Llama block keeps, per token, far more than its linear layers' inputs: RMSNorm saves an fp32 copy of
# its input and the normalised bf16 output (3× the input's bytes), and SwiGLU saves the gate output, the
# up output and silu(gate). `make_lean(model)` swaps these two blocks' forward for autograd functions that
# save only their inputs (and the per-token 1/rms) and recompute the rest in backward, as fused-kernel
# libraries do. Outputs are bit-identical; gradients agree to rounding (backward works in fp32). Every
# method gets the same blocks, so the option is fair; tables mark runs that used it.


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = grad_out.reshape(-1, grad_out.shape[-1]).float()
            grad_weight = (rows * xhat.to(x.dtype).float().reshape(rows.shape)).sum(0).to(weight.dtype)
        g = (grad_out * weight).float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        g, u, d = gate.float(), up.float(), grad_out.float()
        sig = torch.sigmoid(g)
        grad_up = (d * g * sig).to(up.dtype)
        grad_gate = (d * u * sig * (1 + g * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up


def _lean_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SwiGLUFn.apply(self.gate_proj(x), self.up_proj(x)))


def _is_llama_rmsnorm(module) -> bool:
    # Llama-style: y = weight * (x / rms(x)).to(dtype); variants such as Gemma's (1 + weight) use other names
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") \
        and isinstance(getattr(module, "weight", None), torch.Tensor)


def _is_swiglu_mlp(module) -> bool:
    act = getattr(module, "act_fn", None)
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) and act is not None \
        and "silu" in type(act).__name__.lower()


def make_lean(model) -> dict[str, int]:
    """Give every Llama-style RMSNorm and SwiGLU MLP of `model` its lean forward, in place; returns counts."""
    import types

    counts = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        if _is_llama_rmsnorm(module):
            module.forward = types.MethodType(_lean_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif _is_swiglu_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            counts["swiglu"] += 1
    return counts
