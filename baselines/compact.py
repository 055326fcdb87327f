"""CompAct-style random projection (Shamshoum et al., 2024): activation compression with a Gaussian basis.

Same compressed layer and subspace AdamW as OASIS (`oasis.compress` + `OasisAdamW`, transport="none"); the
basis is a d_in × r Gaussian matrix with N(0, 1/r) entries (so E[U Uᵀ] = I: the lifted gradient G U Uᵀ is
unbiased), drawn from a per-layer seed and redrawn every `refresh_every` steps (default 50); the weight
update is scaled by `scale` (default 0.25). Moments are never transported (CompAct does not).

Deviation from CompAct: it regenerates U from the seed when needed instead of keeping it; here the d_in × r
basis is stored in the tracker like every other activation-compression method (n·r per layer group).
"""

from __future__ import annotations

import math

import torch

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, positive_int
from oasis import OasisAdamW, compress
from oasis.subspace import SubspaceTracker, layer_seed

DEFAULTS = {"refresh_every": 50, "scale": 0.25, "share_inputs": True}


class GaussianProjectionTracker(SubspaceTracker):
    """Basis = N(0, 1/r) d_in × r matrix, redrawn every `update_every` steps from (seed, layer, period).

    Data-free: no statistics are kept, and the new draw happens in `optimizer.step()` (identical on every
    rank). Not orthonormal, so no rotation is reported (nothing to transport); drift is measured between
    the orthonormalised spans."""

    needs_statistics = False
    orthonormal = False

    def __init__(self, name, d_in, rank, *, scale=0.25, **kwargs):
        super().__init__(name, d_in, rank, **kwargs)
        self.scale = scale

    def _gaussian(self, period: int, device) -> torch.Tensor:
        gen = torch.Generator(device="cpu").manual_seed(layer_seed(self.seed, f"{self.name}#{period}"))
        return (torch.randn(self.d_in, self.rank, generator=gen) / math.sqrt(self.rank)).to(device)

    def _init_basis(self, x2d):
        return self._gaussian(self.steps // self.update_every, x2d.device)

    def _next_basis(self):
        # called at the end of step `self.steps`: the draw of the period the next step starts
        return self._gaussian((self.steps + 1) // self.update_every, self.basis.device)


def build(model, cfg):
    rank = check_rank(model, cfg["rank"], input_side=True)
    every = positive_int(cfg, "refresh_every")
    scale = cfg["scale"]
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} is out of range: must be a finite number > 0")
    kwargs = adam_kwargs(cfg)

    def make_tracker(name, d_in, r):
        return GaussianProjectionTracker(name, d_in, r, scale=float(scale), update_every=every,
                                         seed=int(cfg["seed"]))

    layers = compress(model, LLAMA_PROJECTIONS, rank, make_tracker, share_inputs=bool(cfg["share_inputs"]))
    return model, OasisAdamW(model, layers, transport="none", **kwargs)
