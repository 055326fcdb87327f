"""Adam-mini from `adam-mini` (Zhang et al., 2024, "Adam-mini: Use Fewer Learning Rates To Gain More").

The package's `Adam_mini` over `model.named_parameters()` with the model's hidden size and head counts, as
its README shows. It keeps Adam's first moment in full and replaces the second moment by one mean per block
(partitioned by parameter name): one per attention head for q_proj / k_proj, one per output neuron (row)
for v_proj, o_proj, the MLP projections, the embeddings and lm_head, one per tensor for norms.

Optimizer state per weight, counted from the real state tensors in tests/test_baselines.py
(d = hidden size, h = attention heads, so one head's block of q or k holds d·d/h weights):
    q_proj, k_proj (m × n)                        m·n + m·n/(d·d/h)
    v_proj, o_proj, gate/up/down_proj (m × n)     m·n + m
    embed_tokens, lm_head (V × d)                 V·d + V
    norms (d)                                     d + 1 (a 0-dim mean)
in the parameter dtype, plus Python numbers (`step`, block counts). No method hyper-parameters of its own:
lr, betas, eps and weight decay are the profile's, as for AdamW.

What this adapter adds: the package takes `torch.cuda.device_count()` as the world size over which its
parameters are *sharded* (ZeRO / FSDP: it sums each block's squared gradient across ranks, over CUDA), so a
single-process run on a host with several GPUs would wait on collectives nobody joins. The world size is
set from the parameters instead: the process group's size when they are sharded DTensors (FSDP2), else 1
(one process, or DDP, whose every rank holds whole parameters and already-averaged gradients: nothing is
left to sum). Its progress printing is off.
"""

from __future__ import annotations

import torch.distributed as dist
from adam_mini import Adam_mini
from torch.distributed.tensor import DTensor

from baselines._common import adam_kwargs

DEFAULTS: dict = {}


def build(model, cfg):
    config = getattr(model, "config", None)
    if config is None or not all(hasattr(config, k) for k in ("hidden_size", "num_attention_heads")):
        raise ValueError("adam-mini needs a transformers model whose config has hidden_size and "
                         "num_attention_heads (its blocks follow the attention heads)")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    opt = Adam_mini(model.named_parameters(), dim=config.hidden_size, n_heads=heads, n_kv_heads=kv_heads,
                    verbose=False, **adam_kwargs(cfg))
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    opt.world_size = dist.get_world_size() if sharded and dist.is_initialized() else 1
    return model, opt
