"""OASIS through the project's `oasis` library (`prepare`): compressed attention/MLP layers whose basis
follows the activations by Oja's rule, with projection-aware AdamW. The registry also exposes two ablations
of this module: `oasis-notransport` (transport="none": moments kept as they are when the basis moves) and
`oasis-frozen` (subspace_lr=0: the first batch's PCA basis is never moved).

Two OASIS-only memory options, off by default: `compress_lm_head` (lm_head compressed like the projections:
its gradient and moments vocab × r; refused when lm_head is tied to the embedding) and
`embedding_update="backward"` (the input embedding's AdamW update inside backward, its gradient freed at
once; it cannot accumulate over micro-batches).
"""

from __future__ import annotations

import math

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, one_of, positive_int
from oasis import OasisConfig, prepare
from oasis.optim import EMBEDDING_UPDATES, TRANSPORTS
from oasis.subspace import INITS, OJA_NORMS

DEFAULTS = {"subspace_lr": 0.1, "oja_norm": "sanger", "update_every": 1, "init": "pca",
            "transport": "ldadam", "share_inputs": True, "compress_lm_head": False,
            "embedding_update": "step"}


def build(model, cfg):
    rank = check_rank(model, cfg["rank"], input_side=True)
    subspace_lr = cfg["subspace_lr"]
    if not isinstance(subspace_lr, (int, float)) or not math.isfinite(subspace_lr) or subspace_lr < 0:
        raise ValueError(f"subspace_lr={subspace_lr!r} is out of range: must be a finite number >= 0")
    oasis_cfg = OasisConfig(rank=rank, subspace_lr=float(subspace_lr),
                            oja_norm=one_of(cfg, "oja_norm", OJA_NORMS),
                            update_every=positive_int(cfg, "update_every"), init=one_of(cfg, "init", INITS),
                            transport=one_of(cfg, "transport", TRANSPORTS), targets=LLAMA_PROJECTIONS,
                            share_inputs=bool(cfg["share_inputs"]), seed=int(cfg["seed"]),
                            compress_lm_head=_flag(cfg, "compress_lm_head"),
                            embedding_update=one_of(cfg, "embedding_update", EMBEDDING_UPDATES))
    return model, prepare(model, oasis_cfg, shard=cfg.get("shard"), **adam_kwargs(cfg))


def _flag(cfg, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} is not valid; choose from True, False")
    return value
