"""OASIS and AdamW under FSDP2 (`fully_shard`; gloo, 2 CPU processes, float64).

FSDP2 shards every parameter by rows (Shard(0)): the weights, and the compressed layers' gradient carriers
whose gradient is Ĝ = G U (d_out × r). OasisAdamW then keeps each rank's rows of the moments
((d_out / 2) × r local shards) and updates its rows of W with (rows of Δ) Uᵀ; the bases stay plain tensors,
bitwise identical on both ranks through `stats_reduce`. FSDP reduce-scatters the d_out × r gradients (plus
the uncompressed parameters' gradients), never a d_out × d_in one. Each run is compared with one process on
the concatenated batch (the expected values), for torch.optim.AdamW and for OASIS.

The model is a one-block Llama-shaped LM in plain torch (q/k/v and gate/up share their input, embedding,
norms and lm_head stay uncompressed); the MLP's hidden size is odd, so gate/up are sharded unevenly
(13 + 12 rows).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_lm import TinyLM

from oasis import CompressedLinear, OasisConfig, all_reduce_sum, prepare

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, STEPS, BATCH, SEQ, RANK, WORLD = 64, 5, 2, 12, 4, 2
CFG = OasisConfig(rank=RANK, subspace_lr=0.5, init="pca")  # the default targets: the seven projections
HP = dict(lr=1e-2, weight_decay=0.01)


def _model():
    torch.manual_seed(0)
    return TinyLM(VOCAB, hidden=25).double()


def _batches():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (BATCH * WORLD, SEQ), generator=gen) for _ in range(STEPS)]


def _weights(model):
    """Full (gathered) tensors of every parameter but the gradient carriers."""
    full = {}
    for n, p in model.named_parameters():
        if not n.endswith(".grad_carrier"):
            full[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return full


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    # one FSDP group per compressed layer (as one per block in a real model), then the root
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            fully_shard(m)
    fully_shard(model)


def _train(model, opt, rank, on_backward=None):
    losses = []
    for ids in _batches():
        loss = model(ids[rank * BATCH:(rank + 1) * BATCH])
        loss.backward()
        if on_backward is not None:
            on_backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _padded(p):
    """Elements of a parameter as FSDP2 reduce-scatters its gradient: rows padded to a multiple of WORLD."""
    return -(-p.shape[0] // WORLD) * WORLD * p[0].numel()


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        # AdamW, built after fully_shard as FSDP2 requires
        model = _model()
        _shard(model)
        out["adam"] = {"losses": _train(model, torch.optim.AdamW(model.parameters(), **HP), rank),
                       "weights": _weights(model)}

        # OASIS: compress, fully_shard, then the optimizer (prepare's `shard` does the three in order)
        model = _model()
        opt = prepare(model, CFG, shard=_shard, stats_reduce=all_reduce_sum(), **HP)
        layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
        scattered: list[int] = []  # elements FSDP reduce-scatters, per call (its input: all ranks' rows)
        reduce_scatter = dist.reduce_scatter_single

        def counting(*args, **kwargs):
            scattered.append(kwargs.get("input", args[1] if len(args) > 1 else None).numel())
            return reduce_scatter(*args, **kwargs)

        grads: list[dict] = []

        def record_grads():
            grads.append({"weights": [(m.weight.requires_grad, m.weight.grad) for m in layers],
                          "shapes": [tuple(p.grad.shape) for p in model.parameters() if p.grad is not None]})

        dist.reduce_scatter_single = counting
        try:
            losses = _train(model, opt, rank, on_backward=record_grads)
        finally:
            dist.reduce_scatter_single = reduce_scatter
        moments = {}
        for m in layers:
            state = opt.state[m.grad_carrier]
            moments[tuple(m.weight.shape)] = [(type(state[k]).__name__, tuple(state[k].shape),
                                               tuple(state[k].to_local().shape))
                                              for k in ("exp_avg", "exp_avg_sq")]
        out["oasis"] = {
            "losses": losses, "weights": _weights(model), "bases": [t.basis for t in opt.trackers],
            "scattered": scattered, "grads": grads, "moments": moments,
            "local_rows": {tuple(m.weight.shape): m.grad_carrier.to_local().shape[0] for m in layers},
            "trainable": sum(_padded(p) for p in model.parameters() if p.requires_grad)}

        # an optimizer built before fully_shard holds stale Parameters: it says so instead of training nothing
        model = _model()
        stale = prepare(model, CFG, **HP)
        _shard(model)
        try:
            stale.step()
            out["stale"] = None
        except RuntimeError as err:
            out["stale"] = str(err)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single(kind):
    """The expected run: one process, the whole batch of both ranks."""
    model = _model()
    if kind == "adam":
        opt = torch.optim.AdamW(model.parameters(), **HP)
    else:
        opt = prepare(model, CFG, **HP)
    losses = []
    for ids in _batches():
        loss = model(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, opt, losses


def _losses(run):
    return torch.tensor(run["losses"], dtype=torch.float64)


def test_fsdp2_shards_oasis_rows_and_equals_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # AdamW: float64 throughout, FSDP's reduce-scatter only reorders sums
    single, _, losses = _single("adam")
    for name, w in _weights(single).items():
        torch.testing.assert_close(ranks[0]["adam"]["weights"][name], w, rtol=0, atol=1e-12, msg=name)
    mean = (_losses(ranks[0]["adam"]) + _losses(ranks[1]["adam"])) / 2
    torch.testing.assert_close(mean, torch.tensor(losses, dtype=torch.float64), rtol=1e-12, atol=0)

    single, opt, losses = _single("oasis")
    oasis = [r["oasis"] for r in ranks]
    # bitwise identical bases on both ranks; the single process's within float32 (summation order differs)
    for a, b, c in zip(oasis[0]["bases"], oasis[1]["bases"], [t.basis for t in opt.trackers], strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)
    # float32 bases and statistics: ~1e-7 apart after 5 steps of lr 1e-2 (weights move by ~5e-2)
    initial = _weights(_model())
    for name, w in _weights(single).items():
        assert torch.equal(oasis[0]["weights"][name], oasis[1]["weights"][name]), name
        torch.testing.assert_close(oasis[0]["weights"][name], w, rtol=0, atol=1e-6, msg=name)
        assert (w - initial[name]).abs().max() > 1e-3, name  # it trained
    mean = (_losses(oasis[0]) + _losses(oasis[1])) / 2
    torch.testing.assert_close(mean, torch.tensor(losses, dtype=torch.float64), rtol=1e-6, atol=0)

    # each rank holds its rows of the moments: DTensors of global shape d_out × r, local (d_out / 2) × r
    for rank, o in enumerate(oasis):
        assert o["moments"], "no OASIS moments"
        for (d_out, _), states in o["moments"].items():
            rows = (d_out + 1) // 2 if rank == 0 else d_out // 2  # torch.chunk's split (25 = 13 + 12)
            assert o["local_rows"][(d_out, _)] == rows
            assert states == [("DTensor", (d_out, RANK), (rows, RANK))] * 2, states

    # no d_out × d_in gradient: the weights take none, and FSDP reduce-scatters exactly the trainable
    # parameters' gradients (the d_out × r carriers and the uncompressed parameters) at every step
    full = {tuple(m.weight.shape) for m in single.modules() if isinstance(m, CompressedLinear)}
    for o in oasis:
        assert len(o["grads"]) == STEPS
        for g in o["grads"]:
            assert g["weights"] == [(False, None)] * len(g["weights"])
            assert not set(g["shapes"]) & full, g["shapes"]
        assert sum(o["scattered"]) == STEPS * o["trainable"]
    assert all(r["stale"] is not None and "after fully_shard" in r["stale"] for r in ranks)
