"""AdamW with 8-bit block-wise quantised states (`bitsandbytes.optim.AdamW8bit`; runs on CPU from 0.50).

bitsandbytes keeps tensors with fewer than `min_8bit_size` (default 4096) elements in 32-bit state; larger
ones hold two uint8 states of m·n bytes plus one float32 absmax per 256-element block each.
"""

from __future__ import annotations

import bitsandbytes as bnb

from baselines._common import adam_kwargs, positive_int

DEFAULTS = {"min_8bit_size": 4096}


def build(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    min_size = positive_int(cfg, "min_8bit_size")
    return model, bnb.optim.AdamW8bit(params, min_8bit_size=min_size, **adam_kwargs(cfg))
