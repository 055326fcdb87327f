"""Provenance in records: the starting weights are fixed by `base_seed` (not the run's `seed`) and named by a
checksum; the machine a speed comes from is named too; the pretrained base is keyed by the code that makes
it."""

import hashlib

import torch

from suites.core import profiles, records
from suites.core.registry import method_defaults
from suites.launch import recipe, runs
from suites.train.models import run_fields


def _config(suite: str, profile: str = "smoke", **overrides) -> dict:
    prof = profiles.profile(suite, profile)
    prof.update(overrides)
    cfg = profiles.resolve(suite, profile, prof, "adam", method_defaults("adam"), "cpu")
    return {**cfg, **run_fields(cfg)}


def _sha256_of_weights(model) -> str:
    """Written from the contract (CONTRACTS.md), not from records.weights_checksum."""
    h = hashlib.sha256()
    for name in sorted(model.state_dict()):
        t = model.state_dict()[name]
        if t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            h.update(name.encode())
            h.update(bytes(t.contiguous().view(torch.uint8).flatten().tolist()))
    return h.hexdigest()[:16]


def test_run_seeds_share_the_starting_weights_that_base_seed_fixes(one_thread):
    a = recipe.setup({"config": _config("c4", seed=0)})
    b = recipe.setup({"config": _config("c4", seed=1)})
    c = recipe.setup({"config": _config("c4", seed=0, base_seed=1)})
    assert a.base_checksum == b.base_checksum != c.base_checksum
    fresh = recipe.build_model(_config("c4", seed=5), None)
    assert a.base_checksum == _sha256_of_weights(fresh)
    # the run's seed still orders the data
    assert not torch.equal(a.batches[0]["input_ids"], b.batches[0]["input_ids"])


def test_records_name_the_machine_and_the_base():
    env = records.make_record(_config("c4"), status="ok", started_at="t", wall_s=0.0,
                              base_checksum="0123456789abcdef")["env"]
    assert env["base_checksum"] == "0123456789abcdef"
    assert env["machine"] == hashlib.sha256(env["machine_desc"].encode()).hexdigest()[:12]
    assert "torch" in env["machine_desc"] and "cores" in env["machine_desc"]


def test_the_base_is_keyed_by_its_seed_and_code_not_by_the_run_seed(tmp_path, monkeypatch):
    cfg = _config("gsm8k", "cpu")
    assert cfg["base"] == "c4"
    key = records.config_hash(runs.base_config(cfg))
    assert records.config_hash(runs.base_config({**cfg, "seed": 7})) == key
    assert records.config_hash(runs.base_config({**cfg, "base_seed": 7})) != key
    # a change to what the code does changes the key; a comment does not
    copies = []
    for path in runs.BASE_CODE:
        copy = tmp_path / path.name
        copy.write_text(path.read_text())
        copies.append(copy)
    monkeypatch.setattr(runs, "BASE_CODE", tuple(copies))
    assert records.config_hash(runs.base_config(cfg)) == key
    copies[0].write_text(copies[0].read_text() + "\n# a comment\n")
    assert records.config_hash(runs.base_config(cfg)) == key
    copies[0].write_text(copies[0].read_text() + "\nEXTRA = 1\n")
    assert records.config_hash(runs.base_config(cfg)) != key


def test_git_commit_is_dirty_for_code_but_not_for_the_tools_outputs(tmp_path, monkeypatch):
    import subprocess

    from suites.core import records

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "reports" / "out").mkdir(parents=True)
    for name in ("code.py", "results/run.json", "reports/out/table.md", "reports/build.py"):
        (tmp_path / name).write_text("0")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path)
    assert records.git_commit() == head
    (tmp_path / "results" / "run.json").write_text("1")
    (tmp_path / "reports" / "out" / "table.md").write_text("1")
    assert records.git_commit() == head  # outputs written by the tools
    (tmp_path / "reports" / "build.py").write_text("1")
    assert records.git_commit() == head + "+dirty"  # code beside the outputs
    (tmp_path / "reports" / "build.py").write_text("0")
    (tmp_path / "code.py").write_text("1")
    assert records.git_commit() == head + "+dirty"


def test_a_record_names_the_commit_its_run_started_from(tmp_path, monkeypatch, one_thread):
    """A checkout that changes while a long run trains (a later commit, an edit) does not rename the code
    the run imported at its start."""
    states = iter(["aaaa", "bbbb+dirty"])
    monkeypatch.setattr(records, "git_commit", lambda: next(states, "bbbb+dirty"))
    rec = recipe.run({"config": _config("c4"), "out_dir": str(tmp_path), "position": 0})
    assert rec["status"] == "ok", rec["error"]
    assert rec["env"]["git_commit"] == "aaaa"
