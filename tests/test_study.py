"""The study command (`suites.study`, v2): its stages are valid suites.run input, every ablation's
reference point is a run of the lr stage (same config hash), the main rows at a chosen rate reuse the lr
stage's seed-0 run, the horizon gives every periodic method >= 10 refreshes, and --plan's hours follow
from the measured step times it is given."""

import contextlib
import json

import pytest

from suites import study
from suites.core import profiles, records, selection


def _stage(name):
    (stage,) = [s for s in study.STAGES if s.name == name]
    return study.stage_configs(stage, "unused-out")


def _hashes(configs):
    return {records.config_hash(c) for c in configs}


def test_the_lr_stage_is_every_method_at_half_one_and_two_times_its_rate_on_seed_0():
    configs = _stage("lr")
    tuned = {c["method"] for c in configs}
    assert tuned == {"adam", "lora", "galore", "ldadam", "pca", "oasis"}
    assert set(study.methods()) == tuned | {"oasis-frozen", "oasis-notransport"}
    assert set(study.RATE_FROM.values()) <= tuned
    for method in tuned:
        rates = sorted(c["lr"] for c in configs if c["method"] == method)
        assert rates == pytest.approx([rates[1] * 0.5, rates[1], rates[1] * 2])
    assert {c["seed"] for c in configs} == {0}


@pytest.mark.parametrize("name, key, reference, values", [
    ("rank", "rank", 32, [8, 16, 32, 64, 128]),
    ("subspace-lr", "subspace_lr", 0.1, [0.001, 0.01, 0.1, 1.0]),
    ("period-pca", "refresh_every", 50, [20, 50, 200]),
    ("period-galore", "update_proj_gap", 50, [20, 50, 200]),
])
def test_ablation_reference_points_are_lr_stage_runs(name, key, reference, values):
    configs = _stage(name)
    lr_runs = _hashes(_stage("lr"))
    for method in {c["method"] for c in configs}:
        assert sorted(c[key] for c in configs if c["method"] == method) == values
    refs = [c for c in configs if c[key] == reference]
    others = [c for c in configs if c[key] != reference]
    assert refs and _hashes(refs) <= lr_runs
    assert others and not _hashes(others) & lr_runs


def test_the_subspace_step_ablation_spans_three_decades():
    steps = [c["subspace_lr"] for c in _stage("subspace-lr")]
    assert max(steps) / min(steps) >= 1000


def test_main_rows_at_a_chosen_rate_reuse_the_lr_stages_seed_0_run():
    lr_runs = {(c["method"], c["lr"]): records.config_hash(c) for c in _stage("lr")}
    assert len(lr_runs) == 18
    for (method, lr), digest in lr_runs.items():
        main = study.configs_of(study.main_argv(method, lr, "unused-out"))
        five = method in ("oasis", "pca")
        assert sorted(c["seed"] for c in main) == ([0, 1, 2, 3, 4] if five else [0, 1, 2])
        (seed0,) = [c for c in main if c["seed"] == 0]
        assert records.config_hash(seed0) == digest, (method, lr)


def test_the_comparisons_that_isolate_the_basis_run_five_seeds_at_their_methods_rate():
    lr = 2e-3
    seeds = {m: sorted(c["seed"] for c in study.configs_of(study.main_argv(m, lr, "unused-out")))
             for m in ("oasis", "oasis-frozen", "pca", "adam", "oasis-notransport", "galore")}
    assert seeds["oasis"] == seeds["oasis-frozen"] == seeds["pca"] == [0, 1, 2, 3, 4]
    assert seeds["adam"] == seeds["oasis-notransport"] == seeds["galore"] == [0, 1, 2]
    main = dict(study.plan_rows("unused-out"))[study.MAIN]
    assert sum(c["method"] == "oasis-frozen" for c in main) == 5


def test_periodic_methods_refresh_at_least_ten_times_inside_the_horizon():
    prof = profiles.profile("c4", "study")
    assert prof["steps"] == profiles.STUDY_STEPS
    for c in _stage("lr"):
        for key in profiles.PERIODIC_KEYS:
            if key in c:
                assert (c["steps"] - 1) // c[key] >= 10, (c["method"], key, c[key])
    assert prof["val_tokens"] > 0 and prof["track_points"] >= 3 and prof["eval_every"] > 0


def test_best_rate_is_the_lowest_mean_validation_loss():
    assert selection.best_rate({1e-3: [5.0, 5.2], 2e-3: [5.05], 5e-4: [float("nan")]}) == 2e-3
    assert selection.best_rate({1e-3: [5.0], 2e-3: [5.0]}) == 1e-3  # a tie goes to the smaller rate
    assert selection.best_rate({1e-3: []}) is None


def _record(method, step_time, steps, wall):
    return {"schema": records.SCHEMA, "run_id": method, "suite": "c4", "profile": "cpu", "method": method,
            "status": "ok", "config": {"model": "llama-cpu", "batch": 4, "seq_len": 128, "steps": steps},
            "speed": {"step_time_s": step_time}, "wall_s": wall, "started_at": "t"}


def test_plan_hours_follow_the_measured_step_times(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(_record("adam", 0.5, 60, 60 * 0.5 + 10)))
    assert study.main(["--plan", "--timings", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 6 methods x 3 rates + pca 2 + galore 2 + 2 methods x 4 ranks + oasis 3 steps + 6 methods x 2 seeds
    # + 2 oasis ablations x 3 seeds + oasis, oasis-frozen and pca x 2 more seeds (rates past a grid's edge
    # are not known before its runs)
    runs = 18 + 2 + 2 + 8 + 3 + 12 + 6 + 6
    hours = runs * (profiles.STUDY_STEPS * 0.5 + 10) / 3600
    total = [line for line in out.splitlines() if line.strip().startswith("total")][0].split()
    assert int(total[1]) == runs
    assert float(total[2]) == pytest.approx(hours, abs=0.01)
    assert f"about {hours / 2:.2f} hours" in out


def test_plan_refuses_without_measured_step_times(tmp_path, capsys):
    assert study.main(["--plan", "--timings", str(tmp_path)]) == 2
    assert "no ok c4 record" in capsys.readouterr().err


def test_only_refuses_an_unknown_stage(capsys):
    assert study.main(["--only", "rnak", "--list"]) == 2
    assert "unknown stage 'rnak'" in capsys.readouterr().err


def test_main_runs_each_method_at_its_validated_rate_and_waits_for_unfinished_lr_runs(tmp_path, monkeypatch):
    out = str(tmp_path)
    lr_configs = _stage("lr")
    held = None
    for c in lr_configs:
        # val_loss lowest at 2x for oasis, at 0.5x for every other method
        factor = c["lr"] / min(x["lr"] for x in lr_configs if x["method"] == c["method"])  # 1, 2 or 4
        val = {"oasis": {1: 6.0, 2: 5.9, 4: 5.5}}.get(c["method"], {1: 5.0, 2: 5.1, 4: 5.2})[factor]
        rec = {"schema": records.SCHEMA, "run_id": records.run_id(c), "config_hash": records.config_hash(c),
               "status": "ok", "metrics": {"val_loss": val, "eval_loss": 1.0}, "started_at": "t"}
        if c["method"] == "oasis" and factor == 4:
            held = rec  # another process is still running it
            continue
        (tmp_path / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    ran, waits = [], []
    (held_cfg,) = [c for c in lr_configs if records.config_hash(c) == held["config_hash"]]
    other_sweep = contextlib.ExitStack()
    assert other_sweep.enter_context(records.run_lock(out, held_cfg))  # its lock, as a running sweep holds

    def fake_sweep(configs, columns, out_dir, desc):
        for c in configs:  # as run.sweep: a config another sweep holds is skipped; a run here writes nothing
            with records.run_lock(out_dir, c) as free:
                if free:
                    ran.append(c)
        return 0

    def fake_sleep(seconds):
        waits.append(seconds)
        (tmp_path / f"{held['run_id']}.json").write_text(json.dumps(held))
        other_sweep.close()

    monkeypatch.setattr(study.sweep, "sweep", fake_sweep)
    monkeypatch.setattr(study.time, "sleep", fake_sleep)
    assert study._run_main(out) == 0
    rates = {c["method"]: sorted({x["lr"] for x in ran if x["method"] == c["method"]}) for c in ran}
    base = {c["method"]: min(x["lr"] for x in lr_configs if x["method"] == c["method"]) for c in lr_configs}
    # every winner is at an edge: the rate past it runs first (here it leaves no record, so it has no value
    # and the grid's winner stays), then the main rows at the winner
    assert rates["oasis"] == [pytest.approx(base["oasis"] * 4), pytest.approx(base["oasis"] * 8)]
    assert rates["oasis-frozen"] == rates["oasis-notransport"] == [pytest.approx(base["oasis"] * 4)]
    assert rates["adam"] == [pytest.approx(base["adam"] / 2), pytest.approx(base["adam"])]
    assert len(waits) == 1 and len(ran) == 8 * 3 + 3 * 2 + 6  # 3 seeds each, 5 for oasis, frozen and pca


# ------------------------------------------------------------------------------- the grid past its edge


def test_a_winner_at_the_edge_grows_the_grid_by_a_factor_of_two():
    assert selection.beyond_the_edge({5e-4: [6.0], 1e-3: [6.1], 2e-3: [6.2]}, 0) == pytest.approx(2.5e-4)
    assert selection.beyond_the_edge({5e-4: [6.3], 1e-3: [6.1], 2e-3: [6.0]}, 0) == pytest.approx(4e-3)
    assert selection.beyond_the_edge({5e-4: [6.3], 1e-3: [6.0], 2e-3: [6.2]}, 0) is None  # an optimum inside
    top_edge = {5e-4: [6.3], 1e-3: [6.1], 2e-3: [6.0]}
    assert selection.beyond_the_edge(top_edge, selection.MAX_EXTENSIONS) is None
    assert selection.beyond_the_edge({1e-3: [float("nan")]}, 0) is None


def _write(out, cfg, val_loss):
    rec = records.make_record(cfg, status="ok", metrics={selection.METRIC: val_loss},
                              started_at=records.now(), wall_s=1.0, commit="test")
    records.write_record(rec, out)


def test_lr_records_run_the_edge_rate_before_choosing(tmp_path):
    """pca's grid with its best at 2x: the stage is not finished until 4x has a record; then it is, with
    four rates (4x worse, so the optimum is inside and nothing more is added)."""
    grid = [c for c in study.stage_configs(study.STAGES[0], str(tmp_path)) if c["method"] == "pca"]
    base = sorted(c["lr"] for c in grid)[1]
    for cfg, loss in zip(sorted(grid, key=lambda c: c["lr"]), [6.5, 6.3, 6.1]):
        _write(tmp_path, cfg, loss)
    found, missing = study.lr_records("pca", str(tmp_path))
    assert [c["lr"] for c in missing] == [pytest.approx(4 * base)] and len(found) == 3
    (beyond,) = study.configs_of(study.lr_argv("pca", missing[0]["lr"], str(tmp_path)))
    assert records.config_hash(beyond) == records.config_hash(missing[0])
    _write(tmp_path, beyond, 6.2)
    found, missing = study.lr_records("pca", str(tmp_path))
    assert missing == [] and len(found) == 4 and selection.best_rate(found) == pytest.approx(2 * base)


def test_lr_records_match_the_committed_study_records():
    """The stage's configs hash as the runs recorded them (device, model source and tokenizer filled in)."""
    committed = {r["config_hash"] for r in records.load_records("results/runs", recursive=False)}
    grid = {records.config_hash(c) for c in study.stage_configs(study.STAGES[0], "results/runs")}
    assert len(grid & committed) >= 17
