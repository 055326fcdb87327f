"""suites.memory --nproc N --strategy ddp|fsdp: one rank's peak under a fake process group.

Each expectation is derived independently of the code under test: DDP's per-rank peak is the one-process
peak at the per-rank micro-batch plus DDP's gradient buckets (one copy of every trainable gradient), and a
real two-process gloo run of the same step gives the same bytes; FSDP2's shards, sharded gradients and AdamW
state follow from the parameter shapes (rows padded to ceil(rows / N), as FSDP2 stores them).
"""

import functools
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from suites.core.registry import build_method
from suites.measure.memory import cast_params, measure, method_config
from suites.memory import main
from suites.train.models import build_model

N = 2
SEQ, RANK = 16, 4


@functools.cache
def _row(method, batch, world_size=1, strategy=None):
    return measure("llama-tiny", method, batch=batch, seq=SEQ, rank=RANK, kind="estimate",
                   world_size=world_size, strategy=strategy)


def _params():
    return list(build_model("llama-tiny", dtype=torch.bfloat16).parameters())  # tied weights once


def _trainable_bytes(method):
    """Bytes of every trainable gradient of one process (bf16): what DDP's buckets copy."""
    net = build_model("llama-tiny", dtype=torch.bfloat16)
    net, _ = build_method(method, net, method_config(method, RANK, {}))
    cast_params(net, torch.bfloat16)
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["adam", "lora"])
def test_ddp_rank_peak_is_one_process_at_the_rank_batch_plus_the_gradient_buckets(method):
    single = _row(method, 1)                      # one process, micro-batch 1
    ddp = _row(method, N, N, "ddp")               # global micro-batch 2 over 2 ranks: 1 per rank
    buckets = _trainable_bytes(method)            # gradient_as_bucket_view=False: a copy of every gradient
    assert ddp["ddp_bucket_bytes"] == buckets
    assert ddp["peak_bytes"] == single["peak_bytes"] + buckets
    assert ddp["breakdown"]["grads"] == single["breakdown"]["grads"] + buckets
    assert ddp["after_backward"]["grads"] == 2 * buckets      # the gradients and their bucket copy
    assert sum(ddp["breakdown"].values()) == ddp["peak_bytes"]
    assert (ddp["world_size"], ddp["strategy"], ddp["rank_batch"]) == (N, "ddp", 1)
    assert (single["world_size"], single["strategy"], single["rank_batch"]) == (1, None, 1)
    assert "after_backward" not in single         # the one-process row is today's


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank, port, out, method="adam", strategy="ddp"):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=N)
    try:
        row = measure("llama-tiny", method, batch=N, seq=SEQ, rank=RANK, kind="cpu",
                      kernel_policy="cuda-dropout", world_size=N, strategy=strategy)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(row, f)


def test_ddp_estimate_equals_a_real_two_process_gloo_run(tmp_path):
    """Real DDP (its C++ all-reduce, its bucket rebuild, gloo), tracked on rank 0, allocates exactly what the
    fake-group estimate counts."""
    out = tmp_path / "rank0.json"
    mp.start_processes(_gloo_rank, args=(_free_port(), str(out)), nprocs=N, start_method="spawn")
    real = json.loads(out.read_text())
    est = _row("adam", N, N, "ddp")
    assert real["source"] == "cpu-tracked"
    assert real["peak_bytes"] == est["peak_bytes"]
    # the same live bytes; which are "grads" differs: the real reducer rebuilds its buckets before the window
    # and the hook learns of the new ones only when they are all-reduced, after the peak ("other" until then)
    real_b, est_b = real["breakdown"], est["breakdown"]
    assert {k: real_b[k] for k in ("params", "optimizer", "activations")} == \
        {k: est_b[k] for k in ("params", "optimizer", "activations")}
    assert real_b["grads"] + real_b["other"] == est_b["grads"] + est_b["other"]


def _padded_shard_bytes(params, n):
    """FSDP2 keeps rank 0's shard of each parameter as ceil(rows / n) rows (all ranks padded alike)."""
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) * p.element_size() for p in params)


def test_fsdp_adam_shards_params_grads_and_optimizer_state():
    params = _params()
    rope = 4 * (64 // 4 // 2)                     # the rotary inv_freq buffer (fp32, not sharded)
    full = sum(2 * p.numel() for p in params)
    shard = _padded_shard_bytes(params, N)
    assert full <= N * shard < full + N * sum(2 * p.numel() // p.shape[0] for p in params)  # < 1 row each
    row = _row("adam", N, N, "fsdp")
    state = row["after_backward"]
    assert state["params"] == shard + rope
    assert state["grads"] == shard                                  # sharded gradients, same padding
    assert state["optimizer"] == 2 * shard + 4 * len(params)        # bf16 moments + a fp32 step each
    assert row["breakdown"]["params"] == shard + rope               # full weights are gathered temporaries
    assert row["breakdown"]["optimizer"] == 2 * shard + 4 * len(params)
    single = _row("adam", 1)["breakdown"]                           # one process: the whole of each
    assert (single["params"], single["optimizer"]) == (full + rope, 2 * full + 4 * len(params))
    assert sum(row["breakdown"].values()) == row["peak_bytes"]


@pytest.mark.parametrize("argv, needle", [
    (["--nproc", "0", "--strategy", "ddp"], "positive integer"),
    (["--nproc", "two", "--strategy", "ddp"], "positive integer"),
    (["--nproc", "2", "--strategy", "zero3"], "invalid choice"),
    (["--nproc", "2"], "needs --strategy"),
    (["--nproc", "4", "--strategy", "fsdp", "--batch", "6"], "multiple of --nproc"),
    (["--nproc", "2", "--strategy", "ddp", "--loss", "chunked"], "--loss chunked"),
    (["--nproc", "2", "--strategy", "ddp", "--kind", "cuda"], "--kind cuda"),
])
def test_bad_distributed_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(["--model", "llama-tiny", *argv, "--json", str(out)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["oasis", "lora"])
def test_fsdp_estimate_of_a_method_that_changes_the_model_equals_a_real_gloo_run(tmp_path, method):
    """OASIS (float32 gradient carriers in a bf16 model: their layers become FSDP groups of their own) and
    LoRA (peft replaces the projections) shard through the builders' `cfg["shard"]` hook; a real two-process
    gloo FSDP2 step, tracked on rank 0, allocates what the fake-group estimate counts."""
    out = tmp_path / "rank0.json"
    mp.start_processes(_gloo_rank, args=(_free_port(), str(out), method, "fsdp"), nprocs=N,
                       start_method="spawn")
    real = json.loads(out.read_text())
    est = _row(method, N, N, "fsdp")
    assert "error" not in est and real["source"] == "cpu-tracked"
    assert real["after_backward"] == est["after_backward"]  # shards, gradients and state: byte for byte
    # the peak: once in four runs the real one held ~10 KB (0.05%) more at its peak than the estimate,
    # a temporary freed later in a real run (uncollected garbage or gloo's timing); the rest never differed
    assert abs(real["peak_bytes"] - est["peak_bytes"]) <= 1e-3 * est["peak_bytes"]
    assert {k: real["breakdown"][k] for k in ("params", "optimizer")} == \
        {k: est["breakdown"][k] for k in ("params", "optimizer")}
    assert est["after_backward"]["optimizer"] < _row(method, N)["breakdown"]["optimizer"]  # sharded state
