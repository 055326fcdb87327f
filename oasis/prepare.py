"""`prepare(model, cfg)`: swap target linears for compressed ones and return the optimizer.

FSDP2: compress first, then `fully_shard`, then build the optimizer (fully_shard replaces the Parameters):
`prepare(model, cfg, shard=apply_fully_shard, stats_reduce=all_reduce_sum())` does the three in this order,
`apply_fully_shard(model)` being whatever `fully_shard` calls the model needs (per block, then the root).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .linear import CompressedLinear, SharedProjection, carrier_dtype
from .optim import OasisAdamW
from .subspace import OjaTracker, StatsReduce, SubspaceTracker

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# sibling layers that read the same input tensor in Llama-style blocks
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
LM_HEAD = "lm_head"


@dataclass
class OasisConfig:
    """OASIS hyper-parameters (DESIGN §3.1).

    rank: basis size r per layer (group). subspace_lr: Oja step η, relative (see `OjaTracker`); 0 freezes the
    basis after init. oja_norm: how the Oja step is normalised, one of `OJA_NORMS` (see
    `oasis.subspace.oja_step`). update_every: move the basis every k optimizer steps. init: "pca" (top-r
    directions of the first batch), "random" (seeded orthonormal) or "identity" (first r coordinates; for
    tests).
    transport: "ldadam" or "none". targets: names of the nn.Linear modules to compress (matched on the last
    component of the module path). share_inputs: q/k/v and gate/up share one basis and one stored projection.
    compress_lm_head: also compress `lm_head` like any linear layer (its input projected, its gradient and
    moments vocab × r); refused when lm_head is tied to the input embedding. embedding_update: "step" or
    "backward" (the input embedding's AdamW update inside backward, its gradient freed at once; see
    `OasisAdamW`).
    """

    rank: int = 32
    subspace_lr: float = 0.1
    oja_norm: str = "sanger"
    update_every: int = 1
    init: str = "pca"
    transport: str = "ldadam"
    targets: tuple[str, ...] = LLAMA_TARGETS
    share_inputs: bool = True
    seed: int = 0
    compress_lm_head: bool = False
    embedding_update: str = "step"


TrackerFactory = Callable[[str, int, int], SubspaceTracker]


def compress(model: nn.Module, targets: Iterable[str], rank: int, make_tracker: TrackerFactory,
             share_inputs: bool = True) -> list[CompressedLinear]:
    """Replace every `nn.Linear` named in `targets` by a `CompressedLinear`, in place; return them in order.

    `make_tracker(name, d_in, rank)` builds the basis tracker of a layer (or of a group of layers sharing an
    input, named after its first member). Raises ValueError when nothing matches, rank exceeds a layer, or a
    targeted weight is shared with another module (tied weights). The layers' gradient carriers are views
    of one zero buffer per (device, dtype), as long as the largest of them.
    """
    targets = tuple(targets)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and not isinstance(mod, CompressedLinear)
             and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named one of {', '.join(targets)} in the model")
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, mod in found:
        if rank > mod.in_features:
            raise ValueError(f"rank {rank} exceeds the input size of {name} ({mod.in_features}); "
                             f"choose rank in [1, {mod.in_features}]")
        tied = [n for n in owners.get(id(mod.weight), []) if n != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {', '.join(tied)}: a compressed layer cannot share "
                             f"its weight; untie it or leave {name} out of the targets")
    sizes: dict[tuple, int] = {}
    for _, mod in found:
        key = (mod.weight.device, carrier_dtype(mod.weight))
        sizes[key] = max(sizes.get(key, 0), mod.out_features * rank)
    buffers = {key: torch.zeros(size, dtype=key[1], device=key[0]) for key, size in sizes.items()}
    by_name = dict(found)
    groups: dict[str, tuple[SubspaceTracker, SharedProjection]] = {}
    compressed = []
    for name, mod in found:
        parent, _, leaf = name.rpartition(".")
        key = name
        if share_inputs:
            for group in SHARED_INPUT_GROUPS:
                members = [f"{parent}.{m}" if parent else m for m in group if m in targets]
                present = [m for m in members if m in by_name]
                if leaf in group and len(present) > 1:
                    key = present[0]
                    if key not in groups:
                        tracker = make_tracker(key, mod.in_features, rank)
                        groups[key] = (tracker, SharedProjection(len(present)))
        if key not in groups:
            groups[key] = (make_tracker(key, mod.in_features, rank), SharedProjection(1))
        tracker, shared = groups[key]
        buffer = buffers[(mod.weight.device, carrier_dtype(mod.weight))]
        carrier = buffer[:mod.out_features * rank].view(mod.out_features, rank)
        layer = CompressedLinear(mod, tracker, shared, carrier=carrier)
        layer.train(mod.training)
        parent_mod = model.get_submodule(parent) if parent else model
        setattr(parent_mod, leaf, layer)
        compressed.append(layer)
    return compressed


def prepare(model: nn.Module, cfg: OasisConfig | None = None, *, lr: float = 1e-4, weight_decay: float = 0.0,
            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
            stats_reduce: StatsReduce | None = None,
            shard: Callable[[nn.Module], object] | None = None) -> OasisAdamW:
    """Compress `cfg.targets` (and lm_head with `cfg.compress_lm_head`) in `model`, in place, and return an
    optimizer over all trainable parameters. Cast and move the model before: the compressed layers' float32
    gradient carriers are made here. `stats_reduce`: see `OasisAdamW` (data-parallel runs). `shard`: called
    as `shard(model)` after compression and before the optimizer is built, e.g. to apply FSDP2's
    `fully_shard` (see `oasis.optim`)."""
    cfg = cfg or OasisConfig()

    def make_tracker(name: str, d_in: int, rank: int) -> OjaTracker:
        return OjaTracker(name, d_in, rank, subspace_lr=cfg.subspace_lr, normalization=cfg.oja_norm,
                          update_every=cfg.update_every, init=cfg.init, seed=cfg.seed)

    targets = tuple(cfg.targets)
    if cfg.compress_lm_head and LM_HEAD not in targets:
        if not isinstance(getattr(model, LM_HEAD, None), nn.Linear):
            raise ValueError("compress_lm_head: the model has no nn.Linear named lm_head")
        targets += (LM_HEAD,)
    layers = compress(model, targets, cfg.rank, make_tracker, share_inputs=cfg.share_inputs)
    if shard is not None:
        shard(model)
    return OasisAdamW(model, layers, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      transport=cfg.transport, stats_reduce=stats_reduce,
                      embedding_update=cfg.embedding_update)
