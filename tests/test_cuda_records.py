"""What a CUDA record carries beside the allocator's peaks: the fake-tensor estimate of the same configuration
(`suites.measure.memory.estimate_for`), so every GPU run also checks the estimator. The mapping from a run's
config to the estimate's arguments is checked on CPU; the CUDA meter itself only where a GPU exists."""

import pytest
import torch

from suites.core import profiles
from suites.core.registry import method_defaults
from suites.launch import recipe
from suites.measure import memory


def _config(method: str, **overrides) -> dict:
    prof = profiles.profile("c4", "smoke")
    prof.update(overrides)
    return profiles.resolve("c4", "smoke", prof, method, method_defaults(method), "cpu")


# the c4 profiles train LoRA's embeddings, norms and lm_head too (train_unadapted): the estimate must as well
@pytest.mark.parametrize("method, extra, implied", [
    ("adam", {}, {}),
    ("lora", {"lora_dropout": 0.0}, {"train_unadapted": True}),
    ("oasis", {"subspace_lr": 0.5}, {}),
])
def test_estimate_of_a_run_is_the_estimate_of_its_configuration(method, extra, implied, one_thread):
    cfg = {**_config(method, batch=3, seq_len=48, rank=4, checkpointing=True), **extra}
    got = memory.estimate_for(cfg)
    want = memory.measure("llama-tiny", method, batch=3, seq=48, rank=4, dtype="float32", checkpointing=True,
                          overrides={**extra, **implied}, kind="estimate")
    assert got["estimate_bytes"] == want["peak_bytes"]
    assert got["estimate_bytes"] != memory.estimate_for({**cfg, "batch": 1})["estimate_bytes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_record_has_allocator_peaks_and_the_estimate(tmp_path):
    cfg = {**_config("adam"), "device": "cuda"}
    from suites.train.models import run_fields

    rec = recipe.run({"config": {**cfg, **run_fields(cfg)}, "out_dir": str(tmp_path), "position": 0})
    mem = rec["memory"]
    assert rec["status"] == "ok" and mem["source"] == "cuda"
    assert mem["active_peak_bytes"] <= mem["allocated_peak_bytes"] <= mem["reserved_bytes"]
    assert mem["alloc_retries"] >= 0 and mem["estimate_bytes"] > 0
