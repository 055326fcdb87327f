"""A one-block Llama-shaped LM in plain torch for the data-parallel tests of `oasis` (DDP, FSDP2): q/k/v and
gate/up share their input, as in Llama; embedding, norms and lm_head stay uncompressed. Each rank process then
imports torch only, which keeps the multi-process tests fast."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 16, hidden: int = 24):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.input_norm, self.post_norm, self.norm = (nn.RMSNorm(d) for _ in range(3))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = (nn.Linear(d, hidden, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        x = self.input_norm(h)
        attn = F.scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), is_causal=True)
        h = h + self.o_proj(attn)
        x = self.post_norm(h)
        h = h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        logits = self.lm_head(self.norm(h))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
