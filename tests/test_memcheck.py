"""suites.memcheck: passes on its own measurement, fails on a tightened baseline or a broken claim."""

import json

import pytest

from suites import memcheck

SMOKE = {"kind": "cpu", "batch": 2, "seq": 16, "rank": 4, "dtype": "fp32", "methods": ["adam", "lora"]}


@pytest.fixture(scope="module", autouse=True)
def micro_model(tmp_path_factory):
    """A llama-tiny with a 512-token vocabulary, as a config.json: each measurement takes ~1 s."""
    from suites.models import llama_config

    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(llama_config("llama-tiny", vocab_size=512).to_json_string())
    SMOKE["model"] = str(path)


@pytest.fixture(scope="module")
def measured(micro_model):
    return memcheck.measure_all({"smoke": SMOKE}, log=lambda _: None)


def _write(tmp_path, peaks, claims=(), tolerance=0.01):
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": tolerance, "configs": {"smoke": SMOKE}, "claims": list(claims),
                                "peaks": peaks}))
    return path


def test_passes_against_its_own_measurement(tmp_path, measured, capsys):
    path = _write(tmp_path, measured)
    assert memcheck.main(["--baseline", str(path)]) == 0
    assert "memcheck OK" in capsys.readouterr().out


def test_a_tightened_baseline_fails_naming_method_and_size(tmp_path, measured, capsys):
    tight = json.loads(json.dumps(measured))
    tight["smoke"]["lora"] = int(tight["smoke"]["lora"] * 0.97)  # as if lora used to need 3% less
    path = _write(tmp_path, tight)
    assert memcheck.main(["--baseline", str(path)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION smoke/lora" in out and "+3.0" in out
    assert "smoke/adam" not in out.replace("improved", "")


def test_growth_within_tolerance_passes_and_a_drop_is_reported(tmp_path, measured, capsys):
    peaks = json.loads(json.dumps(measured))
    peaks["smoke"]["adam"] = int(peaks["smoke"]["adam"] / 1.005)   # grew by 0.5%: within 1%
    peaks["smoke"]["lora"] = int(peaks["smoke"]["lora"] * 1.10)    # fell
    path = _write(tmp_path, peaks)
    assert memcheck.main(["--baseline", str(path)]) == 0
    assert "improved   smoke/lora" in capsys.readouterr().out


def test_broken_claim_fails(tmp_path, measured, capsys):
    claim = {"config": "smoke", "method": "lora", "versus": ["adam"], "max": 0.5}
    path = _write(tmp_path, measured, claims=[claim])
    ratio = measured["smoke"]["lora"] / measured["smoke"]["adam"]
    assert ratio > 0.5  # a tiny model: embeddings and activations dominate, LoRA saves little
    assert memcheck.main(["--baseline", str(path)]) == 1
    assert "CLAIM BROKEN smoke: lora / adam" in capsys.readouterr().out
    claim["max"] = 1.0
    path = _write(tmp_path, measured, claims=[claim])
    assert memcheck.main(["--baseline", str(path)]) == 0


def test_update_rewrites_peaks_and_keeps_the_rest(tmp_path, measured):
    path = _write(tmp_path, {"smoke": {"adam": 1, "lora": 1}})
    assert memcheck.main(["--baseline", str(path), "--update", "--quiet"]) == 0
    data = json.loads(path.read_text())
    assert data["peaks"] == measured
    assert data["configs"] == {"smoke": SMOKE} and data["tolerance"] == 0.01


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    (json.dumps({"tolerance": 0.05, "configs": {}}), "tolerance must be"),
    (json.dumps({"tolerance": 0.01, "configs": {"x": {"model": "llama-tiny", "methods": ["adam"], "lr": 1}}}),
     "only keys"),
])
def test_usage_errors_exit_2(tmp_path, capsys, content, needle):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    assert memcheck.main(["--baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_committed_baseline_is_well_formed():
    data = memcheck.load_baseline(memcheck.DEFAULT_BASELINE)
    assert data["tolerance"] <= 0.01
    for name, cfg in data["configs"].items():
        assert set(cfg["methods"]) <= set(data["peaks"][name])
