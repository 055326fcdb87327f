"""Periodic PCA: activation compression with a basis recomputed from scratch every `refresh_every` steps.

Same compressed layer and subspace AdamW as OASIS (`oasis.compress` + `OasisAdamW`); only the basis rule
differs: U = top-r eigenvectors of the uncentred activation Gram matrix XᵀX of the current batch, taken at
the first step and then every T steps (default 200). Between refreshes U is fixed. Moments are not
transported across a refresh by default (`transport="none"`, GaLore-style); `transport="ldadam"` carries
them with the same rule as OASIS.

Memory-lean refresh: the basis is recomputed in the forward of the first micro-batch of a refresh step, from
that micro-batch (the tracker's `refresh_in_forward` policy), so no d_in × d_in matrix is held from forward
to step; XᵀX is accumulated in float32 over row blocks of at most d_in rows (`oasis.subspace.lean_gram`), so
the refresh holds O(d_in²) extra (the Gram matrix, one block, eigh's output), never an N × d_in copy of the
batch. In a data-parallel run the Gram goes through the optimizer's `stats_reduce` first (every rank then
computes the same basis from the global micro-batch).
"""

from __future__ import annotations

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, one_of, positive_int, shard
from oasis import OasisAdamW, compress
from oasis.optim import TRANSPORTS
from oasis.subspace import SubspaceTracker, lean_gram, top_eigvecs

__all__ = ["PeriodicPCATracker", "build", "lean_gram"]

DEFAULTS = {"refresh_every": 200, "transport": "none", "share_inputs": True}


class PeriodicPCATracker(SubspaceTracker):
    """Basis = top-r principal directions (uncentred) of the current micro-batch, at the first step and
    every `update_every` steps, computed in forward."""

    refresh_in_forward = True

    def _init_basis(self, x2d):
        return top_eigvecs(self._reduced_gram(x2d), self.rank)

    def _refresh_basis(self, x2d):
        return top_eigvecs(self._reduced_gram(x2d), self.rank)


def build(model, cfg):
    rank = check_rank(model, cfg["rank"], input_side=True)
    refresh_every = positive_int(cfg, "refresh_every")
    transport = one_of(cfg, "transport", TRANSPORTS)
    kwargs = adam_kwargs(cfg)

    def make_tracker(name, d_in, r):
        return PeriodicPCATracker(name, d_in, r, update_every=refresh_every, seed=int(cfg["seed"]))

    layers = compress(model, LLAMA_PROJECTIONS, rank, make_tracker, share_inputs=bool(cfg["share_inputs"]))
    shard(cfg, model)
    return model, OasisAdamW(model, layers, transport=transport, **kwargs)
