"""Peak-memory meters (DESIGN §5): one interface, three sources.

    meter = make_meter(kind, model, optimizer)   # "cuda" | "cpu" | "estimate"
    with meter:
        train_step()             # warm-up step: lazily created optimizer state exists afterwards
        meter.start_window()     # the peak is taken from here on
        for _ in range(k):
            train_step()
    rec = meter.result()         # {"peak_bytes", "source", "reserved_bytes", "breakdown"}

* ``cuda``: ``torch.cuda.reset_peak_memory_stats`` at ``start_window`` then ``max_memory_allocated``
  (and ``max_memory_reserved``). The breakdown comes from the tensor tracker running alongside; the
  allocator's own overhead (block rounding, library workspaces) is counted as "other".
* ``cpu``: bytes of live tensor storages, tracked at the dispatcher (`suites.measure.trackers`).
Deterministic: the same run gives the same bytes, whatever the allocator does.
* ``estimate``: the same tracker under ``FakeTensorMode``: the model and optimizer are made of fake
  tensors (build them inside `fake_construction()`), every op computes shapes only and
  nothing is allocated, so a 7B model is measured on a laptop.

Kernel policy (``kernel_policy``, recorded in every result). CPU and CUDA kernels sometimes keep different
tensors for backward; an estimate runs the CPU kernels (fake tensors live on the CPU device), so it says
which choice it counted:

* ``cpu``: every op as the CPU kernel runs it (the ``cpu`` meter's default; what a real CPU run keeps).
* ``cuda-dropout``: as ``cpu``, except that dropout keeps a 1-byte bool mask for backward, as CUDA's fused
  kernel does (``torch.native_dropout``), where the CPU kernel keeps a noise tensor in the input's dtype
  (2 bytes per element in bf16). The ``estimate`` meter's default, since estimates target GPUs. Other
  CPU/CUDA differences are not modelled (see `suites.memory`).
* ``cuda``: the ``cuda`` meter: the real CUDA kernels.

Breakdown categories (bytes of live storages at the peak; they sum to ``peak_bytes``). Each storage
is counted once, in the first category that claims it:

* ``params``: storages of the model's parameters and buffers (trainable or frozen), and the tensors a
  quantised parameter carries beside its data (bitsandbytes' ``quant_state``: block absmax, nested absmax,
  code tables, offset).
* ``grads``: ``p.grad`` of every parameter (for OASIS / PCA / CompAct compressed layers this includes
  the d_out × r weight gradient, the ``.grad`` of the layer's gradient carrier).
* ``optimizer``: every tensor reachable from ``optimizer.state`` (nested mappings, lists, tuples and plain
  objects such as galore-torch's projector with its ``ortho_matrix``) or from the optimizer object's
  other attributes (OASIS keeps its bases in trackers it holds; a layer-wise optimizer holds inner
  optimizers). Modules are not walked: what they own is "params".
* ``activations``: tensors saved by autograd for backward (seen by a ``saved_tensors_hooks`` pack
  hook) that are not in a category above.
* ``other``: everything else alive at the peak: temporaries of the forward, backward and optimizer
  step, gradients of activations, inputs, logits no longer saved, allocator overhead (cuda).
"""

from __future__ import annotations

import contextlib
import gc
from contextlib import ExitStack

import torch
from torch import nn

from suites.core.patching import patched
from suites.measure.trackers import DistributedTracker, TensorTracker

KINDS = ("cuda", "cpu", "estimate")
KERNEL_POLICIES = ("cpu", "cuda-dropout")  # for the cpu and estimate meters; the cuda meter is "cuda"


class CudaDropout:
    """Kernel policy "cuda-dropout": `F.dropout` (training, 0 < p < 1, not in place) runs as
    `torch.native_dropout`, which keeps a bool mask for backward, as CUDA's fused dropout does. The CPU path
    of `F.dropout` multiplies by a noise tensor of the input's dtype and keeps that instead. Values are
    drawn the same way (Bernoulli(1 - p), scaled by 1 / (1 - p)); only what is stored differs.

    A scoped patch of `torch.nn.functional.dropout` rather than a (thread-local) TorchFunctionMode: the
    forward that activation checkpointing recomputes inside backward must store the same kind of mask as
    the first forward, or torch.utils.checkpoint refuses the recomputed tensors."""

    why = "dropout must keep CUDA's 1-byte mask in forward and in checkpointing's recompute alike"

    def __enter__(self):
        self._patch = patched(torch.nn.functional, "dropout", self._dropout, why=self.why)
        self._original = self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)

    def _dropout(self, input, p=0.5, training=True, inplace=False):
        if training and not inplace and 0 < p < 1:
            return torch.native_dropout(input, p, True)[0]
        return self._original(input, p, training, inplace)


class Meter:
    """Context manager around training steps; see the module docstring for the protocol."""

    source = "cpu-tracked"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, kernel_policy: str = "cpu"):
        if kernel_policy not in KERNEL_POLICIES:
            raise ValueError(f"unknown kernel policy {kernel_policy!r}; "
                             f"choose from {', '.join(KERNEL_POLICIES)}")
        self.model, self.optimizer, self.kernel_policy = model, optimizer, kernel_policy
        self.tracker = TensorTracker(model, optimizer)
        self._stack: ExitStack | None = None
        self._gc_was_enabled = True
        self._windowed = False

    def _enter_modes(self, stack: ExitStack) -> None:
        stack.enter_context(self.tracker)

    def __enter__(self):
        # The garbage collector frees cyclic garbage at allocation-count-dependent moments; pausing
        # it while tracking keeps the byte counts identical from run to run.
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self._stack = ExitStack()
        self._enter_modes(self._stack)
        if self.kernel_policy == "cuda-dropout":
            self._stack.enter_context(CudaDropout())
        return self

    def start_window(self) -> None:
        self._windowed = True
        self.tracker.start_window()

    def __exit__(self, *exc):
        self._stack.close()
        if self._gc_was_enabled:
            gc.enable()
        return False

    def _check(self) -> None:
        if not self._windowed:
            raise RuntimeError("call meter.start_window() after the warm-up step, inside `with meter:`")

    def result(self) -> dict:
        self._check()
        breakdown = self.tracker.result_breakdown()
        return {"peak_bytes": int(self.tracker.peak), "source": self.source, "reserved_bytes": None,
                "breakdown": breakdown, "kernel_policy": self.kernel_policy}


class EstimateMeter(Meter):
    """The tracker inside the model's own FakeTensorMode: shapes are computed, nothing is allocated."""

    source = "estimate"

    def __init__(self, model, optimizer, kernel_policy: str = "cuda-dropout"):
        super().__init__(model, optimizer, kernel_policy)
        fake_modes = {id(m): m for m in (getattr(p, "fake_mode", None) for p in model.parameters()) if m}
        if len(fake_modes) != 1:
            raise ValueError("the estimate meter needs a model made of fake tensors "
                             "(build it and its method inside suites.measure.meters.fake_construction())")
        self.fake_mode = next(iter(fake_modes.values()))

    def _enter_modes(self, stack: ExitStack) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        # fake mode below, tracker on top: the tracker sees each op first and its fake outputs
        if not any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack()):
            stack.enter_context(self.fake_mode)
        stack.enter_context(bitsandbytes_tables(self.fake_mode))
        stack.enter_context(self.tracker)


class CudaMeter(Meter):
    """CUDA allocator peak; the tracker runs alongside to split it into categories."""

    source = "cuda"

    def __init__(self, model, optimizer, device=None):
        super().__init__(model, optimizer)
        self.kernel_policy = "cuda"
        self.device = device if device is not None else next(model.parameters()).device

    def start_window(self) -> None:
        super().start_window()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._retries_before = int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def result(self) -> dict:
        self._check()
        torch.cuda.synchronize(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        breakdown = self.tracker.result_breakdown()
        known = sum(v for k, v in breakdown.items() if k != "other")
        # allocator rounding and library workspaces are real bytes the tracker cannot see: "other"
        breakdown["other"] = max(peak - known, 0)
        return {"peak_bytes": max(peak, known), "source": self.source,
                # the allocator's own peaks over the window (reset at its start)
                "allocated_peak_bytes": peak,
                "active_peak_bytes": int(stats.get("active_bytes.all.peak", 0)),
                "reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                # cudaMalloc retries after freeing the cache: > 0 means the run was at the edge of memory
                "alloc_retries": int(stats.get("num_alloc_retries", 0)) - self._retries_before,
                "breakdown": breakdown, "kernel_policy": self.kernel_policy}


def make_meter(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
               kernel_policy: str | None = None, shards: list | None = None) -> Meter:
    """A meter of `kind` ("cuda" | "cpu" | "estimate") for one model and its optimizer. `kernel_policy`
    (cpu and estimate meters; see the module docstring) defaults to "cpu" for the cpu meter and
    "cuda-dropout" for the estimate. `shards`: the sharded parameters of an FSDP2 model (cpu and cuda
    meters; its tracker then counts this rank's shards, `DistributedTracker`)."""
    meter = _make_meter(kind, model, optimizer, kernel_policy)
    if shards is not None:
        meter.tracker = DistributedTracker(model, optimizer, shards, fake=False)
    return meter


def _make_meter(kind, model, optimizer, kernel_policy) -> Meter:
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("meter kind 'cuda' needs a CUDA device; use 'cpu' or 'estimate'")
        if kernel_policy not in (None, "cuda"):
            raise ValueError(f"the cuda meter runs the CUDA kernels; kernel policy {kernel_policy!r} "
                             "does not apply")
        return CudaMeter(model, optimizer)
    if kind == "cpu":
        return Meter(model, optimizer, kernel_policy or "cpu")
    if kind == "estimate":
        return EstimateMeter(model, optimizer, kernel_policy or "cuda-dropout")
    raise ValueError(f"unknown meter kind {kind!r}; choose from {', '.join(KINDS)}")


@contextlib.contextmanager
def fake_construction():
    """Build models (and wrap them with a method) out of fake tensors, for the "estimate" meter.

        with fake_construction() as fake_mode:
            model = build_model("llama-2-7b", dtype=torch.bfloat16)   # nothing allocated
            model, optimizer = build_method("lora", model, cfg)

    Real model code runs unchanged except for one thing: every Parameter made under FakeTensorMode
    carries a weakref (the mode's memo), and `nn.Module._apply` converts fake parameters with
    `torch.utils.swap_tensors`, which refuses tensors with weakrefs, so `model.to(dtype)` and peft's
    `_move_adapter_to_device_of_base_layer` fail with "_apply(): Couldn't swap Linear.weight".
    While building, `_apply` on fake tensors converts in place instead (`param.data = fn(param)`,
    what torch does for ordinary tensors); a conversion that changes the device is left to torch
    (FakeTensor keeps its device in Python metadata that `.data =` would not update).
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def apply_in_place(module, fn, recurse=True):
        own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        if not own or not all(isinstance(t, FakeTensor) for t in own):
            return original_apply(module, fn, recurse)
        if recurse:
            for child in module.children():
                child._apply(fn)
        with torch.no_grad():
            converted = {id(t): fn(t) for t in own}
        if any(new.device != t.device for t, new in ((t, converted[id(t)]) for t in own)):
            return original_apply(module, fn, recurse=False)
        for param in module._parameters.values():
            if param is not None and converted[id(param)] is not param:
                param.data = converted[id(param)]
                if param.grad is not None:
                    param.grad.data = fn(param.grad)
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = converted[id(buf)]
        return module

    fake_mode = FakeTensorMode()
    why = "fake parameters cannot be swapped by nn.Module._apply (model.to(dtype) would fail)"
    # `original_apply`, which apply_in_place falls back to, is bound by the `with` before any call
    with patched(nn.Module, "_apply", apply_in_place, why=why) as original_apply, fake_mode, \
            bitsandbytes_tables(fake_mode):
        yield fake_mode


@contextlib.contextmanager
def bitsandbytes_tables(fake_mode):
    """Let bitsandbytes run on fake tensors: its quantisation code tables are computed for real.

    bitsandbytes' ops have fake (shape-only) implementations, so its 8-bit optimizers and 4-bit layers run
    under FakeTensorMode, except for one step: `create_dynamic_map` builds the 256-entry code table of
    8-bit block-wise quantisation from computed values (`.tolist()`), which fake tensors do not have. The
    table depends on no input, so here it is computed on real tensors and handed to `fake_mode` as a
    constant (same shape, dtype and bytes). bitsandbytes caches one table per process
    (`functional.name2qmap`); while fake tensors are built that cache is swapped for a private one, so a
    fake table never reaches later real runs and a real one never enters the fake mode.
    """
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:  # not installed: nothing of it can run, so nothing to adapt
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original, cache = bnb_functional.create_dynamic_map, bnb_functional.name2qmap

    def create_dynamic_map(*args, **kwargs):
        with unset_fake_temporarily():
            table = original(*args, **kwargs)
        return fake_mode.from_tensor(table)

    bnb_functional.create_dynamic_map = create_dynamic_map
    bnb_functional.name2qmap = {}
    try:
        yield
    finally:
        bnb_functional.create_dynamic_map, bnb_functional.name2qmap = original, cache
