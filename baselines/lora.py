"""LoRA from `peft`: r = rank, lora_alpha = 2r, dropout 0.05 on the seven Llama projections, and AdamW on
whatever is trainable. The returned model is the `PeftModel` wrapper; it is called exactly like the base.

`train_unadapted` chooses what else trains:
* false (default; the fine-tuning suites): peft's usual setup, the base model frozen (embeddings, norms and
  lm_head included); AdamW trains the adapters only.
* true (set by the c4 pretraining profiles): the adapters plus every parameter outside the adapted
  projections (embeddings, norms, lm_head) train fully, as the low-rank baselines of pretraining papers do
  (ReLoRA; GaLore's LoRA/ReLoRA rows), since from random init a frozen embedding and lm_head cannot learn.
  Those parameters are unfrozen in place rather than listed in peft's `modules_to_save`: `modules_to_save`
  keeps a frozen original beside a trainable copy (twice the embedding and lm_head bytes, 0.5 GiB more at
  7B in bf16) and does not cover the norms. The adapted projections' base weights stay frozen either way.
The key is a method hyper-parameter, so every run record's config says which setting it used.

`OPTIONS` are settings a config holds only when they are set (`--set lora_targets=q_proj,v_proj`,
`--set use_dora=true`), so that a run of the defaults keeps the config, and config hash, it had before they
existed:
* `lora_targets`: the projections that get adapters, comma-separated (default the seven; peft's default for
  Llama and LitGPT's LoRA adapt q_proj,v_proj only).
* `use_dora`: peft's DoRA (weight-decomposed LoRA: a trainable magnitude vector of d_out per adapted layer).

State per adapted layer (m × n): adapters r(m + n), their gradients r(m + n), AdamW moments 2r(m + n).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, one_of, shard, unit_interval

DEFAULTS = {"lora_dropout": 0.05, "alpha_over_rank": 2.0, "train_unadapted": False}
OPTIONS = {"lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "use_dora": False}


def lora_targets(cfg) -> tuple[str, ...]:
    """The projections named by `cfg["lora_targets"]` (default: the seven), checked: one line naming the
    choices when a name is not a Llama projection, or is repeated, or none is given."""
    text = cfg.get("lora_targets", OPTIONS["lora_targets"])
    names = tuple(n.strip() for n in str(text).split(",") if n.strip())
    bad = [n for n in names if n not in LLAMA_PROJECTIONS]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"lora_targets={text!r} is not valid: give distinct comma-separated names from "
                         f"{','.join(LLAMA_PROJECTIONS)}")
    return names


def attach_adapters(model, cfg, rank: int):
    """peft LoRA (or DoRA) of rank `rank` (checked by the caller on the unquantised layers) on the
    `lora_targets` projections of `model` (plain or 4-bit), `train_unadapted` applied, and the AdamW that
    trains every trainable parameter. Shared by `lora` and `qlora`."""
    kwargs = adam_kwargs(cfg)
    dropout = unit_interval(cfg, "lora_dropout")
    alpha = cfg["alpha_over_rank"] * rank
    if not alpha > 0:
        raise ValueError(f"alpha_over_rank={cfg['alpha_over_rank']!r} is out of range: must be a number > 0")
    train_unadapted = one_of(cfg, "train_unadapted", (False, True))
    use_dora = one_of({**OPTIONS, **cfg}, "use_dora", (False, True))
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(lora_targets(cfg)),
                      bias="none", task_type="CAUSAL_LM", use_dora=bool(use_dora))
    # peft draws the A matrices from the global RNG: seed it so one config gives one adapter init
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])
        peft_model = get_peft_model(model, lora)
    if train_unadapted:
        unfreeze_unadapted(peft_model)
    shard(cfg, peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(params, **kwargs)


def unfreeze_unadapted(peft_model) -> None:
    """Make every floating-point parameter outside the adapted layers trainable (embeddings, norms,
    lm_head)."""
    adapted = {id(p) for mod in peft_model.modules() if isinstance(mod, LoraLayer) for p in mod.parameters()}
    for p in peft_model.parameters():
        if id(p) not in adapted and p.is_floating_point():
            p.requires_grad_(True)


def build(model, cfg):
    return attach_adapters(model, cfg, check_rank(model, cfg["rank"], lora_targets(cfg)))
