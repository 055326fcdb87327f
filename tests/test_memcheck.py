"""suites.memcheck: passes on its own measurement; fails when a peak grows or falls beyond tolerance or a
claim breaks; `--update` needs a reason, records it, and checks the baseline can be written before measuring.

Tests of the comparison reuse one real measurement of the smoke config (`remeasured`); the command line, the
pool and `--update` measure for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suites import memcheck
from suites.core.cli import cli_main

SMOKE = {"kind": "cpu", "batch": 2, "seq": 16, "rank": 4, "dtype": "fp32", "methods": ["adam", "lora"]}
REPO = Path(__file__).resolve().parent.parent


def run(argv) -> int:
    """The command as `python -m suites.memcheck` runs it (usage errors -> exit 2)."""
    return cli_main(memcheck.PROG, memcheck.main, argv)


@pytest.fixture(scope="module", autouse=True)
def micro_model(tmp_path_factory):
    """A llama-tiny with a 512-token vocabulary, as a config.json: each measurement takes ~1 s."""
    from suites.train.models import llama_config

    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(llama_config("llama-tiny", vocab_size=512).to_json_string())
    SMOKE["model"] = str(path)


@pytest.fixture(scope="module")
def measured(micro_model):
    return memcheck.measure_all({"smoke": SMOKE}, log=lambda _: None)


@pytest.fixture
def remeasured(measured, monkeypatch):
    """memcheck gets the smoke peaks `measured` got (measuring is deterministic) without the minutes."""
    real = memcheck.measure_all

    def measure_all(configs, *args, **kwargs):
        if configs == {"smoke": SMOKE}:
            return json.loads(json.dumps(measured))
        return real(configs, *args, **kwargs)
    monkeypatch.setattr(memcheck, "measure_all", measure_all)


def _write(tmp_path, peaks, claims=(), tolerance=0.01, history=()):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": tolerance, "configs": {"smoke": SMOKE}, "claims": list(claims),
                                "peaks": peaks, "history": list(history)}))
    return path


def _scaled(peaks, **factors):
    return {"smoke": {m: int(b * factors.get(m, 1.0)) for m, b in peaks["smoke"].items()}}


def test_passes_against_its_own_measurement(tmp_path, measured, capsys):
    path = _write(tmp_path, measured)
    assert run(["--baseline", str(path), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["config", "method", "baseline", "MiB", "measured", "MiB", "change", "verdict"]
    assert out.rstrip().splitlines()[-1].startswith("memcheck OK: 2 peaks within 1%")


def test_the_command_fails_when_the_baseline_is_10_percent_above_today(tmp_path, measured):
    """`python -m suites.memcheck --baseline PATH`, as CI runs it: peaks 9% below the baseline fail."""
    path = _write(tmp_path, _scaled(measured, adam=1.10, lora=1.10))
    done = subprocess.run([sys.executable, "-m", "suites.memcheck", "--baseline", str(path), "--jobs", "1"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "OASIS_THREADS": "1"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FELL" in done.stdout and "--update --reason" in done.stdout
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("factor, code", [(1.10, 1), (0.90, 1), (1.005, 0), (1 / 1.005, 0)])
def test_fails_both_ways_and_passes_within_tolerance(tmp_path, measured, remeasured, factor, code):
    path = _write(tmp_path, _scaled(measured, adam=factor, lora=factor))
    assert run(["--baseline", str(path), "--jobs", "1", "--quiet"]) == code


@pytest.mark.parametrize("factor, verdict", [(0.97, "GREW"), (1.03, "FELL")])
def test_a_peak_beyond_tolerance_either_way_fails_naming_method_and_change(tmp_path, measured, remeasured,
                                                                         capsys, factor, verdict):
    path = _write(tmp_path, _scaled(measured, lora=factor))
    assert run(["--baseline", str(path), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    (lora,) = [line.split() for line in out.splitlines() if line.startswith("smoke ") and " lora " in line]
    (adam,) = [line.split() for line in out.splitlines() if line.startswith("smoke ") and " adam " in line]
    assert lora[-1] == verdict and lora[-2] == f"{1 / factor - 1:+.2%}"
    assert adam[-1] == "ok"
    assert "memcheck FAIL: 1 " in out


def test_tolerance_is_the_limit_both_ways(tmp_path, measured, remeasured, capsys):
    path = _write(tmp_path, _scaled(measured, adam=1 / 1.009, lora=1 / 0.991))  # +0.9% and -0.9%
    assert run(["--baseline", str(path), "--jobs", "1"]) == 0
    path = _write(tmp_path, _scaled(measured, adam=1 / 1.009), tolerance=0.005)
    assert run(["--baseline", str(path), "--jobs", "1"]) == 1


def test_a_method_missing_from_the_baseline_fails(tmp_path, measured, remeasured, capsys):
    path = _write(tmp_path, {"smoke": {"adam": measured["smoke"]["adam"]}})
    assert run(["--baseline", str(path), "--jobs", "1"]) == 1
    assert "1 not in the baseline" in capsys.readouterr().out


def test_claims_print_measured_claimed_and_target(tmp_path, measured, remeasured, capsys):
    ratio = measured["smoke"]["lora"] / measured["smoke"]["adam"]
    assert ratio > 0.5  # a tiny model: embeddings and activations dominate, LoRA saves little
    claim = {"config": "smoke", "method": "lora", "versus": ["adam"], "max": 0.5, "target": 0.4}
    assert run(["--baseline", str(_write(tmp_path, measured, claims=[claim])), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if "lora / adam" in line]
    assert f"{ratio:.3f}" in line and "<= 0.5" in line and "<= 0.4" in line and "BROKEN" in line

    claim.update(max=1.0, target=0.5)   # holds; the target is not met
    assert run(["--baseline", str(_write(tmp_path, measured, claims=[claim])), "--jobs", "1"]) == 0
    assert "holds; target not met yet" in capsys.readouterr().out
    claim.update(max=1.0, target=round(ratio + 0.01, 2))  # target met: the claim can be tightened
    assert run(["--baseline", str(_write(tmp_path, measured, claims=[claim])), "--jobs", "1"]) == 0
    assert f"tighten max to {claim['target']}" in capsys.readouterr().out


def test_update_needs_a_reason_and_records_it(tmp_path, measured, remeasured, capsys):
    earlier = {"date": "2026-01-01T00:00:00Z", "commit": "abc", "reason": "first", "changed": {}}
    path = _write(tmp_path, {"smoke": {"adam": 1, "lora": measured["smoke"]["lora"]}}, history=[earlier])
    assert run(["--baseline", str(path), "--update"]) == 2
    assert "--update needs --reason" in capsys.readouterr().err
    assert run(["--baseline", str(path), "--reason", "x"]) == 2

    argv = ["--baseline", str(path), "--update", "--reason", "  meter fixed  ", "--quiet", "--jobs", "1"]
    assert run(argv) == 0
    data = json.loads(path.read_text())
    assert data["peaks"] == measured
    assert data["configs"] == {"smoke": SMOKE} and data["tolerance"] == 0.01 and data["claims"] == []
    assert data["history"][0] == earlier
    entry = data["history"][1]
    assert entry["reason"] == "meter fixed" and entry["date"].endswith("Z")
    assert entry["changed"] == {"smoke/adam": [1, measured["smoke"]["adam"]]}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    assert entry["commit"].removesuffix("+dirty") == head.strip()
    assert run(["--baseline", str(path), "--jobs", "1"]) == 0


def _no_measuring(*args, **kwargs):
    raise AssertionError("measured although the baseline cannot be written")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any file")
@pytest.mark.parametrize("locked", ["file", "folder"])
def test_update_checks_the_baseline_can_be_written_before_measuring(tmp_path, measured, monkeypatch, capsys,
                                                                   locked):
    monkeypatch.setattr(memcheck, "measure_all", _no_measuring)
    path = _write(tmp_path, measured)
    before = path.read_text()
    (path if locked == "file" else tmp_path).chmod(0o444 if locked == "file" else 0o555)
    try:
        assert run(["--baseline", str(path), "--update", "--reason", "x"]) == 2
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m suites.memcheck: error: ") and "not writable" in err and "\n" not in err
    assert path.read_text() == before


def test_update_checks_before_measuring_also_as_root(tmp_path, measured, monkeypatch, capsys):
    """Root writes anywhere, so the refusal the file system would give a user is simulated for this file."""
    from suites.core import files

    monkeypatch.setattr(memcheck, "measure_all", _no_measuring)
    path = _write(tmp_path, measured)
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if Path(p) == path and mode & os.W_OK
                        else real_access(p, mode))
    assert run(["--baseline", str(path), "--update", "--reason", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m suites.memcheck: error: --baseline ") and "not writable" in err
    assert "\n" not in err


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    (json.dumps({"tolerance": 0.05, "configs": {}}), "tolerance must be"),
    (json.dumps({"tolerance": 0.01, "configs": {"x": {"model": "llama-tiny", "methods": ["adam"], "lr": 1}}}),
     "only keys"),
    (json.dumps({"tolerance": 0.01, "configs": {"x": {"model": "llama-tiny", "methods": ["adam"]}},
                 "claims": [{"config": "x", "method": "oasis", "versus": ["adam"], "max": 0.5}]}),
     "malformed claim"),
    (json.dumps({"tolerance": 0.01, "configs": {"x": {"model": "llama-tiny", "methods": ["nosuch"]}}}),
     "unknown method"),
    (json.dumps({"tolerance": 0.01, "configs": {"x": {"model": "llama-huge", "methods": ["adam"]}}}),
     "unknown model"),
])
def test_usage_errors_exit_2_in_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    assert run(["--baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_a_pool_gives_the_same_peaks(measured):
    assert memcheck.measure_all({"smoke": SMOKE}, log=lambda _: None, jobs=2) == measured


def test_committed_baseline_is_well_formed_and_states_what_the_readme_states():
    data = memcheck.load_baseline(memcheck.DEFAULT_BASELINE)
    assert data["tolerance"] <= 0.01
    for name, cfg in data["configs"].items():
        assert set(cfg["methods"]) <= set(data["peaks"][name])
    readme = (REPO / "README.md").read_text()
    for claim in data["claims"]:
        # a claim is the number the project states, not a tripwire: the README says it, and its target
        assert "target" in claim
        assert f"{claim['max']:.2f}" in readme and f"{claim['target']:.2f}" in readme, claim
    for entry in data["history"]:
        assert entry["reason"].strip() and entry["date"] and "changed" in entry
