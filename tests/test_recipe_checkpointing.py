"""`checkpointing=true` in the harness: the model the recipe builds recomputes its decoder layers, and OASIS
trained through the recipe's step follows the same trajectory as without checkpointing. (Counting a
recompute's statistics twice scales them uniformly, which the scale-free Oja step does not see; the library
test tests/test_oasis_checkpointing.py catches that through the statistics themselves.)"""

import pytest
import torch

from suites.core.registry import build_method, method_defaults
from suites.launch import recipe
from suites.train.models import build_model, enable_checkpointing, llama_config


def test_recipe_builds_a_checkpointed_model_when_asked():
    cfg = {"model": "llama-tiny", "base": "random", "seed": 0, "base_seed": 0, "dtype": "float32",
           "device": "cpu", "lean_activations": False}
    assert recipe.build_model({**cfg, "checkpointing": True}, None).is_gradient_checkpointing
    assert not recipe.build_model({**cfg, "checkpointing": False}, None).is_gradient_checkpointing


def _session(checkpointing: bool) -> recipe.Session:
    model = build_model(llama_config("llama-tiny"), dtype=torch.float64, seed=0)
    if checkpointing:
        enable_checkpointing(model)
    cfg = {**method_defaults("oasis"), "lr": 1e-2, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8,
           "rank": 8, "seed": 0}
    model, optimizer = build_method("oasis", model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return recipe.Session({"device": "cpu"}, None, None, [], model, optimizer, scheduler, meter=None)


def test_oasis_trajectory_is_the_same_with_checkpointing(one_thread):
    plain, checkpointed = _session(False), _session(True)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(0, 1000, (2, 16), generator=g)
        micro = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
        assert recipe.optimizer_step(plain, step, micro) == pytest.approx(
            recipe.optimizer_step(checkpointed, step, micro), rel=1e-12)
    for (name, a), b in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=name)
    for a, b in zip(plain.optimizer._trackers, checkpointed.optimizer._trackers):
        torch.testing.assert_close(a.basis, b.basis, rtol=1e-12, atol=1e-14)
