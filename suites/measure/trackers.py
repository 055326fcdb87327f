"""The tensor trackers behind every meter (`suites.measure.meters`, whose docstring defines the breakdown
categories): live storage bytes counted at the dispatcher, each storage in the first category that claims it,
for one process (`TensorTracker`) or one rank of a DDP / FSDP2 run (`DistributedTracker`)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from suites.core.patching import patched

CATEGORIES = ("params", "grads", "optimizer", "activations", "other")


def _storage(t: torch.Tensor):
    """The untyped storage behind a plain or fake tensor, or None (sparse, nested, wrapper subclasses)."""
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _walk_tensors(obj, out: list, seen: set, depth: int = 0) -> None:
    """Collect tensors reachable from `obj` through containers and plain objects' attributes."""
    if depth > 8 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _walk_tensors(value, out, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            _walk_tensors(value, out, seen, depth + 1)
    elif isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))) or callable(obj):
        return  # modules hold "params"; scalars and functions (hooks) hold nothing
    elif hasattr(obj, "__dict__"):
        _walk_tensors(vars(obj), out, seen, depth + 1)


def _scalar(func, args):
    """`.item()`, `float(t)`, `bool(t)`: the value, or under FakeTensorMode (no values) a placeholder.

    Fake tensors have no data, so a Python scalar read from one (a loss printed, a `if t.max() > 0`
    guard, a principal angle logged) gets 1 / 1.0 / True. Memory does not depend on these values in
    the training steps measured here; shapes never come from them (a data-dependent shape still
    raises). """
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor

    try:
        return func(*args)
    except DataDependentOutputException:
        if not isinstance(args[0], FakeTensor):
            raise
        dtype = args[0].dtype
        return True if dtype is torch.bool else (1.0 if dtype.is_floating_point else 1)


class _Saved:
    """What autograd keeps for a saved tensor while the tracker's hooks are active."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def unpack(self) -> torch.Tensor:
        return self.tensor


class TensorTracker(TorchDispatchMode):
    """Live storage bytes, counted at the dispatcher.

    Every op's outputs are looked at; a storage is registered the first time it is seen and
    unregistered by a weakref finalizer when it is freed (torch keeps one Python object per live
    storage, so the finalizer fires exactly when the memory is released). Views share their base's
    storage and are counted once. Tensors alive before tracking began (parameters, buffers, grads,
    optimizer state) are registered on entry.

    The peak breakdown is classified lazily: when the total reaches a new maximum a flag is set,
    and the live set is classified just before the next free (so exactly the set that made the
    peak), or at `result()`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, list] = {}      # id(storage) -> [nbytes, weakref, n saved for backward]
        self.total = 0
        self.peak = 0
        self.breakdown = dict.fromkeys(CATEGORIES, 0)
        self.windowed = False
        self._pending = False                # a new peak was reached and not yet classified
        self._hooks = None

    # -- registration -----------------------------------------------------------------------
    def track(self, t: torch.Tensor) -> int | None:
        st = _storage(t)
        if st is None:
            return None
        key = id(st)
        entry = self.live.get(key)
        nbytes = st.nbytes()
        if entry is None:
            self.live[key] = [nbytes, weakref.ref(st, self._finalizer(key)), 0]
            self._grow(nbytes)
        elif entry[0] != nbytes:             # resized in place (resize_, out= ops)
            if nbytes < entry[0]:
                self._before_free()
            self._grow(nbytes - entry[0])
            entry[0] = nbytes
        return key

    def _finalizer(self, key: int):
        def on_free(_ref, key=key):
            if key in self.live:
                self._before_free()          # classify the peak while this storage still counts
                self.total -= self.live.pop(key)[0]
        return on_free

    def _grow(self, nbytes: int) -> None:
        self.total += nbytes
        if self.windowed and self.total > self.peak:
            self.peak = self.total
            self._pending = True

    def _before_free(self) -> None:
        if self._pending:
            self._pending = False
            self.breakdown = self.classify()

    def track_state(self) -> None:
        """Register what exists outside any op: params, buffers, grads, optimizer state."""
        for t in self._param_tensors():
            self.track(t)
        for t in self._grad_tensors():
            self.track(t)
        for t in self._optimizer_tensors():
            self.track(t)

    # -- classification ---------------------------------------------------------------------
    def _param_tensors(self) -> list[torch.Tensor]:
        params = list(self.model.parameters())
        out = [*params, *self.model.buffers()]
        seen: set = set()
        for p in params:
            # bitsandbytes' Params4bit: the weight's data alone cannot be dequantised without these
            quant_state = getattr(p, "quant_state", None)
            if quant_state is not None:
                _walk_tensors(quant_state, out, seen)
        return out

    def _grad_tensors(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters() if p.grad is not None]

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        if self.optimizer is not None:
            seen: set = set()
            _walk_tensors(self.optimizer.state, out, seen)
            # state kept on the optimizer object itself: OASIS trackers' bases, inner optimizers
            _walk_tensors({k: v for k, v in vars(self.optimizer).items() if k != "param_groups"}, out, seen)
        return out

    def classify(self) -> dict[str, int]:
        """Bytes per category of the storages alive now."""
        live = dict(self.live)               # a snapshot: a finalizer may run while we walk objects
        owner: dict[int, str] = {}
        for category, tensors in (("params", self._param_tensors()), ("grads", self._grad_tensors()),
                                  ("optimizer", self._optimizer_tensors())):
            for t in tensors:
                st = _storage(t)
                if st is not None:
                    owner.setdefault(id(st), category)
        out = dict.fromkeys(CATEGORIES, 0)
        for key, (nbytes, _ref, saved) in live.items():
            category = owner.get(key) or ("activations" if saved else "other")
            out[category] += nbytes
        return out

    def _pack(self, t: torch.Tensor):
        """saved_tensors_hooks pack: count the storage as saved while autograd holds it."""
        key = self.track(t)
        holder = _Saved(t)
        if key is not None:
            self.live[key][2] += 1
            weakref.finalize(holder, self._unsave, key)
        return holder

    def _unsave(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[2] -= 1

    # -- window and mode --------------------------------------------------------------------
    def start_window(self) -> None:
        self.windowed = True
        self.peak = self.total
        self._pending = True

    def result_breakdown(self) -> dict[str, int]:
        if self._pending:
            self._pending = False
            self.breakdown = self.classify()
        return dict(self.breakdown)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return _scalar(func, args)
        # inputs too: a tensor made before tracking began (a batch, a cached mask) is live memory
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(_storage(t)) not in self.live:
                self.track(t)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def __enter__(self):
        self.track_state()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _Saved.unpack)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._hooks.__exit__(*exc)
        return out


def local_tensor(t):
    """The local tensor of a DTensor (what this rank stores), else `t`."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


class DistributedTracker(TensorTracker):
    """`TensorTracker` for one rank of a DDP or FSDP2 run.

    DTensors (FSDP2's shards, their gradients and optimizer state) count as their local tensors, and ops on
    them are left to DTensor, which runs them as local ops this tracker then sees (as torch's
    FSDPMemTracker does). `UntypedStorage.resize_` (FSDP2 frees and re-allocates gathered weights with it;
    the dispatcher never sees it) updates the tracked size. With `shards` (fsdp) "params" are the rank's
    shards and the buffers; DDP's buckets are gradient copies, "grads"."""

    def __init__(self, model, optimizer, shards: list | None, fake: bool):
        super().__init__(model, optimizer)
        self.shards, self.fake = shards, fake
        self.buckets: dict[int, weakref.ref] = {}

    def track(self, t):
        return super().track(local_tensor(t))

    def add_bucket(self, tensor) -> None:
        st = tensor.untyped_storage()
        self.buckets[id(st)] = weakref.ref(st)

    def bucket_bytes(self) -> int:
        return sum(st.nbytes() for st in (ref() for ref in self.buckets.values()) if st is not None)

    def _param_tensors(self):
        if self.shards is None:
            return [local_tensor(t) for t in super()._param_tensors()]
        return [*(local_tensor(p) for p in self.shards), *self.model.buffers()]

    def _grad_tensors(self):
        params = self.shards if self.shards is not None else self.model.parameters()
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        if self.shards is not None:  # a layer's full gradients until its reduce-scatter
            grads += [local_tensor(p.grad) for p in self.model.parameters() if p.grad is not None]
        return grads

    def _optimizer_tensors(self):
        return [local_tensor(t) for t in super()._optimizer_tensors()]

    def classify(self):
        out = super().classify()
        claimed = {id(st) for t in (*self._param_tensors(), *self._grad_tensors(), *self._optimizer_tensors())
                   if (st := _storage(t)) is not None}
        for key, ref in list(self.buckets.items()):
            entry = self.live.get(key)
            if ref() is None or entry is None or key in claimed:
                continue
            out["activations" if entry[2] else "other"] -= entry[0]
            out["grads"] += entry[0]
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs it as local ops, which come back here
        if self.fake and func is torch.ops._c10d_functional.wait_tensor.default:
            return args[0]  # eager returns its input; the fake kernel would make a new tensor
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _resized(self, storage) -> None:
        entry = self.live.get(id(storage))
        if entry is not None and entry[0] != storage.nbytes():
            if storage.nbytes() < entry[0]:
                self._before_free()
            self._grow(storage.nbytes() - entry[0])
            entry[0] = storage.nbytes()

    def __enter__(self):
        tracker = self

        def resize_(storage, size):
            out = original(storage, size)
            tracker._resized(storage)
            return out

        self._resize = patched(torch.UntypedStorage, "resize_", resize_,
                               why="FSDP2 frees gathered weights with UntypedStorage.resize_, which the "
                                   "dispatcher does not see")
        original = self._resize.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._resize.__exit__(*exc)
        return out
