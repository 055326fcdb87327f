"""Counting what a training step dispatches: compute ops, host synchronisations and linalg calls, per phase.

    counter = DispatchCounter()
    with counter:                        # inside FakeTensorMode (estimates) or on real tensors
        with counter.phase("forward"):
            loss = model(**batch).loss
        with counter.phase("backward"):
            loss.backward()
    counter.counts["forward"].ops        # compute ops dispatched in the forward
    counter.counts["backward"].syncs     # Counter: sync-class op name -> calls

    with NoHostSync():                   # raises HostSyncError at the first sync-class op
        optimizer.step()

A dispatch mode sees each ATen (or custom, e.g. bitsandbytes) op once, after autograd and after
CompositeImplicitAutograd decompositions, i.e. the ops a backend runs: on CUDA roughly one kernel launch
each. Counted as compute: every op except views (`OpOverload.is_view`: no data is touched) and the
allocation-only factories of `ALLOCATION_OPS` (no kernel). `_local_scalar_dense` is a read, not compute.

Host synchronisations (`is_sync`; the ops that make the host wait for the device on CUDA, decided from
PyTorch's ATen sources, BatchLinearAlgebra.cpp and TensorConversions):
  * `aten._local_scalar_dense`: `.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`;
  * ops tagged `data_dependent_output` (`is_nonzero`, `equal`, ...) or `dynamic_output_shape` (`nonzero`,
    `masked_select`, `unique`, boolean-mask indexing, `repeat_interleave` without output_size): the output
    or its size is a device value the host must read;
  * `aten._linalg_check_errors`: the info check of the non-`_ex` linalg functions (`linalg.cholesky`,
    `linalg.inv`, `linalg.solve`, `linalg.lu_factor`, ... and `*_ex(check_errors=True)`) reads `info`;
  * `aten._linalg_eigh` and `aten._linalg_svd`: their kernels end in that same info check (eigh, eigvalsh,
    svd, svdvals, torch.svd, `matrix_norm(ord=2)`), so they sync on CUDA although the check is not
    dispatched separately; `linalg_eig` / `_linalg_eigvals` run on the host via MAGMA. `linalg_qr` (geqrf +
    orgqr, no info check) and `linalg_cholesky_ex` / `linalg_inv_ex` / `linalg_solve_ex` without
    check_errors do not sync;
  * a tensor built from Python data on the device (`torch.tensor(data, device=...)`) and `Tensor.to(device)`
    of a host tensor: a copy from pageable host memory, which waits for the stream;
  * `.tolist()`, `.numpy()` of a device tensor (seen at the Python level, not dispatched).
Not seen: `torch.cuda.synchronize()` and other host-side `torch.cuda` calls.

Which tensors are on the device. On a GPU everything is; the counter's default (`roots=None`) treats every
tensor as a device tensor, which is right for real CUDA tensors and strict anywhere else. Counting a CUDA
step on the CPU (FakeTensorMode, where every tensor lives on the CPU device) needs to know what a CUDA run
would keep on the GPU: with `roots` given (the model, the optimizer, the batch), a tensor is a device tensor
when it is one of the roots' tensors (parameters, buffers, gradients, the batch; optimizer state of one
dimension or more), or computed by an op with a device tensor among its inputs, or made by a factory
(`torch.zeros`, `torch.tensor`, ...) or `Tensor.to` called with an explicit device (code that says
`device=p.device` means the GPU in a CUDA run). What remains are host tensors: 0-dim Python scalars turned
into tensors without a device (torch's AdamW keeps its `step` counters so), whose `.item()` is no sync.
The sync-class ops above count only with a device tensor among their inputs; `torch.tensor(data,
device=...)` and `Tensor.to(device)` of a host tensor count as a host-to-device copy, `.cpu()` /
`.to("cpu")` / `.tolist()` / `.numpy()` of a device tensor as a device-to-host copy.

Linalg calls (`is_linalg`): ops named `linalg_*`, `_linalg_*` (the check included), `geqrf`, `orgqr`,
`ormqr`, `cholesky*`, `triangular_solve`, `lu_*`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
# ops that make the host wait for the device on CUDA (module docstring); tags and device changes add more
SYNC_OPS = frozenset({
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten._linalg_check_errors.default,
    aten._linalg_eigh.default,
    aten._linalg_svd.default,
    aten.linalg_eig.default,
    aten._linalg_eigvals.default,
})
SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
ALLOCATION_OPS = frozenset({aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                            aten.new_empty.default, aten.new_empty_strided.default})
LINALG_PREFIXES = ("linalg_", "_linalg_", "geqrf", "orgqr", "ormqr", "cholesky", "triangular_solve", "lu_",
                   "_lu_")


class HostSyncError(RuntimeError):
    """A sync-class op ran under `NoHostSync`."""


def op_name(func) -> str:
    """`aten.mm.default` -> "aten.mm"; the overload is dropped (counts are per op)."""
    return f"{func.namespace}.{func._opname}"


def is_sync_op(func) -> bool:
    """Whether `func` makes the host wait when a device tensor is among its inputs (module docstring)."""
    return func in SYNC_OPS or any(tag in SYNC_TAGS for tag in func.tags)


def is_linalg(func) -> bool:
    return func.namespace == "aten" and func._opname.startswith(LINALG_PREFIXES)


def is_compute(func) -> bool:
    """Not a view, an allocation without a kernel, a scalar read or a metadata query (`prim.device`...)."""
    return (func.namespace != "prim" and not func.is_view and func not in ALLOCATION_OPS
            and func is not aten._local_scalar_dense.default)


@dataclass
class PhaseCounts:
    ops: int = 0
    syncs: Counter = field(default_factory=Counter)    # op name -> calls
    linalg: Counter = field(default_factory=Counter)   # op name -> calls
    by_op: Counter = field(default_factory=Counter)    # every compute op name -> calls

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    @property
    def linalg_count(self) -> int:
        return sum(self.linalg.values())

    def add(self, other: PhaseCounts) -> None:
        self.ops += other.ops
        self.syncs.update(other.syncs)
        self.linalg.update(other.linalg)
        self.by_op.update(other.by_op)

    def as_dict(self) -> dict:
        return {"ops": self.ops, "syncs": self.sync_count, "sync_ops": dict(sorted(self.syncs.items())),
                "linalg": self.linalg_count, "linalg_ops": dict(sorted(self.linalg.items()))}


def _placeholder(t: torch.Tensor):
    """What a scalar read returns where there is no value (fake tensors): 1, 1.0 or True by dtype, as the
    memory meters answer (`suites.measure.meters`); nothing measured here depends on it."""
    return True if t.dtype is torch.bool else (1.0 if t.dtype.is_floating_point else 1)


def _tensors(tree) -> list:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


_FACTORIES = {getattr(torch, name) for name in (
    "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones",
    "rand", "randint", "randn", "randperm", "range", "scalar_tensor", "tensor", "zeros", "zeros_like",
    "ones_like", "empty_like", "full_like", "rand_like", "randn_like")}
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_TENSOR_TO = {torch.Tensor.to, torch.Tensor.cuda}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy}


def _device_arg(func, args, kwargs):
    """The device a factory or `Tensor.to` was given explicitly, else None."""
    if "device" in kwargs:
        return kwargs["device"]
    if func is torch.Tensor.cuda:
        return "cuda"
    if func is torch.Tensor.to:
        for a in args[1:2]:
            if isinstance(a, (torch.device, str)):
                return a
            if isinstance(a, torch.Tensor):
                return a.device
    return None


class _DeviceIntent(TorchFunctionMode):
    """The Python-level half of `DispatchCounter`: sees factory calls, `Tensor.to` and host reads with the
    arguments the code wrote, which the dispatcher no longer shows (module docstring)."""

    def __init__(self, counter: DispatchCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.counter
        if func in _TO_HOST and args and c.on_device(args[0]):
            c.sync(f"{func.__name__} (device to host)", func)
        elif func in _FACTORIES or func in _TENSOR_TO:
            device = _device_arg(func, args, kwargs)
            if device is not None:
                to_host = str(device) == "cpu" and isinstance(device, str)
                source = args[0] if func in _TENSOR_TO else None
                out = func(*args, **kwargs)
                if func in _TENSOR_TO and to_host and c.on_device(source):
                    c.sync(f"Tensor.{func.__name__}('cpu') (device to host)", func)
                elif (not to_host and out.numel() > 0  # an empty tensor copies nothing
                      and (func in _FROM_DATA or (func in _TENSOR_TO and not c.on_device(source)))):
                    c.sync(f"{'torch' if func in _FROM_DATA else 'Tensor'}.{func.__name__}(device=...) "
                           "(host to device)", func)
                if not to_host:
                    c.mark(out)
                return out
        return func(*args, **kwargs)


class DispatchCounter(TorchDispatchMode):
    """Counts compute ops, host synchronisations and linalg calls into the current phase (`phase(name)`;
    ops outside any phase go to "other"). `roots=None`: every tensor is a device tensor; else the objects
    (modules, optimizers, tensors, dicts of tensors) whose tensors a CUDA run keeps on the GPU, and device
    provenance decides the rest (module docstring). `raise_on_sync=True` raises `HostSyncError` at the first
    sync (`NoHostSync`). `counting=False` tracks provenance only (build and warm-up)."""

    def __init__(self, roots=None, raise_on_sync: bool = False):
        super().__init__()
        self.counts: dict[str, PhaseCounts] = {}
        self.current = "other"
        self.raise_on_sync = raise_on_sync
        self.counting = True
        self.every_tensor_on_device = roots is None
        self._device: dict[int, weakref.ref] = {}  # id -> weakref (tensors compare elementwise)
        self._intent = _DeviceIntent(self)
        if roots is not None:
            self.add_roots(roots)

    # -- device provenance --
    def add_roots(self, roots) -> None:
        """Mark the tensors of `roots` as device tensors (module docstring)."""
        from suites.measure.trackers import _walk_tensors

        for root in roots if isinstance(roots, (list, tuple)) else [roots]:
            if isinstance(root, nn.Module):
                self.mark([*root.parameters(), *root.buffers(),
                           *(p.grad for p in root.parameters() if p.grad is not None)])
            elif isinstance(root, torch.optim.Optimizer):
                found: list = []
                others = {k: v for k, v in vars(root).items() if k != "state"}
                _walk_tensors([root.state, others], found, set())
                self.mark([t for t in found if t.dim() > 0])
            else:
                found = []
                _walk_tensors(root, found, set())
                self.mark(found)

    def mark(self, tree) -> None:
        for t in _tensors(tree):
            key = id(t)
            if key not in self._device:
                self._device[key] = weakref.ref(t, lambda _ref, key=key: self._device.pop(key, None))

    def on_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        ref = self._device.get(id(t))
        return self.every_tensor_on_device or (ref is not None and ref() is t)

    # -- counting --
    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.current = self.current, name
        self.counts.setdefault(name, PhaseCounts())
        try:
            yield self.counts[name]
        finally:
            self.current = previous

    def sync(self, name: str, func) -> None:
        if not self.counting:
            return
        self.counts.setdefault(self.current, PhaseCounts()).syncs[name] += 1
        if self.raise_on_sync:
            raise HostSyncError(f"host synchronisation in phase {self.current!r}: {name} ({func}); "
                                "see suites.measure.dispatch for what counts as one")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        from_device = any(self.on_device(t) for t in inputs)
        if is_sync_op(func) and from_device:
            self.sync(op_name(func), func)  # before running it: under fake tensors it may not run at all
        if func is aten._local_scalar_dense.default:
            try:
                out = func(*args, **kwargs)
            except RuntimeError:  # fake tensors have no value (DataDependentOutputException)
                if not isinstance(args[0], FakeTensor):
                    raise
                out = _placeholder(args[0])
        else:
            out = func(*args, **kwargs)
        if from_device and not self.every_tensor_on_device:
            self.mark(out)
        if self.counting:
            counts = self.counts.setdefault(self.current, PhaseCounts())
            if is_compute(func):
                counts.ops += 1
                counts.by_op[op_name(func)] += 1
            if is_linalg(func):
                counts.linalg[op_name(func)] += 1
        return out

    def __enter__(self):
        self._intent.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._intent.__exit__(*exc)
        return out

    def total(self, phases=None) -> PhaseCounts:
        out = PhaseCounts()
        for name, c in self.counts.items():
            if phases is None or name in phases:
                out.add(c)
        return out


class NoHostSync(DispatchCounter):
    """A dispatch mode that raises `HostSyncError` at the first host synchronisation (`roots` as for
    `DispatchCounter`: None treats every tensor as a device tensor)."""

    def __init__(self, roots=None):
        super().__init__(roots, raise_on_sync=True)
