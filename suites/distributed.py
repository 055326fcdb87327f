"""Data-parallel runs on PyTorch's own engines: `suites.run --nproc N` starts each run under torchrun
(`torch.distributed.run --standalone`), whose N processes each run `suites.worker` on the same spec; this
module is what a run does differently when it is one of N ranks (gloo on CPU, NCCL on CUDA).

Semantics (the same global batch as the single-process run, so the two are comparable):
  - `batch` is the global micro-batch: rank k trains on rows [k·B/N, (k+1)·B/N) of every micro-batch of the
    one seeded order (`shard`), so N ranks see exactly the single process's tokens.
  - The model is wrapped in `DistributedDataParallel`, which averages gradients over ranks. Each rank weights
    its micro-batch loss by its share of the *global* step's supervised tokens, times N (`loss_weights`), so
    the averaged gradient equals the single process's token-weighted gradient of the whole step.
  - Gradient accumulation: the step's earlier micro-batches run under `no_sync()`; one all-reduce per step.
  - Optimizers that track a basis from activations (OASIS, periodic PCA: `optimizer.stats_reduce`) sum their
    statistics over ranks before every basis update, so every rank holds the same basis at every step.
  - LDAdam keeps its error buffer in `p.grad`, so DDP averages gradient + buffer; the buffer is computed from
    the averaged gradient and is identical on every rank, so the average is the buffer plus the averaged
    gradient (tests/test_distributed.py checks the buffers are bitwise equal across ranks).
  - Optimizers that step inside backward (`steps_in_backward`: layer-wise updates, OASIS's in-backward
    embedding update) would update before DDP has averaged: refused in one line.
  - Rank 0 evaluates and writes the record; the record's peak memory is the maximum over ranks and `comm`
    holds the bytes all-reduced per optimizer step, counted on the tensors handed to the collectives.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

# evaluation on rank 0 can take long (a whole test set, generation); the others wait at a barrier
TIMEOUT = datetime.timedelta(hours=4)


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (torchrun's RANK; a single process is its own rank 0), before the group exists and after."""
    return int(os.environ.get("RANK", "0")) == 0


def init(cfg: dict) -> None:
    """Join the process group torchrun set up (its environment variables); gloo on CPU, NCCL on CUDA.
    On CUDA each rank makes the GPU of its local rank the current one, so "cuda" means it (the config keeps
    "cuda": it is the planned config, whose hash names the record)."""
    expected = cfg["world_size"]
    got = int(os.environ.get("WORLD_SIZE", "1"))
    if got != expected:
        raise ValueError(f"world_size={expected} but this process was started as one of {got} "
                         "(launch with python -m suites.run --nproc N)")
    if dist.is_initialized():
        return
    if cfg["device"].startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: dict, k: int, n: int) -> dict:
    """Rank k's rows of a global micro-batch (B/N rows; the batch size is checked to divide)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % n:
        raise ValueError(f"a micro-batch of {rows} rows cannot be split over {n} ranks")
    part = rows // n
    return {key: v[k * part:(k + 1) * part] for key, v in batch.items()}


def sum_over_ranks(values: list[float]) -> list[float]:
    """The sums over ranks of a few numbers (float64, one all-reduce)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CommCounter:
    """Bytes handed to all-reduce per optimizer step, counted where they are sent: DDP's gradient buckets
    (a comm hook around PyTorch's own `allreduce_hook`) and the basis statistics (around the optimizer's
    `stats_reduce`). `end_step()` closes a step; `result()` is the record's `comm`."""

    def __init__(self):
        self.grad_bytes = 0
        self.stats_bytes = 0
        self.grad_tensors: list[list[tuple[int, ...]]] = []  # shapes in each bucket, first step only
        self.steps: list[tuple[int, int]] = []
        self.bucket_bytes = 0  # size of DDP's bucket buffers (kept alive by its reducer), first step

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        self.grad_bytes += nbytes
        if not self.steps:
            self.bucket_bytes += nbytes
            self.grad_tensors.append([tuple(p.shape) for p in bucket.parameters()])
        return default_hooks.allreduce_hook(state, bucket)

    def counting(self, reduce):
        def counted(tensors):
            self.stats_bytes += sum(t.numel() * t.element_size() for t in tensors)
            return reduce(tensors)

        return counted

    def end_step(self) -> None:
        self.steps.append((self.grad_bytes, self.stats_bytes))
        self.grad_bytes = self.stats_bytes = 0

    def result(self, backend: str) -> dict:
        grads = [g for g, _ in self.steps]
        stats = [s for _, s in self.steps]
        totals = [g + s for g, s in self.steps]
        n = max(1, len(self.steps))
        return {
            "world_size": world(), "strategy": "ddp", "backend": backend,
            # mean over the run's optimizer steps (bases that refresh periodically send statistics only then)
            "allreduce_bytes_per_step": sum(totals) / n,
            "allreduce_bytes_max_step": max(totals, default=0),
            "grad_allreduce_bytes_per_step": sum(grads) / n,
            "stats_allreduce_bytes_per_step": sum(stats) / n,
            "ddp_bucket_bytes": self.bucket_bytes,
            "steps_counted": len(self.steps),
        }


class DataParallel:
    """What a run holds when it is one of N ranks: the DDP-wrapped model and the byte counter."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: str):
        if getattr(optimizer, "steps_in_backward", False):
            raise ValueError("this method updates parameters inside backward, before DDP has averaged "
                             "their gradients: it cannot run with --nproc > 1")
        self.counter = CommCounter()
        if hasattr(optimizer, "stats_reduce"):
            from oasis import all_reduce_sum

            optimizer.stats_reduce = self.counter.counting(all_reduce_sum())
        device_ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
        self.model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        self.model.register_comm_hook(None, self.counter.hook)
        self.backend = dist.get_backend()

    def no_sync(self, last: bool):
        """Context of one micro-batch's backward: gradients are all-reduced only after the last one."""
        return nullcontext() if last else self.model.no_sync()
