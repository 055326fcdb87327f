"""Data-parallel training through the harness's own step (`suites.launch.recipe.optimizer_step` with
`suites.train.distributed`): 2 gloo ranks, each on its rows of every micro-batch (`distributed.shard`),
against one
process on the whole batch, for adam, pca, oasis, ldadam and galore, on a tiny transformers Llama in float64,
6 optimizer steps of 2 micro-batches each (gradient accumulation under `no_sync`).

The micro-batches have rows with different numbers of supervised tokens, so the loss weighting (each rank's
share of the global step's tokens, times N) is exercised, not just an even split. Expected values come from
the single process; the byte counts from the model's shapes.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("adam", "pca", "oasis", "ldadam", "galore")
FSDP_METHODS = ("adam", "pca", "oasis")
RUNS = [("ddp", m) for m in METHODS] + [("fsdp", m) for m in FSDP_METHODS]
STEPS, ACCUM, BATCH, SEQ, VOCAB, RANK, HIDDEN, INTER = 6, 2, 4, 10, 48, 4, 64, 96
OVERRIDES = {"pca": {"refresh_every": 2}, "galore": {"update_proj_gap": 2}}  # refreshes inside the run


def _cfg(method: str, world: int, strategy: str = "ddp") -> dict:
    from suites.core.registry import method_defaults

    return {**method_defaults(method), **OVERRIDES.get(method, {}), "lr": 1e-2, "weight_decay": 0.01,
            "betas": method_defaults(method).get("betas", (0.9, 0.999)), "eps": 1e-8, "rank": RANK, "seed": 0,
            "grad_accum": ACCUM, "device": "cpu", "world_size": world, "method": method, "strategy": strategy}


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(config).double()


def _batches() -> list[dict]:
    """STEPS × ACCUM global micro-batches; row i supervises its last SEQ - 1 - i tokens (uneven counts)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS * ACCUM):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
        labels = ids.clone()
        for i in range(BATCH):
            labels[i, :i + 1 + int(torch.randint(0, 3, (), generator=gen))] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # FSDP2: gathered from every rank


def _train(method: str, world: int, strategy: str = "ddp"):
    """Build (recipe.build_parallel_method: alone, DDP or FSDP2) and train through recipe.optimizer_step;
    what the test compares. The tiny Llama stands in for the configured model."""
    from suites.launch import recipe
    from suites.train import distributed

    cfg = _cfg(method, world, strategy)
    if world > 1:  # in a spawned rank process only: FSDP2 may build a second copy of "the" model
        recipe.build_model = lambda cfg, base_dir: _model()
    model, optimizer, dp = recipe.build_parallel_method(cfg, _model(), None)
    batches = _batches()
    if world > 1:
        batches = [distributed.shard(b, distributed.rank(), world) for b in batches]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    session = recipe.Session(cfg, None, None, batches, model, optimizer, scheduler, None, data_parallel=dp)
    first_grads, step = {}, optimizer.step

    def step_and_keep_first_grads(*args, **kwargs):  # the averaged gradients the first update reads
        if not first_grads:
            first_grads.update({n: _full(p.grad).clone() for n, p in model.named_parameters()
                                if p.grad is not None})
        return step(*args, **kwargs)

    optimizer.step = step_and_keep_first_grads
    losses = [recipe.optimizer_step(session, s, recipe.step_batches(session, s)) for s in range(STEPS)]
    weights = {n: _full(p.detach()).clone() for n, p in model.named_parameters()
               if not n.endswith("grad_carrier")}
    trackers = getattr(optimizer, "trackers", [])
    errors = {n: optimizer.state[p]["error"].clone() for n, p in model.named_parameters()
              if "error" in optimizer.state.get(p, {})}
    return {"losses": losses, "weights": weights, "grads": first_grads,
            "bases": [t.basis.clone() for t in trackers],
            "errors": errors, "comm": dp.counter.result(dp.backend) if dp else None,
            "buckets": dp.counter.grad_tensors if dp else None,
            "moments": {n: tuple(_local_shape(optimizer.state[p]["exp_avg"]))
                        for n, p in model.named_parameters()
                        if n.endswith("grad_carrier") and "exp_avg" in optimizer.state.get(p, {})}}


def _local_shape(t):
    from torch.distributed.tensor import DTensor

    return t.to_local().shape if isinstance(t, DTensor) else t.shape


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from suites.train import distributed

    distributed.init({"world_size": world, "device": "cpu"})
    try:
        torch.save({(s, m): _train(m, world, s) for s, m in RUNS}, f"{out_dir}/rank{rank}.pt")
    finally:
        distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_rank_main, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = {m: _train(m, 1) for m in METHODS}
    return ranks, single


@pytest.mark.parametrize("strategy, method", RUNS)
def test_two_ranks_equal_one_process_on_the_global_batch(runs, strategy, method):
    ranks, single = runs
    a, b, ref = ranks[0][(strategy, method)], ranks[1][(strategy, method)], single[method]
    # float64 weights, but transformers computes the loss in float32 (it upcasts the logits, never down),
    # and OASIS/PCA keep float32 bases and statistics: agreement to float32 rounding, summed in another order
    assert set(a["grads"]) == set(ref["grads"]) and ref["grads"]
    for name, g in ref["grads"].items():  # the gradient weighting: token shares of the global step, times N
        # (OASIS/PCA: Ĝ = G·U with a float32 PCA basis from a Gram summed in another order, ~1e-5 of |Ĝ|)
        assert (a["grads"][name] - g).abs().max() <= 1e-4 * g.abs().max(), name
    for name, w in ref["weights"].items():
        assert torch.equal(a["weights"][name], b["weights"][name]), name  # DDP keeps the replicas equal
        torch.testing.assert_close(a["weights"][name], w, rtol=0, atol=1e-6, msg=name)  # they moved ~6e-2
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0)
    assert a["losses"] == b["losses"]  # the global loss, the same number on every rank
    for u0, u1, u in zip(a["bases"], b["bases"], ref["bases"], strict=True):
        assert torch.equal(u0, u1)  # bitwise: the statistics are summed before the same update everywhere
        torch.testing.assert_close(u0, u, rtol=0, atol=1e-5)
    # LDAdam's error buffer rides in p.grad through DDP's average: it must stay the same on every rank
    for name, e in a["errors"].items():
        assert torch.equal(e, b["errors"][name]), name
        torch.testing.assert_close(e, ref["errors"][name], rtol=0, atol=1e-6, msg=name)
    assert (method == "ldadam") == bool(a["errors"])


def _linear_shapes():
    """(d_out, d_in) of every projection of the tiny Llama, from its config (not from the model)."""
    kv = HIDDEN // 4 * 2
    block = [(HIDDEN, HIDDEN), (kv, HIDDEN), (kv, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
             (HIDDEN, INTER)]
    return block * 2


def test_oasis_all_reduces_the_low_rank_gradient_and_its_statistics_only(runs):
    ranks, _ = runs
    adam, oasis = ranks[0][("ddp", "adam")]["comm"], ranks[0][("ddp", "oasis")]["comm"]
    shapes = _linear_shapes()
    other = 2 * VOCAB * HIDDEN + HIDDEN * (2 * 2 + 1)  # embedding, lm_head, the five RMSNorm weights
    # adam: every parameter's gradient once per step, float64
    assert adam["grad_allreduce_bytes_per_step"] == 8 * (sum(o * i for o, i in shapes) + other)
    assert adam["stats_allreduce_bytes_per_step"] == 0
    # oasis: d_out × r per projection (float64 carriers) plus the uncompressed parameters
    assert oasis["grad_allreduce_bytes_per_step"] == 8 * (sum(o * RANK for o, _ in shapes) + other)
    # the Oja statistics of each basis (q/k/v share one, gate/up one; o and down their own): S (d_in × r) and
    # K (r × r) in float32, the row count in float64; every step moves every basis
    trackers = [HIDDEN, HIDDEN, HIDDEN, INTER] * 2
    stats = sum(4 * (d_in * RANK + RANK * RANK) + 8 for d_in in trackers)
    # step 0 also sums the PCA init's Gram XᵀX (float32) and row count of each basis
    pca_init = sum(4 * d_in * d_in + 8 for d_in in trackers)
    assert oasis["stats_allreduce_bytes_per_step"] == pytest.approx(stats + pca_init / STEPS, rel=1e-12)
    assert oasis["allreduce_bytes_max_step"] == oasis["grad_allreduce_bytes_per_step"] + stats + pca_init
    # no d_out × d_in tensor is ever handed to DDP, and the compressed layers move ≤ 0.1× adam's bytes
    sent = {s for bucket in ranks[0][("ddp", "oasis")]["buckets"] for s in bucket}
    assert not sent & set(shapes)
    compressed_adam = 8 * sum(o * i for o, i in shapes)
    compressed_oasis = 8 * sum(o * RANK for o, _ in shapes) + stats
    assert compressed_oasis <= 0.1 * compressed_adam, compressed_oasis / compressed_adam


def test_fsdp_shards_oasis_by_rows_and_reduce_scatters_the_low_rank_gradient(runs):
    """FSDP2: each rank keeps d_out/2 rows of every carrier's moments; the gradients it hands to
    reduce-scatter are the d_out × r carriers and the uncompressed parameters (the weights, frozen, never);
    only the basis statistics are all-reduced."""
    ranks, _ = runs
    oasis, adam = ranks[0][("fsdp", "oasis")], ranks[0][("fsdp", "adam")]
    shapes = _linear_shapes()
    assert sorted(oasis["moments"].values()) == sorted((o // 2, RANK) for o, _ in shapes)
    other = 2 * VOCAB * HIDDEN + HIDDEN * (2 * 2 + 1)
    low_rank = 8 * (sum(o * RANK for o, _ in shapes) + other)
    assert oasis["comm"]["grad_reduce_scatter_bytes_per_step"] == low_rank
    assert adam["comm"]["grad_reduce_scatter_bytes_per_step"] == 8 * (sum(o * i for o, i in shapes) + other)
    assert oasis["comm"]["allreduce_bytes_per_step"] == oasis["comm"]["stats_allreduce_bytes_per_step"] > 0
    assert adam["comm"]["allreduce_bytes_per_step"] == 0
