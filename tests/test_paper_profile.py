"""The paper profile end to end on CPU: a tiny Llama saved as a local Hugging Face folder stands in for the
hub model; two optimizer steps of two accumulated micro-batches each, bf16 as the paper, real evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suites.core import records
from suites.train import tokenizers
from suites.train.models import build_model, llama_config

ROOT = Path(__file__).resolve().parent.parent
ENV_KEYS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OASIS_NO_PROGRESS": "1", "OASIS_THREADS": "1"}


@pytest.mark.slow
def test_paper_profile_runs_two_accumulated_steps_on_a_local_model(tmp_path):
    import os

    model_dir = tmp_path / "tiny-llama"
    build_model(llama_config("llama-tiny"), dtype=torch.bfloat16, seed=0).save_pretrained(model_dir)
    tokenizers.load_tokenizer().save_pretrained(model_dir)  # a folder with weights brings its tokenizer
    out = tmp_path / "out"
    tiny = ["steps=2", "mem_window=1", "batch=1", "grad_accum=2", "seq_len=256", "eval_limit=2",
            "eval_batch=2", "max_gen_toks=4", "rank=8", "refresh_every=1", "update_proj_gap=1",
            "warmup_steps=1", f"base={model_dir}"]
    proc = subprocess.run([sys.executable, "-m", "suites.run", "gsm8k", "--profile", "paper", "--methods",
                           "adam,oasis", "--device", "cpu", "--out", str(out)]
                          + [a for kv in tiny for a in ("--set", kv)],
                          cwd=ROOT, env={**os.environ, **ENV_KEYS}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["method"]: r for r in records.load_records(out)}
    assert set(recs) == {"adam", "oasis"}
    for rec in recs.values():
        cfg = rec["config"]
        assert rec["status"] == "ok", rec["error"]
        assert (cfg["profile"], cfg["dtype"], cfg["grad_accum"], cfg["batch"]) == ("paper", "bfloat16", 2, 1)
        assert cfg["model_source"]["kind"] == "local"
        assert [point[0] for point in rec["curve"]] == [0, 1]
        assert rec["metrics"]["eval_problems"] == 2 and "step0" in rec["metrics"]
        # tokens of both micro-batches count towards throughput: 2 micro-batches per step
        assert rec["speed"]["tokens_per_s"] > 0
    json.dumps(recs)  # records are plain JSON
