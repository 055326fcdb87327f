"""Data-parallel runs on PyTorch's own engines: `suites.run --nproc N` starts each run under torchrun
(`torch.distributed.run --standalone`), whose N processes each run `suites.worker` on the same spec; this
module is what a run does differently when it is one of N ranks (gloo on CPU, NCCL on CUDA).

Semantics (the same global batch as the single-process run, so the two are comparable):
  - `batch` is the global micro-batch: rank k trains on rows [k·B/N, (k+1)·B/N) of every micro-batch of the
    one seeded order (`shard`), so N ranks see exactly the single process's tokens.
  - The model is wrapped in `DistributedDataParallel` (or built on FSDP2 shards: `ShardedDataParallel`),
    which averages gradients over ranks. Each rank weights its micro-batch loss by its share of the *global*
    step's supervised tokens, times N (`suites.launch.recipe.optimizer_step`), so the averaged gradient equals
    the single process's token-weighted gradient of the whole step.
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
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn

# rank 0 evaluates the model before training (a whole test set, generation) while the others wait in the
# wrapper's first collective
TIMEOUT = datetime.timedelta(hours=4)


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


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- FSDP2


class Unsupported(RuntimeError):
    """A method that cannot run under a distributed strategy (its row says why)."""


def fully_shard_model(net, mesh) -> list:
    """FSDP2 as torchtitan applies it: each decoder layer, then the root. Returns the sharded parameters
    (DTensors; FSDP2 keeps these objects and swaps gathered full ones in and out of the modules).

    FSDP2 wants one dtype among the trainable parameters of each `fully_shard` group; a module whose own
    trainable parameters have another dtype than the rest of its layer (OASIS's float32 gradient carriers in
    a bf16 model: the weight beside it is frozen) becomes a group of its own first."""
    from torch.distributed.fsdp import fully_shard

    for layer in net.get_decoder().layers:
        main = _trainable_dtypes(layer, recurse=True)
        for module in layer.modules():
            own = _trainable_dtypes(module, recurse=False)
            if module is not layer and len(main) > 1 and own and own != {_majority(layer)}:
                fully_shard(module, mesh=mesh)
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return list(net.parameters())


def _trainable_dtypes(module, recurse: bool) -> set:
    return {p.dtype for p in module.parameters(recurse=recurse) if p.requires_grad}


def _majority(module) -> torch.dtype:
    """The dtype holding most trainable elements of `module`."""
    counts: dict = {}
    for p in module.parameters():
        if p.requires_grad:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get)


def build_sharded(method: str, make_net, cfg: dict, mesh, before_shard=None):
    """(model, optimizer, shards) of `method` under FSDP2, the optimizer built over the sharded parameters.

    First the method's builder on the sharded model (a builder that only makes an optimizer: adam, galore,
    ...). If that leaves trainable parameters outside the shards (a builder that replaces modules or adds
    parameters: oasis, lora), a fresh model goes through the builder with `cfg["shard"]`: a callable a
    builder may call as `shard(model)` after changing the model and before building its optimizer (as
    `oasis.prepare(..., shard=...)` does); it calls `before_shard(model)` when given (`suites.measure.memory`
    casts the model to its dtype) and applies `fully_shard`. A builder that does not call it cannot run under
    fsdp (`Unsupported`)."""
    from suites.core.registry import build_method

    net = make_net()
    shards = fully_shard_model(net, mesh)
    net, optimizer = build_method(method, net, cfg)
    try:
        check_sharded(net, shards)
        return net, optimizer, shards
    except Unsupported as exc:
        outside = exc
    hooked: list = []

    def shard(model):
        if before_shard is not None:
            before_shard(model)
        hooked.append(fully_shard_model(model, mesh))

    net, optimizer = build_method(method, make_net(), {**cfg, "shard": shard})
    if not hooked:
        raise Unsupported(f"{outside} and does not call cfg['shard'](model) between changing the model and "
                          "building its optimizer") from None
    shards = hooked[0]
    check_sharded(net, shards)
    return net, optimizer, shards


def check_sharded(net, shards: list) -> None:
    """After the method's builder: every trainable parameter must still be one FSDP2 sharded (a builder
    that replaces modules or adds parameters after sharding leaves them outside FSDP)."""
    ids = {id(p) for p in shards}
    outside = [name for name, p in net.named_parameters() if p.requires_grad and id(p) not in ids]
    if outside:
        raise Unsupported(f"its builder leaves {len(outside)} trainable parameters outside FSDP2's shards "
                          f"(e.g. {outside[0]})")


class CommCounter:
    """Bytes handed to the collectives per optimizer step, counted where they are sent: DDP's gradient
    buckets (a comm hook around PyTorch's own `allreduce_hook`), FSDP2's reduce-scatters and all-gathers
    (its own default collectives, subclassed to count: `counting_fsdp_comms`) and the basis statistics
    (around the optimizer's `stats_reduce`). `end_step()` closes a step; `result()` is the record's `comm`."""

    def __init__(self, strategy: str = "ddp"):
        self.strategy = strategy
        self.grad_bytes = 0
        self.stats_bytes = 0
        self.gather_bytes = 0  # FSDP2: the full parameters all-gathered (forward and backward)
        self.gathered: list[int] = []
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
        self.gathered.append(self.gather_bytes)
        self.grad_bytes = self.stats_bytes = self.gather_bytes = 0

    def result(self, backend: str) -> dict:
        grads = [g for g, _ in self.steps]
        stats = [s for _, s in self.steps]
        totals = [g + s for g, s in self.steps]
        n = max(1, len(self.steps))
        out = {"world_size": world(), "strategy": self.strategy, "backend": backend}
        if self.strategy == "ddp":
            # mean over the run's optimizer steps (bases that refresh periodically send statistics only then)
            out.update({"allreduce_bytes_per_step": sum(totals) / n,
                        "allreduce_bytes_max_step": max(totals, default=0),
                        "grad_allreduce_bytes_per_step": sum(grads) / n,
                        "stats_allreduce_bytes_per_step": sum(stats) / n,
                        "ddp_bucket_bytes": self.bucket_bytes})
        else:  # fsdp: gradients are reduce-scattered, parameters all-gathered; only statistics all-reduced
            out.update({"allreduce_bytes_per_step": sum(stats) / n,
                        "stats_allreduce_bytes_per_step": sum(stats) / n,
                        # what each rank hands in: the full gradients of a layer; what it gets: full weights
                        "grad_reduce_scatter_bytes_per_step": sum(grads) / n,
                        "param_allgather_bytes_per_step": sum(self.gathered) / n})
        out["steps_counted"] = len(self.steps)
        return out


def _join(optimizer: torch.optim.Optimizer, counter: CommCounter, engine: str) -> None:
    """What every data-parallel optimizer needs: no update inside backward (it would come before `engine`
    combines the ranks' gradients), and the statistics of tracked bases summed over ranks, counted."""
    if getattr(optimizer, "steps_in_backward", False):
        raise ValueError(f"this method updates parameters inside backward, before {engine} has combined "
                         "their gradients: it cannot run with --nproc > 1")
    if hasattr(optimizer, "stats_reduce"):
        from oasis import all_reduce_sum

        optimizer.stats_reduce = counter.counting(all_reduce_sum())


class DataParallel:
    """What a run holds when it is one of N ranks: the DDP-wrapped model and the byte counter."""

    shards = None  # the parameters are whole on every rank

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: str):
        self.counter = CommCounter()
        _join(optimizer, self.counter, "DDP")
        device_ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
        self.model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        self.model.register_comm_hook(None, self.counter.hook)
        self.backend = dist.get_backend()

    def no_sync(self, last: bool):
        """Context of one micro-batch's backward: gradients are all-reduced only after the last one."""
        return nullcontext() if last else self.model.no_sync()


def counting_fsdp_comms(counter: CommCounter):
    """FSDP2's own default all-gather and reduce-scatter, counting the bytes they move into `counter`
    (installed with the public `FSDPModule.set_custom_all_gather` / `set_custom_reduce_scatter`)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counter.gather_bytes += output_tensor.numel() * output_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counter.grad_bytes += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


def device_mesh(device: str):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world(),))


class ShardedDataParallel:
    """FSDP2 (`fully_shard`, see `build_sharded`) in place of DDP: the same interface as `DataParallel`
    (model, no_sync, counter, backend), plus the sharded parameters and a full state dict for evaluation.
    FSDP2 averages the reduce-scattered gradients over ranks, as DDP's all-reduce does, so the loss weights
    of `suites.launch.recipe.optimizer_step` hold unchanged."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, shards: list):
        from torch.distributed.fsdp import FSDPModule

        self.model, self.shards = model, shards
        self.counter = CommCounter("fsdp")
        _join(optimizer, self.counter, "FSDP2")
        gather, scatter = counting_fsdp_comms(self.counter)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_custom_all_gather(gather)
                module.set_custom_reduce_scatter(scatter)
        self.backend = dist.get_backend()

    @contextmanager
    def no_sync(self, last: bool):
        """One micro-batch's backward: gradients are reduce-scattered after the last one only."""
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def full_state_dict(self) -> dict:
        """The whole model's state dict on rank 0's CPU (empty elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                          cpu_offload=True))
