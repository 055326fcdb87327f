"""LoRA from `peft`: r = rank, lora_alpha = 2r, dropout 0.05 on the seven Llama projections; the base model
is frozen (embeddings, norms and lm_head included, as peft does) and AdamW trains the adapters only.

The returned model is the `PeftModel` wrapper; it is called exactly like the base model.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, unit_interval

DEFAULTS = {"lora_dropout": 0.05, "alpha_over_rank": 2.0}


def build(model, cfg):
    rank = check_rank(model, cfg["rank"])
    kwargs = adam_kwargs(cfg)
    dropout = unit_interval(cfg, "lora_dropout")
    alpha = cfg["alpha_over_rank"] * rank
    if not alpha > 0:
        raise ValueError(f"alpha_over_rank={cfg['alpha_over_rank']!r} is out of range: must be a number > 0")
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LLAMA_PROJECTIONS),
                      bias="none", task_type="CAUSAL_LM")
    # peft draws the A matrices from the global RNG: seed it so one config gives one adapter init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(params, **kwargs)
