"""LoRA/QLoRA options (`lora_targets`, `use_dora`): in the config only when set, honoured by the harness's
builder and by suites.memory; the expected adapter sizes are counted here from the model's own shapes."""

import ast
import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from suites import memory, run
from suites.core.registry import build_method, method_defaults, method_options
from suites.train.models import build_model

REPO = Path(__file__).resolve().parent.parent
QV = "q_proj,v_proj"


def _plan(*sets):
    argv = ["gsm8k", "--profile", "cpu", "--methods", "adam,lora,qlora",
            "--out", str(REPO / "results" / "tmp" / "unused")]
    for s in sets:
        argv += ["--set", s]
    return {c["method"]: c for c in run.check_arguments(run.parser().parse_args(argv))}


def test_options_enter_the_config_only_when_set():
    """A default lora config has exactly the keys it had before the options existed (so its config hash
    is unchanged); --set puts the targets in lora's and qlora's configs and nowhere else."""
    default = _plan()
    for method in ("lora", "qlora"):
        assert "lora_targets" not in default[method] and "use_dora" not in default[method]
        # the keys of a default config: the profile's and the method's DEFAULTS, nothing from OPTIONS
        assert not set(default[method]) & set(method_options(method))
    chosen = _plan(f"lora_targets={QV}", "use_dora=true")
    assert chosen["lora"]["lora_targets"] == QV and chosen["qlora"]["lora_targets"] == QV
    assert chosen["lora"]["use_dora"] is True
    assert "lora_targets" not in chosen["adam"]
    # everything else is the default config
    rest = {k: v for k, v in chosen["lora"].items() if k not in ("lora_targets", "use_dora")}
    assert rest == default["lora"]


def test_qlora_options_literal_is_lora_s():
    """qlora's OPTIONS (read from its own source by the registry) are lora's."""
    def literal(path):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "OPTIONS" for t in node.targets):
                return ast.literal_eval(node.value)
    assert literal(REPO / "baselines/qlora.py") == literal(REPO / "baselines/lora.py")


def _cfg(**extra):
    return {**method_defaults("lora"), "lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
            "rank": 4, "seed": 0, **extra}


def test_targets_and_dora_reach_peft():
    model = build_model("llama-tiny", dtype=torch.float32)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    peft_model, optimizer = build_method("lora", model, _cfg(lora_targets=QV, use_dora=True))
    adapted = sorted({n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules()
                      if isinstance(m, LoraLayer)})
    assert adapted == ["q_proj", "v_proj"]
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    # per adapted m × n layer: A (r × n), B (m × r), DoRA's magnitude (m)
    assert trained == sum(4 * (m + n) + m for m, n in shapes.values())


def test_bad_targets_are_one_line():
    with pytest.raises(ValueError, match="lora_targets='q_proj,wq' is not valid"):
        build_method("lora", build_model("llama-tiny"), _cfg(lora_targets="q_proj,wq"))


def test_memory_cli_takes_targets(tmp_path, capsys):
    """`python -m suites.memory --set lora_targets=q_proj,v_proj`: the optimizer holds AdamW's two moments
    of the q,v adapters only (bf16) and one float32 step count per adapter tensor, counted from the model's
    shapes."""
    out = tmp_path / "m.json"
    assert memory.main(["--model", "llama-tiny", "--methods", "lora", "--batch", "2", "--seq", "16",
                        "--rank", "4", "--set", f"lora_targets={QV}", "--json", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["set"] == {"lora_targets": QV}
    model = build_model("llama-tiny")
    layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))]
    adapters = sum(4 * (m.in_features + m.out_features) for m in layers)
    assert report["results"][0]["breakdown"]["optimizer"] == 2 * 2 * adapters + 4 * 2 * len(layers)


def test_qlora_evaluates_on_cpu_with_its_training_matmul():
    """A no-grad eval-mode forward of qlora on llama-tiny (172-wide MLP, not a multiple of 32) runs on CPU
    and gives the logits of a train-mode forward (dropout 0), i.e. the same 4-bit matmul as training."""
    model = build_model("llama-tiny", dtype=torch.bfloat16)
    cfg = {**method_defaults("qlora"), **_cfg(lora_dropout=0.0)}
    model, _ = build_method("qlora", model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    trained = model(input_ids=ids).logits.detach()
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
    assert torch.equal(evaluated, trained)
