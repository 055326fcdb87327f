"""Published refresh periods with a refresh inside the memory window: a separate memory pass measures the
window with the period forced to 1, and the trajectory that is trained and evaluated is the one without it."""

import pytest

from suites.core import profiles, records
from suites.core.registry import method_defaults
from suites.launch import recipe
from suites.train.models import run_fields


def _config(method: str, **overrides) -> dict:
    prof = profiles.profile("c4", "smoke")
    prof.update(overrides)
    cfg = profiles.resolve("c4", "smoke", prof, method, method_defaults(method), "cpu")
    return {**cfg, **run_fields(cfg)}


def _run(tmp_path, name: str, cfg: dict) -> dict:
    return recipe.run({"config": cfg, "out_dir": str(tmp_path / name), "position": 0})


@pytest.mark.parametrize("method, key", [("pca", "refresh_every"), ("galore", "update_proj_gap")])
def test_memory_pass_forces_a_refresh_and_leaves_the_trajectory_alone(tmp_path, monkeypatch, method, key):
    published = _config(method)
    assert published[key] == 200 > published["mem_window"]  # the method's own period, not the profile's
    measured = _run(tmp_path, "published", published)
    assert measured["status"] == "ok", measured["error"]
    assert measured["memory"]["refresh_forced"] == {key: 1}

    # the same window, trained with the period 1: the meter is deterministic, so the bytes are equal
    every_step = _run(tmp_path, "every-step", _config(method, **{key: 1}))
    assert "refresh_forced" not in every_step["memory"]
    assert measured["memory"]["peak_bytes"] == every_step["memory"]["peak_bytes"]
    assert measured["memory"]["breakdown"] == every_step["memory"]["breakdown"]

    # without the pass: the same losses, bit for bit, and a window that saw no refresh
    monkeypatch.setattr(recipe, "memory_pass_config", lambda cfg: None)
    unforced = _run(tmp_path, "no-pass", published)
    assert unforced["curve"] == measured["curve"]
    assert unforced["metrics"] == measured["metrics"]
    assert unforced["memory"]["peak_bytes"] == measured["memory"]["trajectory_peak_bytes"]
    assert records.config_hash(unforced["config"]) == records.config_hash(measured["config"])


def test_no_pass_when_the_window_already_holds_a_refresh():
    assert recipe.memory_pass_config(_config("pca", refresh_every=1)) is None
    assert recipe.memory_pass_config(_config("adam")) is None  # no period at all
