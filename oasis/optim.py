"""Projection-aware AdamW, and the two pieces of Adam algebra it shares with LDAdam (`baselines/ldadam.py`).

Compressed weights: Adam moments m, v (d_out × r) on the low-rank gradient Ĝ (the `.grad` of the layer's
gradient carrier); the update is lifted back with the basis, W ← W − lr·scale·(Δ Uᵀ) − lr·wd·W with
Δ = m̂ / (√v̂ + ε). When a basis moves (R = U_newᵀ U_old), the moments are carried into the new
coordinates (`transport_moments`):
  m ← m Rᵀ                                   (exact for the part of m U_oldᵀ inside span(U_new))
  v̂ ← |(v̂ − m̂²)(R∘R)ᵀ + (m̂ Rᵀ)²|            (LDAdam: old coordinates as independent with variance v̂ − m̂²)
`transport="none"` leaves m, v as they are (GaLore / CompAct behaviour).
Every other trainable parameter gets plain AdamW, computed exactly as `torch.optim.AdamW` does.

One `step()`: (1) moments of layers whose basis was refreshed in forward (periodic PCA) are transported;
(2) the Adam update of every parameter, in the current bases; (3) the statistics of the bases due to move
at this step go through `stats_reduce` (one call, all trackers), each such basis moves, and the moments of
its layers are transported at once. See `oasis.subspace` for the timing. Each of these runs batched over
layers (`oasis.grouped`: foreach lists, stacked bases and moments) and reads no value back to the host;
the drift angles are computed only when `subspace_drift()` asks for them.

FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters become DTensors sharded by rows (Shard(0)), the
gradient carriers and their Ĝ included, while the bases (tracker tensors, not parameters) stay plain and
identical on every rank through `stats_reduce`. Each rank then works on its own rows only: its moments are
the (d_out / world) × r shards of m, v (kept as DTensors, like `torch.optim.AdamW`'s, so distributed
checkpointing sees them sharded), its update is its rows of W minus (rows of Δ) Uᵀ, and the transport
(rows × r times r × r) and weight decay are row-local; no collective beyond FSDP's own and `stats_reduce`.
Build the optimizer after `fully_shard`, which replaces the Parameter objects:

    layers = oasis.compress(model, targets, rank, make_tracker)   # or prepare(model, cfg, shard=...)
    for block in model.layers: fully_shard(block)
    fully_shard(model)
    optimizer = OasisAdamW(model, layers, lr=..., stats_reduce=oasis.all_reduce_sum())
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import grouped
from .linear import CompressedLinear
from .subspace import StatsReduce, largest_principal_angle, largest_principal_angle_on_device

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = ()

TRANSPORTS = ("ldadam", "none")
EMBEDDING_UPDATES = ("step", "backward")


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: int, betas: tuple[float, float],
                   eps: float, lr: float, *, out: Tensor | None = None) -> tuple[Tensor, float]:
    """Adam's moment update (in place, with `grad`; `step` counts this update) and its step split as
    `torch.optim.AdamW` computes it: returns (m / (√v / √(1 − β2ᵗ) + ε), lr / (1 − β1ᵗ)), so that the update
    is `param -= step_size * direction` (lifted through a basis or not). The direction is written into `out`
    when given (it may be `grad` itself, which is no longer needed once the moments have it), else into
    one new tensor the size of the gradient."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    # the denominator, then the direction written over it: one buffer
    denom = torch.sqrt(exp_avg_sq, out=out) if out is not None else exp_avg_sq.sqrt()
    denom.div_(math.sqrt(bias_correction2)).add_(eps)
    return torch.div(exp_avg, denom, out=denom), lr / bias_correction1


def transport_moments(exp_avg: Tensor, exp_avg_sq: Tensor, rotation: Tensor, step: int,
                      betas: tuple[float, float], *, left: bool = False) -> tuple[Tensor, Tensor]:
    """Carry Adam moments from old basis coordinates to new ones; returns new (m, v).

    `rotation` is U_newᵀ U_old (r_new × r_old). The basis coordinates are the columns of the moments
    (rows × r: m ← m Rᵀ) or, with `left`, their rows (r × cols: m ← R m; LDAdam's projection of the smaller
    side). `step` is the number of updates the moments have seen (for bias correction). m is rotated
    linearly; for v the old coordinates are treated as independent with mean m̂ and variance v̂ − m̂², so a
    new coordinate (a linear combination) has second moment (R∘R)·variances + (transported m̂)²; |·| guards
    against the negative values rounding can give; bias correction is undone so the running average
    continues unchanged.
    """
    beta1, beta2 = betas
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rotation = rotation.to(exp_avg.dtype)
    squared = rotation.square()
    m_hat = exp_avg / bc1
    variance = exp_avg_sq / bc2 - m_hat.square()
    if left:
        new_m = rotation @ exp_avg
        v_hat = (squared @ variance).add_((rotation @ m_hat).square_())
    else:  # .mT: a leading batch dim is allowed (`oasis.grouped.transport`)
        new_m = exp_avg @ rotation.mT
        v_hat = (variance @ squared.mT).add_((m_hat @ rotation.mT).square_())
    return new_m, v_hat.abs_().mul_(bc2)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), else `t` itself. Under no_grad the shard is an alias of the
    DTensor's storage: in-place operations on it update the DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_reduce_sum(group=None) -> StatsReduce:
    """A `stats_reduce` for `torch.distributed`: sums a list of tensors across the ranks of `group`, in
    place, with one all-reduce per dtype (the tensors are flattened into one buffer each)."""
    import torch.distributed as dist

    def reduce(tensors: list[Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for same in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    return reduce


class OasisAdamW(torch.optim.Optimizer):
    """AdamW that trains compressed layers in their subspaces and everything else in full.

    Args:
        model: the model whose trainable parameters are optimised (all of them).
        compressed: the `CompressedLinear` modules of `model` (from `oasis.compress`).
        transport: "ldadam" (carry moments when a basis moves) or "none".
        stats_reduce: None, or a callable that sum-all-reduces a list of tensors in place (e.g.
            `all_reduce_sum()`); every statistic a basis is computed from goes through it first, so that a
            data-parallel run moves every basis identically on every rank. Also settable later as the
            `stats_reduce` attribute.
        embedding_update: "step" (the input embedding is updated in `step()`, like any parameter) or
            "backward": its AdamW update runs inside backward, as soon as its gradient is complete, and the
            gradient is freed at once (`step()` skips it). Then the embedding's gradient cannot accumulate
            over micro-batches (each backward updates it), and DDP / GradScaler / clipping do not see it.
    Param groups: group 0 holds the compressed layers' gradient carriers (their state is the d_out × r
    moments), group 1 the other parameters, and with embedding_update="backward" a last group holds the
    input embedding. All follow `lr` changes by LR schedulers as usual.
    """

    def __init__(self, model: nn.Module, compressed: list[CompressedLinear], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 transport: str = "ldadam", stats_reduce: StatsReduce | None = None,
                 embedding_update: str = "step"):
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if embedding_update not in EMBEDDING_UPDATES:
            raise ValueError(f"embedding_update must be one of {', '.join(EMBEDDING_UPDATES)}, "
                             f"got {embedding_update!r}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self._layers = [m for m in compressed if m.grad_carrier.requires_grad]
        carriers = [m.grad_carrier for m in self._layers]
        embedding = _input_embedding(model) if embedding_update == "backward" else None
        skip = {id(p) for p in carriers} | {id(m.weight) for m in compressed} | {id(embedding)}
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
        groups = [{"params": carriers, "compressed": True}, {"params": others, "compressed": False}]
        if embedding is not None:
            groups.append({"params": [embedding], "compressed": False, "in_backward": True})
        groups = [g for g in groups if g["params"]]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.transport = transport
        self._layer_of = {id(m.grad_carrier): m for m in self._layers}
        self._trackers = list({id(m.tracker): m.tracker for m in compressed}.values())
        self._layers_of = {id(t): [m for m in self._layers if m.tracker is t] for t in self._trackers}
        self.stats_reduce = stats_reduce
        self._unasked_drift: list[Tensor] = []  # [sum of angles of moves not asked about before the next]
        self._hooks = []
        if embedding is not None:
            self._hooks.append(embedding.register_post_accumulate_grad_hook(self._update_in_backward))

    @property
    def trackers(self):
        return self._trackers

    @property
    def steps_in_backward(self) -> bool:
        """True when a parameter is updated inside backward (embedding_update="backward"): a data-parallel
        wrapper cannot average its gradient before the update."""
        return any(g.get("in_backward") for g in self.param_groups)

    @property
    def stats_reduce(self) -> StatsReduce | None:
        return self._stats_reduce

    @stats_reduce.setter
    def stats_reduce(self, fn: StatsReduce | None) -> None:
        self._stats_reduce = fn
        for tracker in self._trackers:  # PCA inits and refreshes in forward reduce their Gram through it
            tracker.reduce = fn

    def subspace_drift(self) -> float:
        """Mean over bases of the largest principal angle (radians) moved since the previous call: the
        angles of the moves booked since are computed here, in one batched fp64 SVD."""
        if not self._trackers:
            return 0.0
        moved = [r for t in self._trackers for _, r in t.moved]
        total = sum(self._unasked_drift)
        self._unasked_drift.clear()
        for t in self._trackers:  # and what a tracker folded alone: one read back in all
            total = total + t.drift_since_query
            t.moved, t.drift_since_query = [], 0.0
        if moved:
            total = total + largest_principal_angle(torch.stack(moved)).sum()
        return float(total) / len(self._trackers)

    def _fold_unasked_drift(self) -> None:
        """Moves of earlier steps nobody asked about: their angles, on the device, in one batch (so that a
        tracker keeps the rotations of one step at most)."""
        moved = [r for t in self._trackers for r in t.take_moves_before(t.steps)]
        if moved:
            angles = largest_principal_angle_on_device(torch.stack(moved)).sum()
            # a list mutated in place (torch.compile keeps that side effect), holding one running sum
            self._unasked_drift[:] = [angles + self._unasked_drift[0]] if self._unasked_drift else [angles]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refreshed = {}  # bases refreshed in forward since the last step
        for tracker in self._trackers:
            rotation = tracker.pop_rotation()
            if rotation is not None:
                refreshed[id(tracker)] = rotation
        self._transport(refreshed)
        for group in self.param_groups:
            if group.get("in_backward"):
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if group["compressed"]:
                for p in group["params"]:
                    if self._layer_of[id(p)].grad_carrier is not p:
                        raise RuntimeError("a compressed layer's gradient carrier is not the Parameter this "
                                           "optimizer was built with: build the optimizer after fully_shard "
                                           "(or anything else that replaces the model's Parameters)")
                grouped.compressed_step([self._layer_of[id(p)] for p in params],
                                        [self.state[p] for p in params], group, local)
            elif params:
                grouped.adamw_step(params, [self.state[p] for p in params], group, local)
        self._fold_unasked_drift()
        due = [t for t in self._trackers if t.moves_this_step()]
        stats = [s for t in due for s in t.statistics()]
        if stats and self._stats_reduce is not None:
            self._stats_reduce(stats)
        self._transport(grouped.advance(due))
        for tracker in self._trackers:
            tracker.step()
        return loss

    def _transport(self, rotations: dict) -> None:
        """Carry the moments of the layers whose tracker (by id) moved into its new coordinates."""
        if not rotations or self.transport == "none":
            return
        layers = [m for m in self._layers if id(m.tracker) in rotations]
        grouped.transport(layers, [self.state[m.grad_carrier] for m in layers],
                          [rotations[id(m.tracker)] for m in layers], self.param_groups[0]["betas"], local,
                          transport_moments)

    def _adamw_step(self, p: Tensor, grad: Tensor, group, out: Tensor | None = None) -> None:
        direction, step_size = self._adam(self.state[p], grad, group, out)
        p = local(p)
        if group["weight_decay"] != 0:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-step_size)

    @staticmethod
    def _adam(state: dict, grad: Tensor, group, out: Tensor | None = None) -> tuple[Tensor, float]:
        if "step" not in state:  # lazily, shaped like the gradient: d_out × r for compressed layers
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad)  # a DTensor like the gradient under FSDP2
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        # elementwise: under FSDP2 each rank updates its shard, in place (no DTensor dispatch)
        return adam_direction(local(state["exp_avg"]), local(state["exp_avg_sq"]), local(grad), state["step"],
                              group["betas"], group["eps"], group["lr"],
                              out=None if out is None else local(out))

    @torch.no_grad()
    def _update_in_backward(self, p: Tensor) -> None:
        group = next(g for g in self.param_groups if g.get("in_backward"))
        # the gradient is freed right after, so the direction is computed in its storage: no temporary
        self._adamw_step(p, p.grad, group, out=p.grad)
        p.grad = None

    # --- checkpointing: the bases live in the trackers, so they travel with the optimizer state ---------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["trackers"] = [t.state_dict() for t in self._trackers]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        trackers = state_dict.pop("trackers", None)
        super().load_state_dict(state_dict)
        if trackers is not None:
            if len(trackers) != len(self._trackers):
                raise ValueError(f"state has {len(trackers)} bases, optimizer has {len(self._trackers)}")
            for tracker, ts in zip(self._trackers, trackers):
                tracker.load_state_dict(ts)


def _input_embedding(model: nn.Module) -> nn.Parameter:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None or not isinstance(getattr(embedding, "weight", None), nn.Parameter):
        raise ValueError("embedding_update='backward' needs a model with get_input_embeddings() "
                         "(a Hugging Face model)")
    weight = embedding.weight
    if not weight.requires_grad:
        raise ValueError("embedding_update='backward': the input embedding is frozen")
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(names) > 1:
        raise ValueError(f"embedding_update='backward' needs an untied input embedding; its weight is "
                         f"shared by {', '.join(names)} (it would be updated once per use)")
    return weight
