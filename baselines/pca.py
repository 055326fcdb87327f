"""Periodic PCA: activation compression with a basis recomputed from scratch every `refresh_every` steps.

Same compressed layer and subspace AdamW as OASIS (`oasis.compress` + `OasisAdamW`); only the basis rule
differs: U = top-r eigenvectors of the uncentred activation Gram matrix XᵀX of the current batch, taken at
the first step and then every T steps (default 200). Between refreshes U is fixed. Moments are not
transported across a refresh by default (`transport="none"`, GaLore-style); `transport="ldadam"` carries
them with the same rule as OASIS.

Memory-lean refresh: XᵀX is accumulated in float32 over row blocks of at most d_in rows, so the refresh
holds O(d_in²) extra (the Gram matrix, one block, eigh's output), never an N × d_in copy of the batch.
"""

from __future__ import annotations

import torch

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, one_of, positive_int
from oasis import OasisAdamW, compress
from oasis.optim import TRANSPORTS
from oasis.subspace import SubspaceTracker, top_eigvecs

DEFAULTS = {"refresh_every": 200, "transport": "none", "share_inputs": True}


def lean_gram(x2d: torch.Tensor) -> torch.Tensor:
    """XᵀX in float32 (d_in × d_in), accumulated over blocks of d_in rows (no full float32 copy of X)."""
    d_in = x2d.shape[1]
    if x2d.dtype == torch.float32:
        return x2d.T @ x2d
    gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=x2d.device)
    for start in range(0, x2d.shape[0], d_in):
        block = x2d[start:start + d_in].float()
        gram.addmm_(block.T, block)
    return gram


class PeriodicPCATracker(SubspaceTracker):
    """Basis = top-r principal directions (uncentred) of the current batch, every `update_every` steps."""

    def _init_basis(self, x2d):
        return top_eigvecs(lean_gram(x2d), self.rank)

    def _next_basis(self, x2d, z):
        return top_eigvecs(lean_gram(x2d), self.rank)


def build(model, cfg):
    rank = check_rank(model, cfg["rank"], input_side=True)
    refresh_every = positive_int(cfg, "refresh_every")
    transport = one_of(cfg, "transport", TRANSPORTS)
    kwargs = adam_kwargs(cfg)

    def make_tracker(name, d_in, r):
        return PeriodicPCATracker(name, d_in, r, update_every=refresh_every, seed=int(cfg["seed"]))

    layers = compress(model, LLAMA_PROJECTIONS, rank, make_tracker, share_inputs=bool(cfg["share_inputs"]))
    return model, OasisAdamW(model, layers, transport=transport, **kwargs)
