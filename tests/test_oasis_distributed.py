"""OASIS under torch DistributedDataParallel (gloo, 2 CPU processes, float64): DDP all-reduces exactly
the d_out×r low-rank gradients (plus the uncompressed parameters), never a d_out×d_in tensor; with the Oja
statistics and the PCA init's Gram summed across ranks (`stats_reduce`), both ranks hold bitwise identical
bases and the run equals one process on the concatenated batch.

The model is a one-block Llama-shaped LM in plain torch (q/k/v and gate/up share their input, as in Llama;
embedding, norms and lm_head stay uncompressed): each rank then imports torch only, which keeps the test fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_lm import TinyLM

from oasis import CompressedLinear, OasisConfig, all_reduce_sum, prepare

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, STEPS, BATCH, SEQ, RANK = 64, 4, 2, 12, 4
CFG = OasisConfig(rank=RANK, subspace_lr=0.5, init="pca")  # the default targets: the seven projections
HP = dict(lr=1e-2, weight_decay=0.01)


def _model():
    torch.manual_seed(0)
    return TinyLM(VOCAB).double()


def _batches(world: int):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (BATCH * world, SEQ), generator=gen) for _ in range(STEPS)]


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".grad_carrier")}


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model = _model()
        opt = prepare(model, CFG, stats_reduce=all_reduce_sum(), **HP)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        buckets: list[tuple[int, list[tuple[int, ...]]]] = []

        def counting_hook(state, bucket):
            buckets.append((bucket.buffer().numel() * bucket.buffer().element_size(),
                            [tuple(p.shape) for p in bucket.parameters()]))
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        losses = []
        for ids in _batches(world):
            mine = ids[rank * BATCH:(rank + 1) * BATCH]
            loss = ddp(mine)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        torch.save({"weights": _weights(model), "bases": [t.basis for t in opt.trackers], "buckets": buckets,
                    "carriers": [tuple(p.shape) for n, p in model.named_parameters()
                                 if n.endswith(".grad_carrier")],
                    "losses": losses}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_moves_low_rank_bytes_and_equals_one_process_on_the_global_batch(tmp_path):
    world = 2
    mp.start_processes(_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]

    single = _model()
    opt = prepare(single, CFG, **HP)
    losses = []
    for ids in _batches(world):
        loss = single(ids)
        loss.backward()
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()

    # identical bases on every rank, and the single process's bases (float32: summation order differs)
    for a, b, c in zip(ranks[0]["bases"], ranks[1]["bases"], [t.basis for t in opt.trackers], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    # float32 bases and statistics: ~1e-7 apart after 4 steps of lr 1e-2 (weights move by ~4e-2)
    for name, w in _weights(single).items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]) / 2 + torch.tensor(ranks[1]["losses"]) / 2,
                               torch.tensor(losses), rtol=1e-6, atol=0)

    # the bytes DDP all-reduced per step: the d_out×r carriers plus the uncompressed trainable parameters
    carriers = ranks[0]["carriers"]
    plain = sum(p.numel() for n, p in single.named_parameters()
                if p.requires_grad and not n.endswith(".grad_carrier"))
    expected = (sum(a * b for a, b in carriers) + plain) * 8
    buckets = ranks[0]["buckets"]
    assert sum(nbytes for nbytes, _ in buckets) == STEPS * expected
    shapes = {shape for _, params in buckets for shape in params}
    full = {tuple(m.weight.shape) for m in single.modules() if isinstance(m, CompressedLinear)}
    assert not shapes & full, shapes & full  # no d_out × d_in tensor is ever all-reduced
    assert set(carriers) <= shapes
