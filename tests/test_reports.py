"""reports.build on the fixture records (tests/fixtures/records: synthetic, marked as fixtures).

Expected numbers are computed here from the raw fixture JSON with `statistics` and a hard-coded Student-t
quantile (t_0.975 with 2 dof = 4.302652729911275), never from the report code's own helpers.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
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
T975 = {1: 12.706204736174707, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987,
        9: 2.2621571627409915, 29: 2.045229642132703, 100: 1.9839715184496334}
MAIN_SEEDS = (0, 1, 2)
GSM8K_REF = {"rank": 32, "subspace_lr": 0.1, "update_every": 1}


def _build(results: Path, out: Path):
    logs, warnings = [], []
    result = build(results, out, log=logs.append, warn=warnings.append)
    return result, logs, warnings


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result, logs, warnings = _build(FIXTURES, out)
    return out, result, logs, warnings


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _rows(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in _csv(path)}


def _md_line(path: Path, start: str) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith(start))


def _fixture_records(**match) -> list[tuple[Path, dict]]:
    recs = []
    for p in sorted(FIXTURES.rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "config_hash" in rec and all(rec.get(k) == v for k, v in match.items()):
            recs.append((p, rec))
    return recs


def _value(suite: str, method: str, seed: int, *keys, **config):
    """The recorded number one (method, seed) contributes: the newest ok record of that config and seed."""
    cands = [rec for _, rec in _fixture_records(suite=suite, method=method, profile="cpu", status="ok")
             if rec["config"]["seed"] == seed
             and all(rec["config"].get(k, v) == v for k, v in config.items())]
    assert cands, (suite, method, seed)
    node = max(cands, key=lambda r: r["started_at"])
    for k in keys:
        node = node[k]
    return node


def _mean_ci(vals: list[float]) -> tuple[float, float, float]:
    m = statistics.fmean(vals)
    half = T975[len(vals) - 1] * statistics.stdev(vals) / math.sqrt(len(vals))
    return m, m - half, m + half


def test_all_artefacts_exist(built):
    out, result, _, _ = built
    for stem in ("table1_main_gsm8k_cpu", "table1_paired_gsm8k_cpu", "table1_main_c4_cpu",
                 "table2_memory_breakdown", "table_memory_estimate", "published_gsm8k", "published_c4",
                 "table3_rank_ablation_gsm8k_cpu", "table4_subspace_lr_gsm8k_cpu"):
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
    missing = (out / "MISSING.md").read_text()
    assert "fixture-truncated.json" in missing and "fixture-no-config-hash.json" in missing
    # partial record (lora seed 0 has no speed) is kept, with a gap, and listed
    lora = _rows(out / "table1_main_gsm8k_cpu.csv")["lora"]
    assert lora["tokens_per_s_n"] == "2" and lora["peak_bytes_n"] == "3"
    assert "has no speed.tokens_per_s" in missing
    assert "status diverged" in missing and "status error" in missing
    assert "humaneval/cpu: no ok run for method adam" in missing


def test_main_rows_are_means_over_the_matched_seeds_with_t_intervals(built):
    """Every row: mean and 95% t-interval over seeds 0,1,2 (the seeds all six methods have), recomputed
    from the raw records; paired differences against adam recomputed per seed."""
    out, *_ = built
    rows = _rows(out / "table1_main_gsm8k_cpu.csv")
    md = out / "table1_main_gsm8k_cpu.md"
    assert "seeds 0,1,2 (n=3)" in md.read_text().splitlines()[0]
    adam = [_value("gsm8k", "adam", s, "metrics", "answer_nll", **GSM8K_REF) for s in MAIN_SEEDS]
    for method in ("adam", "lora", "galore", "ldadam", "pca", "oasis"):
        row = rows[method]
        assert row["seeds"] == "0 1 2" and row["n"] == "3"
        for metric in ("answer_nll", "final_answer_acc_tf", "accuracy"):
            vals = [_value("gsm8k", method, s, "metrics", metric, **GSM8K_REF) for s in MAIN_SEEDS]
            mean, lo, hi = _mean_ci(vals)
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(row[f"{metric}_ci_low"]) == pytest.approx(lo, abs=1e-9)
            assert float(row[f"{metric}_ci_high"]) == pytest.approx(hi, abs=1e-9)
            assert float(row[f"{metric}_std"]) == pytest.approx(statistics.stdev(vals), abs=1e-12)
        if method == "adam":
            assert row["answer_nll_diff_mean"] == "" and row["vs_adam"] == "reference"
            continue
        mine = [_value("gsm8k", method, s, "metrics", "answer_nll", **GSM8K_REF) for s in MAIN_SEEDS]
        diffs = [a - b for a, b in zip(mine, adam)]
        d, lo, hi = _mean_ci(diffs)
        assert float(row["answer_nll_diff_mean"]) == pytest.approx(d, abs=1e-12)
        assert float(row["answer_nll_diff_ci_low"]) == pytest.approx(lo, abs=1e-9)
        assert float(row["answer_nll_diff_ci_high"]) == pytest.approx(hi, abs=1e-9)
        separated = lo > 0 or hi < 0
        line = _md_line(md, f"| {method} |")
        assert ("†" in line) == separated, method
        assert row["vs_adam"] == ("yes: worse than adam" if separated and d > 0 else
                                  "yes: better than adam" if separated else "no: 95% interval includes 0")
    # the fixture was built so that both verdicts occur
    assert rows["ldadam"]["vs_adam"].startswith("no") and rows["oasis"]["vs_adam"] == "yes: worse than adam"


def test_paired_table_reports_step0_and_changes(built):
    out, *_ = built
    rows = [r for r in _csv(out / "table1_paired_gsm8k_cpu.csv") if r["method"] == "oasis"
            and r["metric"] == "final_answer_acc_tf"]
    assert len(rows) == 1
    after = [_value("gsm8k", "oasis", s, "metrics", "final_answer_acc_tf", **GSM8K_REF) for s in MAIN_SEEDS]
    before = [_value("gsm8k", "oasis", s, "metrics", "step0", "final_answer_acc_tf", **GSM8K_REF)
              for s in MAIN_SEEDS]
    change, lo, hi = _mean_ci([a - b for a, b in zip(after, before)])
    assert float(rows[0]["change_mean"]) == pytest.approx(change, abs=1e-12)
    assert float(rows[0]["change_ci_low"]) == pytest.approx(lo, abs=1e-9)
    assert float(rows[0]["step0_mean"]) == pytest.approx(statistics.fmean(before), abs=1e-12)
    step0 = _md_line(out / "table1_main_gsm8k_cpu.md", "| before training (step 0) |")
    assert "2.450" in step0 and "18.75" in step0


def _copy_fixtures(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(FIXTURES, results)
    return results


def _extra_seed(results: Path, method: str, seed: int, nll_shift: float):
    """A new ok seed for one method: a copy of its seed-0 record with another seed and other numbers."""
    src = next(p for p, rec in _fixture_records(suite="gsm8k", method=method, status="ok")
               if rec["config"]["seed"] == 0 and "fresh" not in p.parts
               and all(rec["config"].get(k, v) == v for k, v in GSM8K_REF.items()))
    rec = json.loads(src.read_text())
    rec["config"]["seed"] = seed
    text = json.dumps(rec["config"], sort_keys=True, separators=(",", ":"))
    rec["config_hash"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    rec["run_id"] = f"fixture-gsm8k-cpu-{method}-{rec['config_hash'][:10]}"
    rec["metrics"]["answer_nll"] += nll_shift
    rec["metrics"]["final_answer_acc_tf"] = 1.0
    rec["metrics"]["step0"]["answer_nll"] += 1.0
    rec["memory"]["peak_bytes"] += 10 * 2**20
    (results / "gsm8k" / f"{rec['run_id']}.json").write_text(json.dumps(rec))


def _comparison_tables(results: Path) -> tuple[dict[str, str], str]:
    """The matched-seed tables of a results folder as text (no figures: this is about numbers), and the
    seed-set notes MISSING.md would list."""
    from reports.compare import compare
    from reports.tables import breakdown_table, main_table, paired_table, sweep_table

    comp = {c.where: c for c in compare(group_runs(load(results).runs))}["gsm8k/cpu"]
    tables = [main_table(comp)[0], paired_table(comp), breakdown_table([comp])]
    tables += [sweep_table(key, key, comp, key, ["answer_nll", "accuracy"]) for key in comp.sweeps]
    return {t.name: t.to_markdown() + t.to_csv() for t in tables}, "\n".join(comp.seed_notes)


def test_an_extra_seed_for_one_method_cannot_shift_any_row(tmp_path):
    """oasis has seed 3 in the fixtures, nobody else does; removing it, or giving adam an extra seed 7 with
    wild numbers, leaves every main-table row and every ablation point byte for byte the same."""
    results = tmp_path / "results"
    shutil.copytree(FIXTURES / "gsm8k", results / "gsm8k")
    committed, notes = _comparison_tables(results)
    assert "seed 3 left out of every main-table row" in notes
    for p in (results / "gsm8k").glob("*oasis*.json"):
        rec = json.loads(p.read_text())
        if rec["config"]["seed"] == 3:
            p.unlink()
    without, notes = _comparison_tables(results)
    assert "seed 3" not in notes
    _extra_seed(results, "adam", 7, nll_shift=5.0)
    extra, notes = _comparison_tables(results)
    assert "seed 7 left out of every main-table row" in notes
    assert set(committed) == set(without) == set(extra) and len(committed) == 5
    for name in committed:
        assert committed[name] == without[name] == extra[name], name


def test_mismatched_seed_sets_are_listed_never_pooled(built):
    out, *_ = built
    missing = (out / "MISSING.md").read_text()
    assert ("gsm8k/cpu: seed 3 left out of every main-table row and ablation point: adam, lora, galore, "
            "ldadam, pca lack(s) an ok run for it (present for oasis)") in missing
    assert "rank ablation, lora at rank=8 dropped: no run for seed(s) 2" in missing
    rank = _csv(out / "table3_rank_ablation_gsm8k_cpu.csv")
    assert ("lora", "8") not in {(r["method"], r["rank"]) for r in rank}
    assert {r["seeds"] for r in rank} == {"0 1 2"}
    # the ablation's reference point is the main table's row
    main = _rows(out / "table1_main_gsm8k_cpu.csv")["oasis"]
    ref = next(r for r in rank if (r["method"], r["rank"]) == ("oasis", "32"))
    for k in ("answer_nll_mean", "answer_nll_ci_low", "accuracy_mean", "answer_nll_diff_mean"):
        assert ref[k] == main[k], k
    # a diverged point keeps its place (all three seeds ran) but has no mean
    lr = _csv(out / "table4_subspace_lr_gsm8k_cpu.csv")
    assert [float(r["subspace_lr"]) for r in lr] == [1e-4, 1e-2, 0.1, 1.0, 100.0]
    assert lr[-1]["status"] == "diverged 3/3" and lr[-1]["answer_nll_n"] == "0"


def test_records_of_different_bases_are_never_pooled(built):
    """c4 galore seed 1 exists twice with different env.base_checksum: neither is used, so the c4 table
    falls back to the seeds every method still has (0, 2), and the conflict is reported."""
    out, *_ = built
    rows = _rows(out / "table1_main_c4_cpu.csv")
    assert {r["seeds"] for r in rows.values()} == {"0 2"}
    vals = [_value("c4", "oasis", s, "metrics", "eval_loss") for s in (0, 2)]
    assert float(rows["oasis"]["eval_loss_mean"]) == pytest.approx(statistics.fmean(vals), abs=1e-12)
    repro = (out / "MISSING.md").read_text().split("## Reproducibility")[1].split("\n## ")[0]
    line = next(x for x in repro.splitlines() if "c4/cpu galore seed 1" in x)
    assert "0d9e8f7a6b5c4d3e" in line and "9c0ffee15bad5eed" in line and "never pooled" in line
    assert "c4/fresh/" in line


def test_reproducibility_section_names_files_and_values(built):
    out, *_ = built
    repro = (out / "MISSING.md").read_text().split("## Reproducibility")[1].split("\n## ")[0]
    fresh = json.loads(next((FIXTURES / "gsm8k" / "fresh").glob("*pca*.json")).read_text())
    old = json.loads((FIXTURES / "gsm8k" / f"{fresh['run_id']}.json").read_text())
    line = next(x for x in repro.splitlines() if "gsm8k/cpu pca seed 0" in x)
    assert "NOT reproduced" in line
    assert f"{fresh['metrics']['answer_nll']:.7g}" in line and f"{old['metrics']['answer_nll']:.7g}" in line
    assert str(fresh["memory"]["peak_bytes"]) in line and str(old["memory"]["peak_bytes"]) in line
    assert f"gsm8k/fresh/{fresh['run_id']}.json" in line and f"gsm8k/{fresh['run_id']}.json" in line
    assert "tokens_per_s" not in line  # speed is not a reproducibility criterion
    agree = next(x for x in repro.splitlines() if "gsm8k/cpu adam seed 1" in x)
    assert "reproduced" in agree and "NOT" not in agree


def test_float_noise_is_not_a_reproducibility_problem():
    from reports.load import differences

    rec = json.loads(next((FIXTURES / "gsm8k" / "fresh").glob("*adam*.json")).read_text())
    noisy = json.loads(json.dumps(rec))
    noisy["metrics"]["answer_nll"] *= 1 + 5e-7
    assert differences(Run("a.json", rec), Run("b.json", noisy)) == []
    noisy["metrics"]["answer_nll"] *= 1 + 5e-6
    assert len(differences(Run("a.json", rec), Run("b.json", noisy))) == 1
    one_byte = json.loads(json.dumps(rec))
    one_byte["memory"]["breakdown"]["other"] += 1
    assert differences(Run("a.json", rec), Run("b.json", one_byte)) == [
        f"memory.breakdown.other {rec['memory']['breakdown']['other']} (`a.json`) vs "
        f"{one_byte['memory']['breakdown']['other']} (`b.json`)"]


def test_speeds_from_two_machines_are_not_pooled(built):
    out, *_ = built
    rows = _rows(out / "table1_main_gsm8k_cpu.csv")
    assert rows["galore"]["tokens_per_s_mean"] == "" and rows["galore"]["tokens_per_s_n"] == "0"
    assert _md_line(out / "table1_main_gsm8k_cpu.md", "| galore |").split(" | ")[12] == "–"
    speeds = [_value("gsm8k", "adam", s, "speed", "tokens_per_s", **GSM8K_REF) for s in MAIN_SEEDS]
    assert float(rows["adam"]["tokens_per_s_mean"]) == pytest.approx(statistics.fmean(speeds))
    missing = (out / "MISSING.md").read_text()
    assert ("tokens/s of galore not shown: seed(s) 0,1 on machine 3f2a9c1b7e40; seed(s) 2 on machine "
            "a81c0e5d92f7") in missing


def test_smoke_records_never_reach_tables_or_figures(built):
    out, result, *_ = built
    (path, smoke), = _fixture_records(profile="smoke")
    rel = path.relative_to(FIXTURES).as_posix()
    assert f"skipped `{rel}`: smoke profile" in (out / "MISSING.md").read_text()
    for p in out.iterdir():
        assert "smoke" not in p.name
        if p.suffix in (".md", ".csv", ".tex") and p.name != "MISSING.md":
            assert smoke["config_hash"] not in p.read_text(), p.name
    # the adam rows hold exactly the three cpu seeds
    assert _rows(out / "table1_main_gsm8k_cpu.csv")["adam"]["config_hashes"].count(" ") == 2


def test_honest_metric_names_and_metrics_that_move(built):
    out, *_ = built
    c4 = (out / "table1_main_c4_cpu.md").read_text()
    assert "held-out loss on wikipedia-en validation, trained on wikipedia-en train" in c4
    assert "C4 sample (1,000 train-split docs, never trained on)" in c4
    assert "C4 validation" not in c4
    gsm = (out / "table1_main_gsm8k_cpu.md").read_text()
    header = gsm.splitlines()[2]
    for label in ("GSM8K accuracy, strict match (%)", "final-answer accuracy, teacher-forced (%)",
                  "answer NLL (nats/token)", "evaluated on"):
        assert label in header
    assert "generation ceiling 59%" in _md_line(out / "table1_main_gsm8k_cpu.md", "| adam |")


def test_published_numbers_are_cited_only_for_the_same_evaluation_set(built):
    from reports import published as pub

    out, *_ = built
    c4 = _rows(out / "table1_main_c4_cpu.csv")
    assert c4["galore"]["published"] == ""  # llama-60m, but evaluated on Wikipedia, not C4 validation
    assert "not comparable" in (out / "table1_main_c4_cpu.md").read_text()
    hits = pub.lookup("c4", "llama-60m", "galore", "eval_ppl", "c4-en validation")
    assert [p.value for p in hits] == [34.88]
    assert pub.lookup("c4", "llama-60m", "galore", "eval_ppl", "wikipedia-en validation") == []
    assert pub.lookup("c4", "llama-60m", "galore", "c4_sample_ppl", "c4-en validation") == []
    assert "arXiv:2403.03507" in (out / "published_c4.md").read_text()
    assert "[TEST FIXTURE DATA - NOT RESULTS]" in (out / "table1_main_gsm8k_cpu.md").read_text()


def test_older_records_still_load_and_are_named(built):
    out, *_ = built
    runs = [r for r in _csv(out / "runs_gsm8k_cpu.csv")
            if r["method"] == "oasis" and r["update_every"] == "4"]
    assert len(runs) == 1 and runs[0]["seeds"] == "0" and runs[0]["answer_nll_n"] == "1"
    (path, _), = [(p, r) for p, r in _fixture_records(suite="gsm8k", method="oasis")
                  if r["config"].get("update_every") == 4]
    older = (out / "MISSING.md").read_text().split("## Older records")[1].split("\n## ")[0]
    rel = path.relative_to(FIXTURES).as_posix()
    for field in ("config.base_seed", "env.base_checksum", "env.machine", "metrics.final_answer_acc_tf",
                  "metrics.step0"):
        assert any(f"`{field}`" in line and rel in line for line in older.splitlines()), field


def test_legacy_c4_names_are_labelled_for_what_they_are():
    from reports.style import metric_label

    assert "not C4 validation" in metric_label("c4_eval_loss")
    assert metric_label("eval_loss") == "held-out loss (nats/token)"  # no corpora recorded: no claim
    assert metric_label("eval_loss", ("wikipedia-en train", "wikipedia-en validation")) == (
        "held-out loss on wikipedia-en validation, trained on wikipedia-en train (nats/token)")


def test_t_quantile_matches_tables_and_closed_forms():
    from reports.stats import t_critical, t_quantile

    for dof, t in T975.items():
        assert t_quantile(0.975, dof) == pytest.approx(t, rel=1e-9)
        assert t_critical(dof + 1) == pytest.approx(t, rel=1e-9)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)  # the normal limit
    for p in (0.6, 0.9, 0.995, 0.025):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_critical(1) is None


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from reports.stats import t_quantile

    for dof in (1, 2, 3, 5, 7, 12, 30, 31, 60, 250):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, dof) == pytest.approx(stats.t.ppf(p, dof), rel=1e-9)


def test_two_builds_give_identical_outputs(built, tmp_path):
    out, *_ = built
    _build(FIXTURES, tmp_path)
    first = sorted(p.name for p in out.iterdir())
    assert first == sorted(p.name for p in tmp_path.iterdir())
    for name in first:
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
        config = {"suite": "c4", "profile": "cpu", "method": method, "rank": rank, "seed": seed}
        rec = {"schema": "x", "run_id": f"{method}-{rank}-{seed}", "suite": "c4", "profile": "cpu",
               "method": method, "status": "ok", "config": config, "config_hash": f"{method}{rank}{seed}"}
        return Run(f"{method}-{rank}-{seed}.json", rec)

    runs = [run("adam", 8), run("oasis", 8), run("oasis", 8, seed=1)] + [run("pca", r) for r in (4, 8, 16)]
    ref = {g.method: g for g in reference_groups(group_runs(runs))}
    assert ref["pca"].config["rank"] == 8  # each pca rank once: the rank every other method uses wins
    assert len(ref["oasis"].runs) == 2     # two seeds, one configuration


def test_fixtures_follow_the_harness_record_schema():
    """Every well-formed fixture passes the harness's own validator (schema, keys, config_hash)."""
    from suites.core.records import validate_record

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
    assert checked >= 60


def test_memcheck_baseline_and_memory_summary_are_not_reported_as_malformed(tmp_path):
    (tmp_path / "memory").mkdir()
    baseline = {"tolerance": 0.01, "peaks": {}, "claims": []}
    (tmp_path / "memory" / "baseline.json").write_text(json.dumps(baseline))
    (tmp_path / "memory" / "summary.json").write_text(json.dumps({"before": {}, "after": {}}))
    (tmp_path / "memory" / "junk.json").write_text(json.dumps({"hello": 1}))
    loaded = load(tmp_path)
    assert [path for path, _ in loaded.skipped] == ["memory/junk.json"]


def test_seeds_are_one_configuration_but_base_seed_is_not():
    from reports.load import config_key

    a = {"model": "llama-mini", "base_steps": 300, "seed": 0, "base_seed": 0, "base_hash": "aaa", "lr": 1e-3}
    b = {**a, "seed": 1, "base_hash": "bbb"}
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key({**b, "base_steps": 200})
    assert config_key(a) != config_key({**a, "base_seed": 1})


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


def test_other_tools_outputs_are_not_called_broken_records(tmp_path):
    """results/speed (suites.speed, suites.opcheck) and results/oja (tools/oja_study.py) hold other tools'
    JSON; a non-record anywhere else is still named as skipped."""
    for rel, doc in (("speed/smollm2-135m.json", {"config": {"kind": "estimate"}, "results": []}),
                     ("speed/opcheck-baseline.json", {"counts": {}, "history": []}),
                     ("oja/train.json", {"note": "", "runs": []}),
                     ("runs/stray.json", {"note": ""})):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(doc))
    assert [name for name, _ in load(tmp_path).skipped] == ["runs/stray.json"]


def test_check_fails_when_the_built_reports_are_stale(tmp_path, capsys):
    from reports.build import main

    out = tmp_path / "out"
    args = ["--results", str(FIXTURES), "--out", str(out)]
    assert main(args) == 0
    assert main([*args, "--check"]) == 0
    table = out / "table1_main_gsm8k_cpu.md"
    table.write_text(table.read_text() + "\nedited by hand\n")
    (out / "INDEX.md").unlink()
    (out / "extra.md").write_text("no longer built\n")
    capsys.readouterr()
    assert main([*args, "--check"]) == 1
    printed = capsys.readouterr().out
    assert "differs: table1_main_gsm8k_cpu.md" in printed and "missing: INDEX.md" in printed
    assert "not built any more: extra.md" in printed


def test_models_are_named_by_preset_hub_id_or_file_name():
    from reports.load import model_label

    assert model_label(".devdata/smollm2-135m.config.json") == "smollm2-135m.config.json"
    assert model_label("/data/models/smollm2-135m-instruct-q4_1/model.gguf") == "model.gguf"
    assert model_label("../shared/data/models/smollm2") == "smollm2"
    assert model_label("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert model_label("llama-2-7b") == "llama-2-7b"
