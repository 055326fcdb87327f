"""suites.opcheck: passes on its own counts; a count grown beyond 2% fails (exit 1); a count fallen beyond 2%
fails until `--update --reason` records it; a change within 2% passes; bad input exits 2.

The comparison tests reuse one real count of a small config (`recounted`: counting is deterministic under
FakeTensorMode); one test runs the command in its own process, as CI does, and `--update` counts for real."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suites import opcheck
from suites.core.cli import cli_main

REPO = Path(__file__).resolve().parent.parent
SMALL = {"batch": 1, "seq": 8, "rank": 4, "dtype": "bf16", "methods": ["adam", "oasis"]}


def run(argv) -> int:
    """The command as `python -m suites.opcheck` runs it (usage errors -> exit 2)."""
    return cli_main(opcheck.PROG, opcheck.main, argv)


@pytest.fixture(scope="module", autouse=True)
def micro_model(tmp_path_factory):
    """llama-tiny with a 512-token vocabulary, as a config.json: each count takes about a second."""
    from suites.train.models import llama_config

    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(llama_config("llama-tiny", vocab_size=512).to_json_string())
    SMALL["model"] = str(path)


@pytest.fixture(scope="module")
def counted(micro_model):
    return opcheck.count_all({"small": SMALL}, log=lambda _: None)


@pytest.fixture
def recounted(counted, monkeypatch):
    """opcheck gets the counts `counted` got (counting is deterministic) without counting again."""
    real = opcheck.count_all

    def count_all(configs, *args, **kwargs):
        if configs == {"small": SMALL}:
            return copy.deepcopy(counted)
        return real(configs, *args, **kwargs)
    monkeypatch.setattr(opcheck, "count_all", count_all)


def _write(tmp_path, counts, tolerance=0.02, history=(), configs=None):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": tolerance, "configs": configs or {"small": SMALL},
                                "counts": counts, "history": list(history)}))
    return path


def _scaled(counts, method, metric, factor):
    """The baseline as if `metric` of `method` had been `factor` times today's count."""
    out = copy.deepcopy(counts)
    out["small"][method][metric] = round(out["small"][method][metric] * factor)
    return out


def test_the_counts_are_real_and_oasis_moves_its_bases_with_linalg(counted):
    adam, oasis = counted["small"]["adam"], counted["small"]["oasis"]
    assert adam["ops"] > 100 and oasis["ops"] > adam["ops"]
    assert adam["refresh_ops"] is None  # no period


def test_passes_against_its_own_counts(tmp_path, counted, recounted, capsys):
    assert run(["--baseline", str(_write(tmp_path, counted))]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("opcheck OK: 8 counts within 2%")


def test_growth_beyond_two_percent_fails(tmp_path, counted, recounted, capsys):
    """Today's oasis ops are 5% above the baseline's."""
    assert run(["--baseline", str(_write(tmp_path, _scaled(counted, "oasis", "ops", 1 / 1.05)))]) == 1
    out = capsys.readouterr().out
    assert "GREW" in out and "opcheck FAIL: 1 grew by more than 2%" in out


def test_a_new_host_sync_fails_where_the_baseline_had_none(tmp_path, counted, recounted, capsys):
    baseline = copy.deepcopy(counted)
    today = counted["small"]["adam"]["syncs"]
    baseline["small"]["adam"]["syncs"] = 0
    assert today >= 1  # transformers' attention-mask check reads one value back per forward
    assert run(["--baseline", str(_write(tmp_path, baseline))]) == 1
    assert "GREW" in capsys.readouterr().out


def test_a_change_within_two_percent_passes(tmp_path, counted, recounted):
    baseline = _scaled(counted, "oasis", "ops", 1.015)
    assert baseline["small"]["oasis"]["ops"] != counted["small"]["oasis"]["ops"]
    assert run(["--baseline", str(_write(tmp_path, baseline))]) == 0


def test_a_drop_fails_until_update_records_it_with_a_reason(tmp_path, counted, recounted, capsys):
    """Today's oasis ops are 10% below the baseline's (the batched step landed): exit 1 and the --update hint;
    --update --reason rewrites the counts and keeps the reason; then the check passes."""
    path = _write(tmp_path, _scaled(counted, "oasis", "ops", 1.10), history=[{"reason": "earlier"}])
    assert run(["--baseline", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FELL" in out and '--update --reason "what changed and why"' in out
    assert run(["--baseline", str(path)]) == 1  # still failing: nothing was updated
    assert run(["--baseline", str(path), "--update", "--reason", "batched step"]) == 0
    data = json.loads(path.read_text())
    assert data["counts"] == counted
    assert [h["reason"] for h in data["history"]] == ["earlier", "batched step"]
    assert data["history"][-1]["changed"] == {
        "small/oasis/ops": [round(counted["small"]["oasis"]["ops"] * 1.10), counted["small"]["oasis"]["ops"]]}
    assert run(["--baseline", str(path)]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--update"], "--update needs --reason"),
    (["--update", "--reason", "  "], "--update needs --reason"),
    (["--reason", "why"], "--reason goes with --update"),
    (["--bogus"], "unrecognized arguments"),
])
def test_usage_errors_exit_2_in_one_line(tmp_path, counted, argv, message, capsys):
    path = _write(tmp_path, counted)
    assert run(["--baseline", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert json.loads(path.read_text())["counts"] == counted  # nothing written


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(tolerance=0.5), "tolerance must be a number in [0, 0.05]"),
    (lambda d: d["configs"]["small"].update(methods=["adam", "nosuch"]), "unknown method 'nosuch'"),
    (lambda d: d["configs"]["small"].pop("rank"), "needs model, batch, seq, rank and methods"),
    (lambda d: d["counts"]["small"]["adam"].update(ops=-1), "counts must map"),
])
def test_a_malformed_baseline_exits_2(tmp_path, counted, edit, message, capsys):
    path = _write(tmp_path, counted)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    assert run(["--baseline", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert run(["--baseline", str(tmp_path / "missing.json")]) == 2


def test_the_command_fails_when_a_count_grew(tmp_path, counted):
    """`python -m suites.opcheck --baseline PATH`, as CI runs it, in its own process: exit 1."""
    path = _write(tmp_path, _scaled(counted, "adam", "ops", 0.9))
    done = subprocess.run([sys.executable, "-m", "suites.opcheck", "--baseline", str(path), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "GREW" in done.stdout
