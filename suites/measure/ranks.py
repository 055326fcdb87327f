"""What a data-parallel memory measurement runs in (`suites.measure.memory`, `--nproc N --strategy ddp|fsdp`):
the process group (PyTorch's fake one for an estimate), DDP with a communication hook that reports its
gradient
buckets to the tracker, and the estimate meter of a model of DTensors. Why each piece is as it is: the
"Distributed" paragraph of `python -m suites.memory --help`."""

from __future__ import annotations

import contextlib

import torch

from suites.measure.meters import EstimateMeter, Meter
from suites.train import distributed

STRATEGIES = ("ddp", "fsdp")


@contextlib.contextmanager
def process_group(world_size: int, fake: bool):
    """The process group of a distributed measurement; yields the 1-D device mesh FSDP2 shards over.

    An estimate initialises PyTorch's fake group (rank 0 of `world_size`; collectives move nothing) and
    destroys it afterwards; a real run (`kind="cpu"`) uses the group its caller initialised."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        if not fake:
            raise ValueError("a real distributed measurement runs inside an initialised process group "
                             "(one process per rank); estimates make their own fake one")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        if dist.get_world_size() != world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, not {world_size}")
        yield distributed.device_mesh("cpu")  # outside FakeTensorMode, as torchtitan builds it
    finally:
        if own:
            dist.destroy_process_group()


def wrap_ddp(net, tracker, world_size: int, fake: bool):
    """`DistributedDataParallel` with its defaults around `net`, its gradient buckets reported to `tracker`.

    The communication hook does what DDP's default one does (divide the bucket by the world size, all-reduce
    it in place) and tells the tracker which storages are buckets. Under the fake group the all-reduce's
    future holds no tensor, so the hook completes with the bucket itself; and the bucket rebuild before the
    second step, which reads bucket indices' values, is skipped (module docstring)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(net, init_sync=not fake)

    def hook(_state, bucket):
        tensor = bucket.buffer()
        tracker.add_bucket(tensor)
        tensor.div_(world_size)
        if fake:
            future = torch.futures.Future()
            future.set_result(tensor)
            return future
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda _fut: tensor)

    ddp.register_comm_hook(None, hook)
    if fake:
        ddp.reducer = _NoRebuild(ddp.reducer)
    return ddp


class _NoRebuild:
    """DDP's reducer as DDP's Python code calls it, except that the one-time bucket rebuild is skipped."""

    def __init__(self, reducer):
        self._reducer = reducer

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


class DistributedEstimateMeter(EstimateMeter):
    """The estimate meter for a model of DTensors (its fake mode is given, not found on the parameters)."""

    def __init__(self, model, optimizer, kernel_policy, fake_mode):
        Meter.__init__(self, model, optimizer, kernel_policy or "cuda-dropout")
        self.fake_mode = fake_mode
