"""GaLore from `galore-torch` (Zhao et al., 2024): gradients of the attention/MLP weights are projected on
the top-r singular vectors of the gradient (recomputed every `update_proj_gap` steps), Adam runs in that
subspace, updates are projected back and scaled by `scale`. Every other parameter gets plain Adam from the
same optimizer (a param group without `rank`), as in GaLore's own training script.

What this adapter adds on top of the package, nothing in the update itself:
* `galore8bit`: `GaLoreAdamW8bit` passes bitsandbytes arguments positionally; with bitsandbytes >= 0.50 they
  land in the wrong slots (percentile_clipping=100 -> max_unorm, block_wise=True -> skip_zeros), so every
  tensor in 32-bit state (the small projected ones, < min_8bit_size elements) has its update clipped to
  zero (max_unorm is relative to the parameter norm, and GaLore zeroes the parameter before the update).
  `GaLoreAdamW8bitFixed` passes them by name. Its step also calls `torch.cuda.synchronize()` unconditionally,
  which raises on CPU-only torch: on CPU that call is made a no-op for the duration of the step
  (`suites.core.patching.patched`: it raises if the attribute is gone and restores it on every exit).
* `state_dict()` holds each projector's matrix (a tensor) instead of the `GaLoreProjector` object, so a
  checkpoint loads with `torch.load(weights_only=True)` and a loaded optimizer owns its own projectors.
* eps defaults to 1e-6, GaLore's own default (the torch default is 1e-8).
"""

from __future__ import annotations

import warnings

import torch
from bitsandbytes.optim.optimizer import Optimizer2State
from galore_torch import GaLoreAdamW, GaLoreAdamW8bit
from galore_torch.galore_projector import GaLoreProjector

from baselines._common import adam_kwargs, check_rank, one_of, positive_int, split_params
from baselines._layerwise import LayerwiseOptimizer
from suites.core.patching import patched

DEFAULTS = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "eps": 1e-6, "optim_bits": 32,
            "layerwise": False}
PROJ_TYPES = ("std", "reverse_std", "right", "left")


class _ProjectorStateMixin:
    """`state_dict()` holds each `GaLoreProjector` as its matrix; loading rebuilds it from the param group."""

    def gradient_projectors(self):
        """[(weight, its current projector matrix)] for the tracking diagnostic
        (`suites.measure.tracking`)."""
        return [(p, st["projector"].ortho_matrix) for p, st in self.state.items()
                if "projector" in st and st["projector"].ortho_matrix is not None]

    def state_dict(self):
        sd = super().state_dict()
        sd["state"] = {k: ({**v, "projector": v["projector"].ortho_matrix} if "projector" in v else v)
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        index = {}
        for group in state_dict["param_groups"]:
            for i in group["params"]:
                index[i] = group
        state = {}
        for k, v in state_dict["state"].items():
            if "projector" in v:
                g = index[k]
                proj = GaLoreProjector(g["rank"], update_proj_gap=g["update_proj_gap"], scale=g["scale"],
                                       proj_type=g["proj_type"])
                proj.ortho_matrix = v["projector"].clone()
                v = {**v, "projector": proj}
            state[k] = v
        super().load_state_dict({**state_dict, "state": state})


class GaLoreAdamWSerialisable(_ProjectorStateMixin, GaLoreAdamW):
    def __init__(self, params, **kwargs):
        super().__init__(params, no_deprecation_warning=True, **kwargs)


class GaLoreAdamW8bitFixed(_ProjectorStateMixin, GaLoreAdamW8bit):
    """`GaLoreAdamW8bit` with its bitsandbytes arguments passed by name (see the module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                 is_paged=False):
        Optimizer2State.__init__(self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 optim_bits=8, args=None, min_8bit_size=min_8bit_size, max_unorm=0.0,
                                 skip_zeros=False, is_paged=is_paged)

    @torch.no_grad()
    def step(self, closure=None):
        if any(p.is_cuda for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        with _no_cuda_synchronize():
            return super().step(closure)


def _no_synchronize(device=None) -> None:
    """Nothing to wait for: the step's tensors are on the CPU."""


def _no_cuda_synchronize():
    """`torch.cuda.synchronize` as a no-op for the body of a `with` (raises if torch no longer has it)."""
    why = "GaLoreAdamW8bit.step calls torch.cuda.synchronize(), which raises on CPU-only torch"
    return patched(torch.cuda, "synchronize", _no_synchronize, why=why)


def build(model, cfg):
    rank = check_rank(model, cfg["rank"])
    kwargs = adam_kwargs(cfg)
    bits = one_of(cfg, "optim_bits", (32, 8))
    galore_opts = {"rank": rank, "update_proj_gap": positive_int(cfg, "update_proj_gap"),
                   "scale": float(cfg["scale"]), "proj_type": one_of(cfg, "proj_type", PROJ_TYPES)}
    matrices, rest = split_params(model)
    groups = [{"params": rest}, {"params": matrices, **galore_opts}]
    if bits == 8:
        def make(g):
            return GaLoreAdamW8bitFixed(g, **kwargs)
    else:
        def make(g):
            return GaLoreAdamWSerialisable(g, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if cfg.get("layerwise", False):
            return model, LayerwiseOptimizer(groups, make)
        return model, make(groups)
