"""suites.measure.dispatch counts what it says (compute ops, host syncs, linalg calls, device provenance) and
suites.speed counts a training step as it would run on CUDA (foreach AdamW, a forced refresh on a second
build), refusing --kind cuda without a GPU.

Expected values come from what the code under test calls, written out by hand (a matmul, a relu and a sum are
three kernels; seven projections per Llama decoder layer), never from the counter's own output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suites.measure.dispatch import DispatchCounter, HostSyncError, NoHostSync

REPO = Path(__file__).resolve().parent.parent


def test_a_tiny_function_dispatches_the_ops_it_calls_and_no_views():
    x, w = torch.randn(4, 3), torch.randn(4, 3)
    counter = DispatchCounter()
    with counter, counter.phase("f"):
        y = x @ w.t()        # a view (t) and one mm
        z = torch.relu(y)    # relu
        z.view(-1).sum()     # a view and one sum
    assert counter.counts["f"].ops == 3
    assert dict(counter.counts["f"].by_op) == {"aten.mm": 1, "aten.relu": 1, "aten.sum": 1}
    assert counter.counts["f"].sync_count == 0


def test_phases_count_separately():
    x = torch.randn(5)
    counter = DispatchCounter()
    with counter:
        with counter.phase("a"):
            x.exp()
        with counter.phase("b"):
            x.exp().exp()
    assert (counter.counts["a"].ops, counter.counts["b"].ops) == (1, 2)
    assert counter.total(["a", "b"]).ops == 3


def test_item_is_a_sync_and_no_host_sync_raises_at_it():
    x = torch.randn(5)
    counter = DispatchCounter()
    with counter, counter.phase("step"):
        x.sum().item()
        float(x.max())
    assert dict(counter.counts["step"].syncs) == {"aten._local_scalar_dense": 2}
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), NoHostSync():
        x.sum().item()
    with NoHostSync():  # the same computation without reading the value back is fine
        x.sum().mul(2)


def test_linalg_that_checks_info_on_the_host_syncs_and_the_ex_variants_do_not():
    a = torch.randn(6, 4, dtype=torch.float64)
    spd = a.T @ a + torch.eye(4, dtype=torch.float64)
    counter = DispatchCounter()
    with counter:
        with counter.phase("chol"):
            torch.linalg.cholesky(spd)
        with counter.phase("chol_ex"):
            torch.linalg.cholesky_ex(spd)
        with counter.phase("qr"):
            torch.linalg.qr(a)
        with counter.phase("svdvals"):
            torch.linalg.svdvals(a)
    assert counter.counts["chol"].sync_count == 1 and counter.counts["chol"].linalg_count == 2
    assert counter.counts["chol_ex"].sync_count == 0 and counter.counts["chol_ex"].linalg_count == 1
    assert counter.counts["qr"].sync_count == 0 and counter.counts["qr"].linalg_count == 1
    assert counter.counts["svdvals"].sync_count == 1


def test_device_provenance_host_scalars_do_not_sync_and_python_data_sent_to_the_device_does():
    weight = torch.randn(3, 3)
    step = torch.tensor(0.0)  # a host counter, as torch's AdamW keeps `step`
    counter = DispatchCounter(roots=[weight])
    with counter, counter.phase("p"):
        step.add_(1).item()                                 # host scalar: no sync on CUDA
        derived = weight.sum() * 2                          # computed from a device tensor
        derived.item()                                      # sync
        torch.tensor([1.0, 2.0], device=weight.device)      # host-to-device copy
        torch.tensor([1.0, 2.0])                            # stays on the host
        torch.zeros(3, device=weight.device).sum().item()   # device by its explicit device: sync
    assert dict(counter.counts["p"].syncs) == {
        "aten._local_scalar_dense": 2, "torch.tensor(device=...) (host to device)": 1}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    """llama-tiny (2 decoder layers) with a 512-token vocabulary, as a config.json, and a 4-layer one."""
    from suites.train.models import llama_config

    folder = tmp_path_factory.mktemp("model")
    paths = {}
    for layers in (2, 4):
        path = folder / f"tiny{layers}.json"
        path.write_text(llama_config("llama-tiny", vocab_size=512, num_hidden_layers=layers).to_json_string())
        paths[layers] = str(path)
    return paths


def _count(model, method, **kw):
    from suites.measure.speed import count_step

    return count_step(model, method, batch=1, seq=8, rank=4, **kw)


def test_adam_is_counted_with_foreach_as_on_cuda(micro_model):
    """foreach AdamW dispatches one op per update stage for all parameters at once: its optimizer ops do not
    depend on the number of parameters (the single-tensor loop, torch's CPU default, grows with it)."""
    small, big = (_count(micro_model[n], "adam")["phases"]["optimizer"]["ops"] for n in (2, 4))
    assert small == big
    assert _count(micro_model[2], "adam")["foreach_set"] == ["AdamW"]


def test_a_forced_refresh_step_runs_one_svd_per_projected_matrix_and_the_trained_step_none(micro_model):
    """GaLore projects the 7 attention/MLP weights of each of 2 layers: 14 SVDs on a refresh; at its trained
    period (200) the second step is no refresh."""
    steady = _count(micro_model[2], "galore")
    refresh = _count(micro_model[2], "galore", refresh=True)
    assert steady["period"] == 200 and refresh["period"] == 1
    assert steady["linalg_ops"] == {}
    assert refresh["linalg_ops"] == {"aten._linalg_svd": 14}
    assert refresh["sync_ops"].get("aten._linalg_svd") == 14


def test_count_method_amortises_over_the_trained_period(micro_model):
    from suites.measure.speed import count_method

    row = count_method(micro_model[2], "galore", batch=1, seq=8, rank=4)
    steady, refresh = row["step"]["ops"], row["refresh"]["ops"]
    assert refresh > steady
    assert row["ops_per_step"] == pytest.approx((199 * steady + refresh) / 200, abs=0.05)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "suites.speed", *argv], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_kind_cuda_is_refused_in_one_line_without_a_gpu(tmp_path):
    out = tmp_path / "speed.json"
    done = _cli("--model", "llama-tiny", "--methods", "adam", "--kind", "cuda", "--json", str(out),
                "--allow-dirty")
    assert done.returncode == 2
    assert done.stderr.strip() == "python -m suites.speed: error: --kind cuda needs a CUDA device"
    assert not out.exists()


def test_the_cli_writes_a_report_naming_its_commit(tmp_path, micro_model):
    out = tmp_path / "speed.json"
    done = _cli("--model", micro_model[2], "--methods", "adam,oasis", "--batch", "1", "--seq", "8", "--rank",
                "4", "--no-cpu-time", "--json", str(out), "--allow-dirty", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["adam", "oasis"]
    assert report["config"]["commit"]
    assert "adam" in done.stdout and "oasis" in done.stdout
