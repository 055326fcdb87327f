"""reports.build on the fixture records (tests/fixtures/records: synthetic, marked as fixtures)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from reports.build import build
from reports.load import Run, group_runs, load, reference_groups

FIXTURES = Path(__file__).parent / "fixtures" / "records"
ROOT = Path(__file__).parents[1]


def _build(out: Path):
    logs, warnings = [], []
    result = build(FIXTURES, out, log=logs.append, warn=warnings.append)
    return result, logs, warnings


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result, logs, warnings = _build(out)
    return out, result, logs, warnings


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _fixture_records(**match) -> list[dict]:
    recs = []
    for p in sorted(FIXTURES.rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "config_hash" in rec and all(rec.get(k) == v for k, v in match.items()):
            recs.append(rec)
    return recs


def test_all_six_artefacts_exist(built):
    out, result, _, _ = built
    for stem in ("table1_main_gsm8k_cpu", "table1_main_c4_cpu", "table2_memory_breakdown",
                 "table_memory_estimate", "published_gsm8k", "published_c4"):
        for ext in ("md", "tex", "csv"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    for stem in ("fig2_memory_breakdown", "fig3_rank_ablation_gsm8k_cpu", "fig4_subspace_lr_gsm8k_cpu",
                 "fig5_loss_curves_gsm8k_cpu", "fig6_subspace_drift_gsm8k_cpu"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem
    tex = (out / "table1_main_gsm8k_cpu.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert (out / "MISSING.md").exists() and (out / "INDEX.md").exists()
    listed = (out / "INDEX.md").read_text()
    assert all(f"`{p.name}`" in listed for p in result["written"])


def test_malformed_and_incomplete_records_are_named_and_skipped(built):
    out, result, logs, warnings = built
    skipped = dict(result["skipped"])
    assert set(skipped) == {"gsm8k/fixture-truncated.json", "gsm8k/fixture-no-config-hash.json"}
    assert "not valid JSON" in skipped["gsm8k/fixture-truncated.json"]
    assert "config_hash" in skipped["gsm8k/fixture-no-config-hash.json"]
    assert any("fixture-truncated.json" in w for w in warnings)
    assert any("fixture-no-config-hash.json" in w for w in warnings)
    missing = (out / "MISSING.md").read_text()
    assert "fixture-truncated.json" in missing and "fixture-no-config-hash.json" in missing
    loaded = load(FIXTURES)
    assert all(r.path not in skipped for r in loaded.runs)
    # partial record (no speed) is kept in the table, with a gap, and listed
    lora = [r for r in _csv(out / "table1_main_gsm8k_cpu.csv") if r["method"] == "lora"]
    assert len(lora) == 1 and lora[0]["tokens_per_s_n"] == "0" and lora[0]["peak_bytes_n"] == "1"
    assert "has no speed.tokens_per_s" in missing
    # runs that did not finish and suites without data are listed, not crashed on
    assert "status diverged" in missing and "status error" in missing
    assert "humaneval/cpu: no ok run for method adam" in missing


def test_seed_groups_show_mean_and_std_from_records(built):
    out, *_ = built
    rows = {r["method"]: r for r in _csv(out / "table1_main_gsm8k_cpu.csv")}
    for method in ("adam", "oasis"):
        recs = [r for r in _fixture_records(suite="gsm8k", method=method)
                if r["config"]["rank"] == 32 and r["config"].get("subspace_lr", 0.1) == 0.1
                and r["config"].get("update_every", 1) == 1]
        assert sorted(r["config"]["seed"] for r in recs) == [0, 1, 2]
        acc = [r["metrics"]["accuracy"] for r in recs]
        row = rows[method]
        assert row["seeds"] == "0 1 2" and row["accuracy_n"] == "3"
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(acc))
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(acc))
        assert len(row["config_hashes"].split()) == 3
    md = (out / "table1_main_gsm8k_cpu.md").read_text()
    adam_line = next(line for line in md.splitlines() if line.startswith("| adam "))
    assert " ± " in adam_line
    # a single-seed row prints its value alone
    galore_line = next(line for line in md.splitlines() if line.startswith("| galore "))
    assert " ± " not in galore_line


def test_different_configs_never_share_a_row(built):
    out, *_ = built
    oasis = [r for r in _csv(out / "runs_gsm8k_cpu.csv") if r["method"] == "oasis"]
    hashes = [h for r in oasis for h in r["config_hashes"].split()]
    assert len(hashes) == len(set(hashes))  # every record in exactly one row
    at_ref = [r for r in oasis if r["rank"] == "32" and r["subspace_lr"] == "0.1"]
    assert sorted(r["update_every"] for r in at_ref) == ["1", "4"]  # same method, distinct config: two rows
    assert {r["update_every"]: r["seeds"] for r in at_ref} == {"1": "0 1 2", "4": "0"}
    # the main table and the curves take only the reference config (rank 32, subspace_lr 0.1, update_every 1)
    main = [r for r in _csv(out / "table1_main_gsm8k_cpu.csv") if r["method"] == "oasis"]
    assert len(main) == 1 and main[0]["seeds"] == "0 1 2"
    groups = group_runs(load(FIXTURES).runs)
    ref = [g for g in reference_groups(groups) if g.method == "oasis" and g.suite == "gsm8k"]
    assert len(ref) == 1 and ref[0].config["update_every"] == 1 and ref[0].config["rank"] == 32
    # ablation tables: one point per configuration, sweep key in order
    lr = [r for r in _csv(out / "table4_subspace_lr_gsm8k_cpu.csv")]
    assert [float(r["subspace_lr"]) for r in lr] == [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    assert lr[-1]["status"] == "diverged 1/1" and lr[-1]["accuracy_n"] == "0"
    rank = _csv(out / "table3_rank_ablation_gsm8k_cpu.csv")
    assert {(r["method"], int(r["rank"])) for r in rank} == {
        (m, k) for m in ("lora", "pca", "oasis") for k in (8, 16, 32, 64, 128)}


def test_ratio_and_published_numbers_come_from_records_and_citations(built):
    out, *_ = built
    rows = {r["method"]: r for r in _csv(out / "table1_main_gsm8k_cpu.csv")}
    ratio = float(rows["pca"]["memory_ratio_to_adam"])
    pca, adam = float(rows["pca"]["peak_bytes_mean"]), float(rows["adam"]["peak_bytes_mean"])
    assert ratio == pytest.approx(pca / adam)
    c4 = {r["method"]: r for r in _csv(out / "table1_main_c4_cpu.csv")}
    assert c4["galore"]["published"] == "c4_eval_ppl 34.88 [galore]"  # GaLore paper, llama-60m
    assert c4["oasis"]["published"] == ""
    assert "arXiv:2403.03507" in (out / "published_c4.md").read_text()
    assert "[TEST FIXTURE DATA - NOT RESULTS]" in (out / "table1_main_gsm8k_cpu.md").read_text()


def test_two_builds_give_identical_outputs(built, tmp_path):
    out, *_ = built
    _build(tmp_path)
    first = sorted(p.name for p in out.iterdir())
    assert first == sorted(p.name for p in tmp_path.iterdir())
    for name in first:
        if name.endswith((".md", ".tex", ".csv")):
            assert (out / name).read_text() == (tmp_path / name).read_text(), name
    # fixed metadata: figures are byte-stable too
    for name in first:
        if name.endswith((".png", ".pdf")):
            assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_stale_artefacts_are_removed(tmp_path):
    results = tmp_path / "results"  # a small subset keeps this test quick
    for sub in ("c4", "memory"):
        shutil.copytree(FIXTURES / sub, results / sub)
    out = tmp_path / "out"
    build(results, out, log=lambda *_: None, warn=lambda *_: None)
    assert (out / "fig6_subspace_drift_c4_cpu.png").exists()
    shutil.rmtree(results / "c4")
    build(results, out, log=lambda *_: None, warn=lambda *_: None)
    assert not (out / "fig6_subspace_drift_c4_cpu.png").exists()
    assert not (out / "table1_main_c4_cpu.md").exists()
    assert (out / "table_memory_estimate.md").exists() and (out / "published_c4.md").exists()


def test_cli_help_and_bad_input(tmp_path):
    run = [sys.executable, "-m", "reports.build"]
    ok = subprocess.run(run + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "--results" in ok.stdout and "MISSING.md" in ok.stdout
    out = tmp_path / "out"
    bad = subprocess.run(run + ["--results", str(tmp_path / "nope"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr and not out.exists()


def test_reference_config_is_the_profile_default_when_a_sweep_ties():
    def run(method, rank, seed=0):
        config = {"suite": "c4", "profile": "smoke", "method": method, "rank": rank, "seed": seed}
        rec = {"schema": "x", "run_id": f"{method}-{rank}-{seed}", "suite": "c4", "profile": "smoke",
               "method": method, "status": "ok", "config": config, "config_hash": f"{method}{rank}{seed}"}
        return Run(f"{method}-{rank}-{seed}.json", rec)

    runs = [run("adam", 8), run("oasis", 8), run("oasis", 8, seed=1)] + [run("pca", r) for r in (4, 8, 16)]
    ref = {g.method: g for g in reference_groups(group_runs(runs))}
    assert ref["pca"].config["rank"] == 8  # each pca rank once: the rank every other method uses wins
    assert len(ref["oasis"].runs) == 2     # two seeds, one configuration


def test_fixtures_follow_the_harness_record_schema():
    """Every well-formed fixture passes the harness's own validator (schema, keys, config_hash)."""
    from suites.records import validate_record

    checked = 0
    for p in sorted(FIXTURES.rglob("*.json")):
        if p.parent.name == "memory" or p.name in ("fixture-truncated.json", "fixture-no-config-hash.json"):
            continue
        rec = json.loads(p.read_text())
        if "speed" not in rec:  # the deliberately partial record: the harness always writes the key
            rec["speed"] = None
        validate_record(rec)
        assert rec["env"]["note"].startswith("test fixture") and rec["run_id"].startswith("fixture-")
        checked += 1
    assert checked >= 30


def test_memcheck_baseline_and_memory_summary_are_not_reported_as_malformed(tmp_path):
    (tmp_path / "memory").mkdir()
    baseline = {"tolerance": 0.01, "peaks": {}, "claims": []}
    (tmp_path / "memory" / "baseline.json").write_text(json.dumps(baseline))
    (tmp_path / "memory" / "summary.json").write_text(json.dumps({"before": {}, "after": {}}))
    (tmp_path / "memory" / "junk.json").write_text(json.dumps({"hello": 1}))
    loaded = load(tmp_path)
    assert [path for path, _ in loaded.skipped] == ["memory/junk.json"]


def test_seeds_with_their_own_pretrained_base_are_one_configuration():
    from reports.load import config_key

    a = {"model": "llama-mini", "base_steps": 300, "seed": 0, "base_hash": "aaa", "lr": 1e-3}
    b = {**a, "seed": 1, "base_hash": "bbb"}
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key({**b, "base_steps": 200})


@pytest.mark.parametrize("content", ["nothing", "junk only"])
def test_cli_refuses_a_results_folder_without_records(tmp_path, content):
    results, out = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    if content == "junk only":
        (results / "junk.json").write_text(json.dumps({"hello": 1}))
    proc = subprocess.run([sys.executable, "-m", "reports.build", "--results", str(results),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("python -m reports.build: error: no run records")
    assert not out.exists() and proc.stdout == ""


def test_cli_refuses_an_out_that_is_a_file_before_building(tmp_path):
    victim = tmp_path / "report.md"
    victim.write_text("kept")
    proc = subprocess.run([sys.executable, "-m", "reports.build", "--results", str(FIXTURES),
                           "--out", str(victim)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not a folder" in proc.stderr
    assert victim.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
