"""APOLLO from `apollo-torch` (Zhu et al., 2025, "APOLLO: SGD-like Memory, AdamW-level Performance").

The package's `APOLLOAdamW` with the param groups of its own pretraining script (`main_pretrain.py`): the
attention/MLP weights in a group with `rank`, `proj`, `scale_type`, `scale`, `update_proj_gap`, `proj_type`,
every other parameter (embeddings, norms, lm_head) in a group without them, which the same optimizer
steps as plain AdamW. Per low-rank weight (m × n) APOLLO projects the gradient with a seeded Gaussian
matrix (entries N(0, 1/r), regenerated every `update_proj_gap` steps, no SVD), runs Adam on the projected
r-dimensional gradient only to read off a channel-wise (`scale_type="channel"`) or tensor-wise ("tensor")
scaling factor, and applies that factor to the raw full gradient, times √scale, with Fira's norm-growth
limiter. Nothing here changes the update; the package does it all.

Published settings (the package README and its `scripts/pretrain_c4/*.sh`): APOLLO = channel-wise scaling,
random projection, scale 1, update_proj_gap 200, proj_type "std", rank d/4 (256 at 1B/7B); APOLLO-Mini
(`baselines/apollo_mini.py`) = rank 1, tensor-wise, scale 128. Here APOLLO's rank is the suite's `rank`
(the same r as every other low-rank method, e.g. 32 in the 7B memory tables); the paper's d/4 is one
`--set rank.apollo=1024` away. eps defaults to 1e-6, the package's own default (the scripts keep it).

Optimizer state per low-rank weight W (m × n, r = rank), counted from the real state tensors in
tests/test_baselines.py:
    exp_avg, exp_avg_sq of the projected gradient    2·r·max(m, n)    (R = G Pᵀ is m × r when m ≥ n,
                                                                       Pᵀ G is r × n otherwise)
    the projection P                                 r·min(m, n)
    the norm-growth limiter's last norm              1 (a 0-dim tensor)
so 2r·max(m,n) + r·min(m,n) + 1 elements, in the parameter dtype (the package casts P to it); every other
parameter keeps AdamW's exp_avg and exp_avg_sq (2·numel). Plus Python ints (`step`, `seed`).

What this adapter adds on top of the package, nothing in the update itself:
* `state_dict()` holds each projector as {ortho_matrix, seed} (the package keeps a `GradientProjector`
  object there, which `torch.load(weights_only=True)` refuses); loading rebuilds the projector with the seed
  it had reached, so a resumed run draws the same future projections.
* `layerwise=True` steps each parameter inside backward (`baselines._layerwise`), as the APOLLO repository's
  layer-wise mode does; each per-parameter optimizer keeps the seed the whole-model optimizer would give its
  parameter (its position in the param groups), so projections do not repeat across layers.
"""

from __future__ import annotations

import itertools
import math

from apollo_torch import APOLLOAdamW
from apollo_torch.random_projector import GradientProjector

from baselines._common import adam_kwargs, check_rank, one_of, positive_int, split_params
from baselines._layerwise import LayerwiseOptimizer

DEFAULTS = {"proj": "random", "scale_type": "channel", "scale": 1.0, "update_proj_gap": 200,
            "proj_type": "std", "scale_front": False, "eps": 1e-6, "layerwise": False}
SCALE_TYPES = ("channel", "tensor")
PROJ_TYPES = ("std", "reverse_std", "right", "left")


class APOLLOAdamWSerialisable(APOLLOAdamW):
    """`APOLLOAdamW` whose state_dict holds plain tensors and ints (see the module docstring)."""

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: ({**v, "projector": _projector_state(v["projector"])} if "projector" in v else v)
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        index = {i: g for g in state_dict["param_groups"] for i in g["params"]}
        state = {}
        for k, v in state_dict["state"].items():
            if "projector" in v:
                g, saved = index[k], v["projector"]
                proj = GradientProjector(g["rank"], update_proj_gap=g["update_proj_gap"], scale=g["scale"],
                                         proj_type=g["proj_type"], seed=int(saved["seed"]))
                proj.ortho_matrix = None if saved["ortho_matrix"] is None else saved["ortho_matrix"].clone()
                v = {**v, "projector": proj}
            state[k] = v
        super().load_state_dict({**state_dict, "state": state})


def _projector_state(proj) -> dict:
    if not isinstance(proj, GradientProjector):
        raise TypeError(f"APOLLO state holds a {type(proj).__name__} projector; "
                        "only proj='random' is supported")
    return {"ortho_matrix": proj.ortho_matrix, "seed": int(proj.seed)}


def build_apollo(model, cfg, rank):
    """APOLLO on `model` with auxiliary rank `rank` (checked against the targeted layers)."""
    rank = check_rank(model, rank)
    kwargs = adam_kwargs(cfg)
    scale = cfg["scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale={scale!r} is out of range: must be a finite number > 0")
    one_of(cfg, "proj", ("random",))  # the package's "svd" projector is GaLore's; not part of APOLLO's setup
    lowrank = {"rank": rank, "proj": "random", "scale_type": one_of(cfg, "scale_type", SCALE_TYPES),
               "scale": float(scale), "update_proj_gap": positive_int(cfg, "update_proj_gap"),
               "proj_type": one_of(cfg, "proj_type", PROJ_TYPES)}
    scale_front = one_of(cfg, "scale_front", (False, True))
    matrices, rest = split_params(model)
    groups = [{"params": rest}, {"params": matrices, **lowrank}]
    if not cfg.get("layerwise", False):
        return model, APOLLOAdamWSerialisable(groups, scale_front=scale_front, **kwargs)
    position = itertools.count(1)  # the package seeds each parameter's projections by its position

    def make(group):
        opt = APOLLOAdamWSerialisable(group, scale_front=scale_front, **kwargs)
        param = group[0]["params"][0]
        opt.state[param]["seed"] = next(position)
        return opt

    return model, LayerwiseOptimizer(groups, make)


def build(model, cfg):
    return build_apollo(model, cfg, cfg["rank"])

