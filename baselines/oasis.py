"""OASIS through the project's `oasis` library (`prepare`): compressed attention/MLP layers whose basis
follows the activations by Oja's rule, with projection-aware AdamW. The registry also exposes two ablations
of this module: `oasis-notransport` (transport="none": moments kept as they are when the basis moves) and
`oasis-frozen` (subspace_lr=0: the first batch's PCA basis is never moved).
"""

from __future__ import annotations

import math

from baselines._common import LLAMA_PROJECTIONS, adam_kwargs, check_rank, one_of, positive_int
from oasis import OasisConfig, prepare
from oasis.optim import TRANSPORTS
from oasis.subspace import INITS

DEFAULTS = {"subspace_lr": 0.1, "update_every": 1, "init": "pca", "transport": "ldadam", "share_inputs": True}


def build(model, cfg):
    rank = check_rank(model, cfg["rank"], input_side=True)
    subspace_lr = cfg["subspace_lr"]
    if not isinstance(subspace_lr, (int, float)) or not math.isfinite(subspace_lr) or subspace_lr < 0:
        raise ValueError(f"subspace_lr={subspace_lr!r} is out of range: must be a finite number >= 0")
    oasis_cfg = OasisConfig(rank=rank, subspace_lr=float(subspace_lr),
                            update_every=positive_int(cfg, "update_every"), init=one_of(cfg, "init", INITS),
                            transport=one_of(cfg, "transport", TRANSPORTS), targets=LLAMA_PROJECTIONS,
                            share_inputs=bool(cfg["share_inputs"]), seed=int(cfg["seed"]))
    return model, prepare(model, oasis_cfg, **adam_kwargs(cfg))
