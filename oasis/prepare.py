"""`prepare(model, cfg)`: swap target linears for compressed ones and return the optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from .linear import CompressedLinear, SharedProjection
from .optim import OasisAdamW
from .subspace import OjaTracker, SubspaceTracker

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# sibling layers that read the same input tensor in Llama-style blocks
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class OasisConfig:
    """OASIS hyper-parameters (DESIGN §3.1).

    rank: basis size r per layer (group). subspace_lr: Oja step η, relative (see `OjaTracker`); 0 freezes the
    basis after init. update_every: move the basis every k optimizer steps. init: "pca" (top-r directions of
    the first batch), "random" (seeded orthonormal) or "identity" (first r coordinates; for tests).
    transport: "ldadam" or "none". targets: names of the nn.Linear modules to compress (matched on the last
    component of the module path). share_inputs: q/k/v and gate/up share one basis and one stored projection.
    """

    rank: int = 32
    subspace_lr: float = 0.1
    update_every: int = 1
    init: str = "pca"
    transport: str = "ldadam"
    targets: tuple[str, ...] = LLAMA_TARGETS
    share_inputs: bool = True
    seed: int = 0


TrackerFactory = Callable[[str, int, int], SubspaceTracker]


def compress(model: nn.Module, targets: Iterable[str], rank: int, make_tracker: TrackerFactory,
             share_inputs: bool = True) -> list[CompressedLinear]:
    """Replace every `nn.Linear` named in `targets` by a `CompressedLinear`, in place; return them in order.

    `make_tracker(name, d_in, rank)` builds the basis tracker of a layer (or of a group of layers sharing an
    input, named after its first member). Raises ValueError when nothing matches or rank exceeds a layer.
    """
    targets = tuple(targets)
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.Linear) and not isinstance(mod, CompressedLinear)
             and name.rsplit(".", 1)[-1] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named one of {', '.join(targets)} in the model")
    for name, mod in found:
        if rank > mod.in_features:
            raise ValueError(f"rank {rank} exceeds the input size of {name} ({mod.in_features}); "
                             f"choose rank in [1, {mod.in_features}]")
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
        layer = CompressedLinear(mod, tracker, shared)
        layer.train(mod.training)
        parent_mod = model.get_submodule(parent) if parent else model
        setattr(parent_mod, leaf, layer)
        compressed.append(layer)
    return compressed


def prepare(model: nn.Module, cfg: OasisConfig | None = None, *, lr: float = 1e-4, weight_decay: float = 0.0,
            betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> OasisAdamW:
    """Compress `cfg.targets` in `model` (in place) and return an optimizer over all trainable parameters."""
    cfg = cfg or OasisConfig()

    def make_tracker(name: str, d_in: int, rank: int) -> OjaTracker:
        return OjaTracker(name, d_in, rank, subspace_lr=cfg.subspace_lr, update_every=cfg.update_every,
                          init=cfg.init, seed=cfg.seed)

    layers = compress(model, cfg.targets, cfg.rank, make_tracker, share_inputs=cfg.share_inputs)
    return OasisAdamW(model, layers, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                      transport=cfg.transport)
