"""Full AdamW (`torch.optim.AdamW`): the reference every memory-efficient method is measured against.

State per linear layer: exp_avg and exp_avg_sq, 2·m·n elements. With `layerwise=True` each parameter is
stepped inside backward as soon as its gradient is ready and its gradient freed right away (GaLore's
"per-layer weight updates"), so no full set of gradients is ever alive.
"""

from __future__ import annotations

import torch

from baselines._common import adam_kwargs
from baselines._layerwise import LayerwiseOptimizer

DEFAULTS = {"layerwise": False}


def build(model, cfg):
    kwargs = adam_kwargs(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.get("layerwise", False):
        return model, LayerwiseOptimizer([{"params": params}], lambda g: torch.optim.AdamW(g, **kwargs))
    return model, torch.optim.AdamW(params, **kwargs)
