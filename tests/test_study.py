"""The study command (`suites.study`): its sweeps are valid suites.run input, every point has the same
seeds, and an ablation's reference point is the main row's run (same config hash), so the study never runs
it twice."""

from collections import Counter

import pytest

from suites import records, run, study


def _configs(name):
    (_, suite, methods, sweeps), = [e for e in study.STUDY if e[0] == name]
    return run.check_arguments(run.parser().parse_args(study.argv_of(suite, methods, sweeps, "unused-out")))


@pytest.mark.parametrize("suite", ["c4", "gsm8k"])
def test_every_point_has_the_same_three_seeds(suite):
    for kind in ("main", "rank", "subspace-lr"):
        configs = _configs(f"{suite}-{kind}")
        points = Counter((c["method"], c["rank"], c.get("subspace_lr")) for c in configs)
        assert set(points.values()) == {3}, kind
        assert {c["seed"] for c in configs} == {0, 1, 2}
        assert {c["base_seed"] for c in configs} == {0}


@pytest.mark.parametrize("suite", ["c4", "gsm8k"])
def test_ablation_reference_points_are_the_main_runs(suite):
    main = {records.config_hash(c) for c in _configs(f"{suite}-main")}
    references = (("rank", lambda c: c["rank"] == 32), ("subspace-lr", lambda c: c["subspace_lr"] == 0.1))
    for kind, ref in references:
        configs = _configs(f"{suite}-{kind}")
        refs = [c for c in configs if ref(c)]
        assert refs and {records.config_hash(c) for c in refs} <= main, kind
        others = [c for c in configs if not ref(c)]
        assert others and not {records.config_hash(c) for c in others} & main, kind


def test_only_refuses_an_unknown_sweep(capsys):
    assert study.main(["--only", "c4-rnak", "--list"]) == 2
    assert "unknown sweep 'c4-rnak'" in capsys.readouterr().err
