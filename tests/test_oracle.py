"""The memory meter against measures that know nothing of it: the C allocator's own books (CPU) and the CUDA
caching allocator's statistics (GPU).

The meter (`suites.measure.trackers.TensorTracker`) counts tensor storages at the dispatcher. Every other
memory test
compares it with itself (an estimate against the same tracker on real tensors). Here it meets an oracle:

* CPU: torch allocates CPU tensors with `posix_memalign` (c10 `alloc_cpu`), so their bytes are in glibc's
  books: `mallinfo2()`'s `uordblks` (bytes in heap chunks handed out, all arenas) plus `hblkhd` (bytes in
  mmapped chunks, where large blocks go). Their sum is in-use memory; freed chunks glibc keeps for reuse
  are not in it (the arena size would count them). A dispatch mode placed below the tracker samples it
  after every op, the same points at which the tracker's total can rise, so the maximum of the samples is
  the allocator's peak at the tracker's resolution.
* CUDA: `torch.cuda.max_memory_allocated` and the allocator's `requested_bytes` peak over a whole step.

What the allocator sees and the tracker does not is the honest difference, and it is small: the C++ side
of tensors and of the autograd graph, Python objects larger than 512 bytes (smaller ones live in
pymalloc's mmapped arenas), the tracker's own tables, malloc's chunk headers and alignment, and small
freed chunks parked in glibc's per-thread cache, which glibc still counts as in use. One-time allocations
(imports done lazily by a method, BLAS buffers, caches) are taken out by running the same configuration
once before the measured run. Temporaries that live only inside one kernel are seen by neither (sampling
is per op). The bound is 1 MiB, on steps that move more than 20 MiB, in two regimes of llama-tiny: one
where weights, optimizer state and logits dominate, one where activations do.
"""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from suites.core.registry import MISSION_METHODS, build_method
from suites.measure.memory import make_batch, method_config
from suites.measure.meters import make_meter
from suites.train.models import build_model, llama_config

MIB = 2**20
BOUND = 1 * MIB
RANK = 8


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _glibc_mallinfo2():
    """glibc's mallinfo2 (glibc >= 2.33), or None with the reason it cannot be used."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None, "the C library is not glibc (mallinfo2 is glibc's)"
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    if not hasattr(libc, "mallinfo2"):
        return None, f"glibc {version} has no mallinfo2 (glibc >= 2.33 needed)"
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2, version


def in_use_bytes(mallinfo2) -> int:
    info = mallinfo2()
    return info.uordblks + info.hblkhd


@pytest.fixture(scope="module")
def mallinfo2():
    fn, why = _glibc_mallinfo2()
    if fn is None:
        pytest.skip(why)
    # the oracle's premise, checked: a tensor's bytes appear in, and leave, malloc's in-use count
    size = 8 * MIB
    before = in_use_bytes(fn)
    block = torch.empty(size, dtype=torch.uint8)
    grown = in_use_bytes(fn) - before
    del block
    released = in_use_bytes(fn) - before
    if not (size <= grown <= size + 64 * 1024 and abs(released) <= 64 * 1024):
        pytest.skip(f"torch's CPU tensors are not in glibc's books here (an 8 MiB tensor moved in-use bytes "
                    f"by {grown} and {released} after its release; a preloaded allocator?)")
    return fn


class MallocPeak(TorchDispatchMode):
    """The highest in-use byte count sampled after every op while armed."""

    def __init__(self, mallinfo2):
        super().__init__()
        self.mallinfo2 = mallinfo2
        self.armed = False
        self.peak = 0

    def arm(self) -> int:
        self.peak = in_use_bytes(self.mallinfo2)
        self.armed = True
        return self.peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.armed:
            self.peak = max(self.peak, in_use_bytes(self.mallinfo2))
        return out


# two regimes of llama-tiny: (config overrides, batch, sequence length)
SHAPES = {
    # weights, optimizer state and logits dominate (the 32k-token embedding is tied to lm_head)
    "tiny": ({}, 2, 32),
    # activations dominate: a 512-token vocabulary, 1024 tokens per batch (eager attention keeps its
    # 4 x 256 x 256 probabilities per layer)
    "tiny-long": ({"vocab_size": 512}, 4, 256),
}


def _training_step(method: str, shape: str, device: str = "cpu"):
    """Llama-tiny in fp32, the method as the registry builds it (refresh periods 1, as suites.memory
    measures them, so the step contains a basis refresh), a batch, and one training step."""
    overrides, batch_size, seq = SHAPES[shape]
    model = build_model(llama_config("llama-tiny", **overrides), dtype=torch.float32, device=device)
    model, optimizer = build_method(method, model, method_config(method, RANK, {}))
    batch = {k: v.to(device) for k, v in make_batch(model.config.vocab_size, batch_size, seq).items()}

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, step


def malloc_vs_tracker(method: str, shape: str, mallinfo2) -> dict:
    """Tracker and malloc, one training step after a warm-up step: the peak of all tracked bytes against
    malloc's peak growth since before the model existed, and each one's growth within the step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for measured in (False, True):  # the first run takes the one-time allocations
            gc.collect()
            before_model = in_use_bytes(mallinfo2)
            model, optimizer, step = _training_step(method, shape)
            oracle = MallocPeak(mallinfo2)
            meter = make_meter("cpu", model, optimizer)
            with oracle, meter:  # the tracker on top: the oracle samples right after each op itself
                step()
                meter.start_window()
                tracked_at_start = meter.tracker.total
                malloc_at_start = oracle.arm()
                step()
                oracle.armed = False
            if measured:
                tracked = meter.result()["peak_bytes"]
                return {"tracked": tracked, "malloc": oracle.peak - before_model,
                        "tracked_growth": tracked - tracked_at_start,
                        "malloc_growth": oracle.peak - malloc_at_start}
            del model, optimizer, step, oracle, meter
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", MISSION_METHODS)
def test_tracker_agrees_with_malloc(method, shape, mallinfo2):
    m = malloc_vs_tracker(method, shape, mallinfo2)
    report = (f"{method} on {shape}: peak tracker {m['tracked'] / MIB:.3f} MiB, "
              f"malloc {m['malloc'] / MIB:.3f} MiB; growth in the step tracker "
              f"{m['tracked_growth'] / MIB:.3f}, malloc {m['malloc_growth'] / MIB:.3f}")
    assert m["tracked_growth"] > 20 * MIB, report  # a step that moves tens of MiB: the bound means something
    assert abs(m["malloc"] - m["tracked"]) <= BOUND, report
    assert abs(m["malloc_growth"] - m["tracked_growth"]) <= BOUND, report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", MISSION_METHODS)
def test_tracker_agrees_with_the_cuda_allocator(method, shape):
    """A whole training step on CUDA: the tracker's peak against the caching allocator's own peaks.

    `requested_bytes` are the sizes callers asked for, so they compare byte for byte with storages;
    `max_memory_allocated` counts whole blocks (rounded to 512 bytes, a large block not split when less
    than 1 MiB would remain) and the cuBLAS workspace, so it can only be higher, apart from AdamW's step
    counters, which live on the CPU."""
    device = torch.device("cuda")
    for measured in (False, True):  # the first run creates the cuBLAS workspace and other one-time buffers
        gc.collect()
        torch.cuda.synchronize(device)
        stats = torch.cuda.memory_stats(device)
        requested_before = stats["requested_bytes.all.current"]
        allocated_before = stats["allocated_bytes.all.current"]
        model, optimizer, step = _training_step(method, shape, device="cuda")
        meter = make_meter("cpu", model, optimizer)  # the tracker alone, on CUDA tensors
        with meter:
            step()
            meter.start_window()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            tracked_at_start = meter.tracker.total
            requested_at_start = torch.cuda.memory_stats(device)["requested_bytes.all.current"]
            step()
            torch.cuda.synchronize(device)
        if measured:
            tracked = meter.result()["peak_bytes"]
            requested_peak = torch.cuda.memory_stats(device)["requested_bytes.all.peak"]
            requested = requested_peak - requested_before
            allocated = torch.cuda.max_memory_allocated(device) - allocated_before
            tracked_growth = tracked - tracked_at_start
            requested_growth = requested_peak - requested_at_start
            report = (f"{method} on {shape}: peak since before the model: tracker {tracked / MIB:.3f} MiB, "
                      f"requested {requested / MIB:.3f}, max_memory_allocated {allocated / MIB:.3f}; "
                      f"growth in the step: tracker {tracked_growth / MIB:.3f}, "
                      f"requested {requested_growth / MIB:.3f}")
            assert tracked_growth > 10 * MIB, report  # SDPA on CUDA: no attention probabilities kept
            assert abs(requested - tracked) <= BOUND, report
            assert abs(requested_growth - tracked_growth) <= BOUND, report
            assert allocated >= tracked - BOUND, report
        del model, optimizer, step, meter
