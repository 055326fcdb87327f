"""Helpers shared by the baseline adapters: which layers are "the linear layers", hyper-parameter checks.

Every check raises ValueError with one line that names the valid range or choices, so the CLI can print it
as-is and exit 2.
"""

from __future__ import annotations

import math

from torch import nn

# The seven Llama projections: attention (q, k, v, o) and MLP (gate, up, down). These are the layers every
# memory-efficient method compresses; embeddings, norms and lm_head stay with plain AdamW (DESIGN §4).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_linears(model: nn.Module, targets=LLAMA_PROJECTIONS) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear whose last name component is in `targets`."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"model has no linear layer named any of {', '.join(targets)}")
    return found


def check_rank(model: nn.Module, rank, targets=LLAMA_PROJECTIONS, *, input_side: bool = False) -> int:
    """`rank` as an int, or ValueError if it is not in 1..min(d_out, d_in) of the smallest targeted layer
    (1..d_in with `input_side`, for activation bases, which only need r <= d_in)."""
    layers = target_linears(model, targets)

    def size(nm):
        return nm[1].in_features if input_side else min(nm[1].weight.shape)

    name, small = min(layers, key=size)
    limit = size((name, small))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        d_out, d_in = small.weight.shape
        raise ValueError(f"rank={rank!r} is out of range: must be an integer in 1..{limit} "
                         f"(the smallest targeted layer, {name}, is {d_out}x{d_in})")
    return rank


def split_params(model: nn.Module, targets=LLAMA_PROJECTIONS) -> tuple[list, list]:
    """(weights of the targeted linear layers, every other trainable parameter), each trainable only."""
    matrices = [mod.weight for _, mod in target_linears(model, targets) if mod.weight.requires_grad]
    ids = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return matrices, rest


def positive_int(cfg: dict, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is out of range: must be an integer >= 1")
    return value


def unit_interval(cfg: dict, key: str, *, closed_right: bool = False) -> float:
    value = cfg[key]
    ok = isinstance(value, (int, float)) and (0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{key}={value!r} is out of range: must be a number in {interval}")
    return float(value)


def one_of(cfg: dict, key: str, choices) -> str:
    value = cfg[key]
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose from {', '.join(map(str, choices))}")
    return value


def shard(cfg: dict, model: nn.Module) -> None:
    """Call the caller's `cfg["shard"](model)` when it passed one: after a builder has changed the model
    (replaced or added modules) and before it builds its optimizer, as FSDP2's `fully_shard` requires (it
    replaces the Parameter objects). Builders that only make an optimizer need not call it."""
    hook = cfg.get("shard")
    if hook is not None:
        hook(model)


def adam_kwargs(cfg: dict) -> dict:
    """lr, betas, eps, weight_decay from `cfg`, checked; betas may arrive as a list (JSON/YAML)."""
    lr, eps, wd = cfg["lr"], cfg["eps"], cfg["weight_decay"]
    betas = cfg["betas"]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr={lr!r} is out of range: must be a finite number >= 0")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} is out of range: must be a number > 0")
    if not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
        raise ValueError(f"weight_decay={wd!r} is out of range: must be a finite number >= 0")
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas={betas!r} is out of range: must be two numbers in [0, 1)")
    return {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])), "eps": float(eps),
            "weight_decay": float(wd)}

