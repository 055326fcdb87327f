"""End-to-end tests of the harness (`python -m suites.run`) on the smoke profile.

Runs are real: real llama-tiny, real offline data and tokenizer, real optimizers from the registry,
each run in its own process. The c4 suite is used where the suite does not matter (it needs no
generation, so it is the fastest); one test goes through the gsm8k suite and lm-eval.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from suites import run as cli
from suites.core import profiles, records
from suites.launch import runs, sweep

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OASIS_NO_PROGRESS": "1",
}


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "suites.run", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def only_record(out: Path) -> dict:
    recs = records.load_records(out)
    assert len(recs) == 1, [r["run_id"] for r in recs]
    return recs[0]


@pytest.fixture(scope="module")
def adam_c4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("adam_c4")
    proc = run_cli("c4", "--profile", "smoke", "--methods", "adam", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_record(out)


# ------------------------------------------------------------------------------------------- records


def test_record_follows_schema(adam_c4):
    rec = adam_c4
    assert list(rec) == list(records.RECORD_KEYS)
    assert rec["schema"] == records.SCHEMA and rec["status"] == "ok" and rec["error"] is None
    assert rec["suite"] == "c4" and rec["profile"] == "smoke" and rec["method"] == "adam"
    assert rec["config_hash"] == records.config_hash(rec["config"])
    cfg = rec["config"]
    for key in ("model", "dtype", "seed", "steps", "batch", "seq_len", "lr", "rank", "device"):
        assert key in cfg
    assert set(rec["metrics"]) >= {"eval_loss", "eval_ppl", "c4_sample_loss", "c4_sample_ppl"}
    assert rec["metrics"]["eval_loss"] > 0
    mem = rec["memory"]
    assert mem["peak_bytes"] > 0 and mem["source"] == "cpu-tracked"
    assert set(mem["breakdown"]) == {"params", "grads", "optimizer", "activations", "other"}
    assert rec["speed"]["tokens_per_s"] > 0 and rec["speed"]["step_time_s"] > 0
    assert [c[0] for c in rec["curve"]] == list(range(cfg["steps"]))
    assert all(isinstance(c[1], float) for c in rec["curve"])
    assert rec["curve"][-1][2] == rec["metrics"]["eval_loss"]  # final eval point on the curve
    assert rec["subspace"] is None  # AdamW tracks no basis
    assert set(rec["env"]) >= {"git_commit", "python", "torch", "transformers", "device", "dtype"}
    assert rec["wall_s"] > 0 and rec["started_at"]


def test_write_record_is_atomic_and_validated(tmp_path, adam_c4):
    path = records.write_record(adam_c4, tmp_path)
    assert path.name == f"{adam_c4['run_id']}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # world-readable, like any file the user writes
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert json.loads(path.read_text()) == adam_c4
    broken = dict(adam_c4, config={**adam_c4["config"], "lr": 123.0})
    with pytest.raises(ValueError, match="config_hash"):
        records.write_record(broken, tmp_path / "other")
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------- resume


def test_killed_sweep_resumes_without_repeats_or_loss(tmp_path, adam_c4):
    out = tmp_path / "sweep"
    args = [
        sys.executable,
        "-m",
        "suites.run",
        "c4",
        "--profile",
        "smoke",
        "--methods",
        "adam",
        "--sweep",
        "seed=0,1",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.json")) and proc.poll() is None:
        time.sleep(0.2)
    first = list(out.glob("*.json"))
    assert len(first) == 1 and proc.poll() is None, "the sweep should be busy with its second run"
    os.killpg(proc.pid, signal.SIGKILL)  # kill the whole sweep, like a closed terminal or a crashed node
    proc.wait()
    time.sleep(1.0)
    # only the finished run, no partial file (and the sweep's lock files, which stay in .locks/)
    assert [p.name for p in out.iterdir() if p.name != ".locks"] == [first[0].name]
    mtime = first[0].stat().st_mtime_ns

    again = run_cli("c4", "--profile", "smoke", "--methods", "adam", "--sweep", "seed=0,1", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming: 1 of 2" in again.stderr
    recs = records.load_records(out)
    assert sorted(r["config"]["seed"] for r in recs) == [0, 1]
    assert all(r["status"] == "ok" for r in recs)
    assert first[0].stat().st_mtime_ns == mtime  # the finished run was not repeated

    # the seed-0 run of the sweep is the same config as the module fixture: same metrics and memory
    seed0 = next(r for r in recs if r["config"]["seed"] == 0)
    assert seed0["config_hash"] == adam_c4["config_hash"]
    assert seed0["metrics"] == adam_c4["metrics"]
    assert seed0["memory"] == adam_c4["memory"]
    assert [c[1] for c in seed0["curve"]] == [c[1] for c in adam_c4["curve"]]

    third = run_cli("c4", "--profile", "smoke", "--methods", "adam", "--sweep", "seed=0,1", "--out", str(out))
    assert third.returncode == 0 and "resuming: 2 of 2" in third.stderr
    assert len(list(out.glob("*.json"))) == 2


# ------------------------------------------------------------------------------------------- failures


def test_divergence_is_a_result_and_the_sweep_goes_on(tmp_path):
    # lr=1e30 makes AdamW's first update overflow the weights, so a later loss is NaN: a real divergence
    proc = run_cli(
        "c4", "--profile", "smoke", "--methods", "adam,lora", "--set", "lr.adam=1e30", "--out", str(tmp_path)
    )
    assert proc.returncode == 1  # not every run is ok
    recs = {r["method"]: r for r in records.load_records(tmp_path)}
    adam, lora = recs["adam"], recs["lora"]
    assert adam["status"] == "diverged" and "nan" in adam["error"]
    assert adam["curve"][-1][1] is None  # the NaN loss is stored as null (JSON has no NaN)
    assert adam["metrics"] == {}
    assert lora["status"] == "ok" and lora["metrics"]["eval_loss"] > 0  # the next method still ran
    assert "diverged" in proc.stdout


BAD_INPUTS = {
    "unknown suite": ["mnist"],
    "unknown method": ["c4", "--methods", "adam,sgd"],
    "unknown profile": ["c4", "--profile", "huge"],
    "unknown --set key": ["c4", "--set", "nosuchkey=1"],
    "malformed value": ["c4", "--set", "steps=many"],
    "malformed assignment": ["c4", "--set", "steps"],
    "float for an int": ["c4", "--set", "batch=2.5"],
    "malformed lr": ["c4", "--set", "lr=fast"],
    "unknown method in KEY.METHOD": ["c4", "--set", "lr.sgd=0.1"],
    "malformed betas": ["c4", "--set", "betas=0.9"],
    "rank above a layer": ["c4", "--profile", "smoke", "--set", "rank=65"],
    "no learning-rate grid": ["c4", "--profile", "smoke", "--lr-grid"],
    "zero accumulation": ["c4", "--set", "grad_accum=0"],
    "unknown sweep key": ["c4", "--sweep", "nosuchkey=1,2"],
    "bad device": ["c4", "--device", "tpu"],
}


@pytest.mark.parametrize("args", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(args, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("python -m suites.run: error: "), err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_data_names_the_path(tmp_path):
    # through the real command line (exit status of the process, nothing on stdout)
    out = tmp_path / "out"
    env = {**ENV, "OASIS_DATA_DIR": str(tmp_path / "nodata")}
    proc = run_cli("gsm8k", "--profile", "smoke", "--methods", "adam", "--out", str(out), env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "nodata" / "gsm8k") in lines[0], proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_paper_profile_offline_fails_clearly(tmp_path, capsys):
    code = cli.main(["gsm8k", "--profile", "paper", "--methods", "adam", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "meta-llama/Llama-2-7b-hf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- profiles


def test_profiles_share_budgets_and_differ_only_in_lr():
    from suites.core.registry import method_defaults

    prof = profiles.profile("gsm8k", "cpu")
    cfgs = {m: profiles.resolve("gsm8k", "cpu", prof, m, method_defaults(m), "cpu") for m in ("adam",)}
    cfg = cfgs["adam"]
    assert cfg["lr"] == prof["lrs"]["adam"]
    over = profiles.apply_overrides(prof, [("lr.adam", "5e-4"), ("steps", "12"), ("eval_limit", "none")], {})
    cfg2 = profiles.resolve("gsm8k", "cpu", over, "adam", method_defaults("adam"), "cpu")
    assert cfg2["lr"] == 5e-4 and cfg2["steps"] == 12 and cfg2["eval_limit"] is None
    assert records.config_hash(cfg2) != records.config_hash(cfg)
    # keys a method does not have never enter its config (so they cannot change its hash)
    assert "refresh_every" not in cfg and "update_proj_gap" not in cfg
    # KEY.METHOD sets one method's optimizer hyper-parameter only
    per = profiles.apply_overrides(prof, [("betas.ldadam", "0.908,0.99")], {})
    ld = profiles.resolve("gsm8k", "cpu", per, "ldadam", method_defaults("ldadam"), "cpu")
    ad = profiles.resolve("gsm8k", "cpu", per, "adam", method_defaults("adam"), "cpu")
    assert ld["betas"] == (0.908, 0.99) and ad["betas"] == tuple(prof["betas"])
    assert records.config_hash(ad) == records.config_hash(cfg)
    # without an override, methods keep their published optimizer constants (DESIGN §4)
    plain = profiles.resolve("gsm8k", "cpu", prof, "ldadam", method_defaults("ldadam"), "cpu")
    galore = profiles.resolve("gsm8k", "cpu", prof, "galore", method_defaults("galore"), "cpu")
    assert plain["betas"] == (0.908, 0.99) and galore["eps"] == 1e-6
    per = profiles.apply_overrides(prof, [("betas.ldadam", "0.9,0.95")], {})
    overridden = profiles.resolve("gsm8k", "cpu", per, "ldadam", method_defaults("ldadam"), "cpu")
    assert overridden["betas"] == (0.9, 0.95)


def test_quality_runs_keep_the_published_refresh_periods():
    """No profile pins a period (the memory pass puts the refresh in the window: tests/test_memory_pass.py);
    every periodic method trains with the period its paper publishes. The one exception is the c4 `study`
    profile (issue 20): there every periodic method must refresh >= 10 times inside the horizon, so its
    periods are 50 and suites.study ablates the published 200 (tests/test_study.py)."""
    from suites.core.registry import method_defaults

    published = {("galore", "update_proj_gap"): 200, ("pca", "refresh_every"): 200,
                 ("compact", "refresh_every"): 50, ("apollo", "update_proj_gap"): 200}
    for suite, table in profiles.PROFILES.items():
        for name, prof in table.items():
            if (suite, name) == ("c4", "study"):
                assert all((prof["steps"] - 1) // prof[k] >= 10 for k in profiles.PERIODIC_KEYS)
                continue
            assert not set(profiles.PERIODIC_KEYS) & set(prof), (suite, name)
            for (method, key), period in published.items():
                cfg = profiles.resolve(suite, name, prof, method, method_defaults(method), "cpu")
                assert cfg[key] == period, (suite, name, method)


def test_lr_schedule_warms_up_then_decays():
    from suites.launch.recipe import lr_factor

    f = lr_factor("cosine", warmup=4, steps=20, min_ratio=0.1)
    values = [f(i) for i in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert values[-1] >= 0.1 and values[-1] < 0.2


# ------------------------------------------------------------------------------------------- gsm8k


def test_gsm8k_smoke_goes_through_lm_eval(tmp_path):
    proc = run_cli("gsm8k", "--profile", "smoke", "--methods", "adam", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = only_record(tmp_path)
    m = rec["metrics"]
    assert m["eval_problems"] == rec["config"]["eval_limit"] == 2
    assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["accuracy_flexible"] <= 1.0
    assert m["answer_nll"] > 0
    assert "accuracy" in proc.stdout.splitlines()[0]  # summary table header names the headline metric


# ------------------------------------------------------------------------------------------- usage errors

FAST_USAGE_ERRORS = {
    "unknown method": ["gsm8k", "--methods", "nosuch"],
    "unknown suite": ["mnist"],
    "unknown profile": ["c4", "--profile", "huge"],
    "unknown --set key": ["c4", "--set", "nosuchkey=1"],
    "malformed --set value": ["c4", "--set", "steps=many"],
    "malformed --sweep": ["c4", "--sweep", "rank"],
    "bad device": ["c4", "--device", "tpu"],
    "--out is a file": ["c4", "--out", "{file}"],
    "--out below a file": ["c4", "--out", "{file}/below"],
    "--nproc 0": ["c4", "--nproc", "0"],
    "batch not divisible by --nproc": ["c4", "--profile", "smoke", "--set", "batch=3", "--nproc", "2"],
    "layer-wise steps under DDP": ["c4", "--methods", "adam", "--set", "layerwise=true", "--nproc", "2"],
    "in-backward embedding under DDP": ["c4", "--methods", "oasis", "--set", "embedding_update=backward",
                                        "--nproc", "2"],
    "--parallel with Slurm": ["c4", "--launcher", "slurm", "--parallel", "2"],
    "--strategy fsdp without --nproc": ["c4", "--strategy", "fsdp"],
    "--partition without Slurm": ["c4", "--partition", "gpu"],
    "unknown launcher": ["c4", "--launcher", "mpi"],
}


def test_usage_errors_come_before_torch_is_imported(tmp_path):
    """Every argument check runs before torch or transformers is imported (so it answers in well under a
    second), prints one line and exits 2; nothing is written and an existing file named by --out is kept."""
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    cases = {name: [a.replace("{file}", str(victim)) for a in argv]
             for name, argv in FAST_USAGE_ERRORS.items()}
    probe = (
        "import contextlib, io, json, sys\n"
        "from suites import run\n"
        "out = {}\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        code = run.main(argv)\n"
        "    out[name] = [code, err.getvalue()]\n"
        "out['heavy'] = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps(cases)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result.pop("heavy") == []
    for name, (code, err) in result.items():
        assert code == 2, (name, err)
        assert err.startswith("python -m suites.run: error: "), (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
    assert "--out" in result["--out is a file"][1] and "not a folder" in result["--out is a file"][1]
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_is_a_usage_error(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert cli.main(["c4", "--profile", "smoke", "--methods", "adam", "--out", str(locked / "out")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and len(err.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []


def test_unknown_key_lists_each_known_key_once(capsys):
    assert cli.main(["c4", "--set", "nosuchkey=1"]) == 2
    err = capsys.readouterr().err
    known = err.split("known keys: ", 1)[1].strip().split(", ")
    assert len(known) == len(set(known)) and {"betas", "eps", "refresh_every"} <= set(known)


def test_help_lists_every_method_and_what_differs():
    proc = run_cli("--help")
    assert proc.returncode == 0
    from suites.core.registry import ALL_METHODS, method_defaults

    for name in ALL_METHODS:
        assert name in proc.stdout
    for var in ("OASIS_DATA_DIR", "OASIS_THREADS", "OASIS_NO_PROGRESS", "OASIS_DEBUG"):
        assert var in proc.stdout
    assert "only learning rates differ" not in proc.stdout
    # the published constants, as the methods define them (not a hand-written copy)
    assert f"ldadam: betas={method_defaults('ldadam')['betas']}" in proc.stdout
    assert f"galore: eps={method_defaults('galore')['eps']}" in proc.stdout


def test_registry_reads_defaults_without_importing_the_methods():
    probe = (
        "import sys\n"
        "from suites.core import registry\n"
        "d = {m: registry.method_defaults(m) for m in registry.ALL_METHODS}\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    # one source of truth: what the registry reads is what each module defines
    import importlib

    from suites.core import registry

    for name in registry.ALL_METHODS:
        module_name, pinned = registry._METHODS[name]
        module = importlib.import_module(f"baselines.{module_name}")
        assert registry.method_defaults(name) == {**module.DEFAULTS, **pinned}, name


def test_non_literal_defaults_are_refused(tmp_path):
    from suites.core.registry import read_defaults

    good = tmp_path / "good.py"
    good.write_text("import torch\nDEFAULTS = {'betas': (0.9, 0.99), 'flag': True, 'n': 3}\n")
    assert read_defaults(good) == {"betas": (0.9, 0.99), "flag": True, "n": 3}
    computed = tmp_path / "computed.py"
    computed.write_text("DEFAULTS = dict(n=3)\n")
    with pytest.raises(TypeError, match="literal"):
        read_defaults(computed)
    (tmp_path / "none.py").write_text("X = 1\n")
    with pytest.raises(TypeError, match="no top-level"):
        read_defaults(tmp_path / "none.py")


def test_hub_base_errors_other_than_not_cached_surface(tmp_path):
    """Only "not in the cache, offline" is reported as such; a broken local base is a real error."""
    broken = tmp_path / "base"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON"):
        cli._check_hub_base(str(broken))
    with pytest.raises(cli.UsageError, match="not available offline"):
        cli._check_hub_base("meta-llama/Llama-2-7b-hf")
    with pytest.raises(cli.UsageError, match="neither a local model folder nor a hub id"):
        cli._check_hub_base(str(tmp_path / "no" / "such" / "folder"))


def test_dtype_aliases_resolve_to_the_canonical_name():
    prof = profiles.apply_overrides(profiles.profile("c4", "smoke"), [("dtype", "bf16")], {})
    assert prof["dtype"] == "bfloat16"
    with pytest.raises(profiles.ProfileError, match="not one of"):
        profiles.apply_overrides(profiles.profile("c4", "smoke"), [("dtype", "int8")], {})


def test_every_periodic_profile_key_is_read_by_some_method():
    from suites.core.registry import ALL_METHODS, method_defaults

    read = {k for m in ALL_METHODS for k in method_defaults(m)}
    assert set(profiles.PERIODIC_KEYS) <= read  # a key no method reads is dead (regenerate_every was)
    for table in profiles.PROFILES.values():
        for prof in table.values():
            assert "regenerate_every" not in prof


# ------------------------------------------------------------------------------------------- sweeps


def _smoke_adam_config() -> dict:
    from suites.core.registry import method_defaults
    from suites.train.models import run_fields

    prof = profiles.profile("c4", "smoke")
    cfg = profiles.resolve("c4", "smoke", prof, "adam", method_defaults("adam"), "cpu")
    return {**cfg, **run_fields(cfg)}  # as `suites.run` plans it


def test_a_run_locked_by_another_sweep_is_skipped(tmp_path, adam_c4):
    out = tmp_path / "out"
    cfg = _smoke_adam_config()
    assert records.config_hash(cfg) == adam_c4["config_hash"]
    with records.run_lock(out, cfg) as held:
        assert held
        proc = run_cli("c4", "--profile", "smoke", "--methods", "adam", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"skipped {records.run_id(cfg)}: another sweep into {out} is running it" in proc.stderr
    assert list(out.glob("*.json")) == []


def test_the_lock_holder_rechecks_for_an_ok_record(tmp_path, adam_c4):
    """A sweep that planned a run, then got its lock after another sweep finished it, does not run it."""
    out = tmp_path / "out"
    records.write_record(adam_c4, out)
    assert runs.run_config(_smoke_adam_config(), out) == "done"
    assert json.loads((out / f"{adam_c4['run_id']}.json").read_text()) == adam_c4


def test_two_concurrent_sweeps_run_a_config_once(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "suites.run", "c4", "--profile", "smoke", "--methods", "adam",
            "--set", "seed=7", "--out", str(out)]
    procs = [subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in results]
    ran = [not ("skipped " in err or "resuming: 1 of 1" in err) for _, err in results]
    assert sum(ran) == 1, [err for _, err in results]
    recs = records.load_records(out)
    assert len(recs) == 1 and recs[0]["status"] == "ok" and recs[0]["config"]["seed"] == 7


def _worker_of(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"suites.worker" in cmdline and parent == pid:
            return int(entry.name)
    return None


def _as_a_terminal_starts_it():
    """SIGINT at its default, as for a command typed in a terminal. A pytest started in the background by a
    non-interactive shell (`pytest &`, nohup in a script) inherits SIGINT ignored and passes that on; Python
    then installs no KeyboardInterrupt handler, and the sweep rightly ignores `kill -INT` (the hang once
    seen only in backgrounded full-suite runs: the sweep waiting in waitpid, its worker training on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_a_sweep(out: Path, target: str):
    """Start a sweep, wait until its run's process has started, send SIGINT (to the process group, as a
    terminal's Ctrl-C does, or to the sweep only, as `kill -INT` does); (proc, stdout, stderr). A sweep
    that has not exited 120 s later fails the test with its process tree and, from the fault handler, its
    Python stacks."""
    # long enough that the signal always lands mid-run (a warm 4-step smoke run can end within the 3 s wait)
    args = ["c4", "--profile", "smoke", "--methods", "adam", "--set", "steps=2000", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "suites.run", *args],
        # the fault handler: a sweep that hangs is made to print every thread's stack (SIGABRT)
        cwd=ROOT, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, preexec_fn=_as_a_terminal_starts_it,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _worker_of(proc.pid) is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    time.sleep(3.0)  # the run is importing its libraries or training
    if target == "process group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
        return proc, stdout, stderr
    except subprocess.TimeoutExpired:
        tree = subprocess.run(["ps", "-ww", "-o", "pid,ppid,stat,etime,wchan:20,cmd", "-g", str(proc.pid)],
                              capture_output=True, text=True).stdout
        os.kill(proc.pid, signal.SIGABRT)  # its Python stacks, to stderr
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the sweep did not exit within 120 s of SIGINT; process group:\n{tree}\n"
                    f"stderr tail (its stacks):\n{stderr[-6000:]}")


@pytest.mark.parametrize("target", ["process group", "sweep only"])
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, target):
    """Ctrl-C in a terminal signals every process of the sweep; `kill -INT` only the sweep. Either way:
    one line, exit 130, no worker traceback, no partial record."""
    out = tmp_path / "out"
    proc, stdout, stderr = _interrupt_a_sweep(out, target)
    assert proc.returncode == 130
    assert stderr.strip() == sweep.INTERRUPTED and "Traceback" not in stderr
    assert stdout == ""
    assert not [p for p in out.rglob("*") if p.is_file() and p.parent == out]  # no record, no temp file


def test_gpu_profile_is_one_epoch_of_gsm8k_and_the_whole_test_set():
    from suites.train import data

    prof = profiles.profile("gsm8k", "gpu")
    train = len(data.gsm8k_examples("train"))
    assert prof["model"] == "smollm2-135m" and prof["dtype"] == "bfloat16"
    assert prof["steps"] * prof["batch"] * prof["grad_accum"] >= train  # at least one epoch
    assert prof["eval_limit"] is None and prof["max_gen_toks"] >= 256
    assert profiles.profile("humaneval", "gpu")["eval_limit"] is None


def test_nproc_2_runs_data_parallel(tmp_path):
    """`--nproc 2`: each run is two torchrun ranks (gloo) on the global batch; ok records with world_size 2,
    the peak of the larger rank, and the bytes all-reduced per step (OASIS's far below adam's). Through the
    CLI for the reference, OASIS and a peft-wrapped model; every method's two ranks equal one process in
    tests/test_distributed.py (in one spawn, a fraction of the time of a torchrun per method here)."""
    out = tmp_path / "out"
    methods = ("adam", "oasis", "lora")
    proc = run_cli("c4", "--profile", "smoke", "--methods", ",".join(methods), "--nproc", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["method"]: r for r in records.load_records(out)}
    assert sorted(recs) == sorted(methods)
    for method, rec in recs.items():
        assert rec["status"] == "ok", (method, rec["error"])
        assert rec["config"]["world_size"] == 2 and rec["config"]["strategy"] == "ddp"
        assert list(rec).index("comm") == list(rec).index("memory") + 1  # DESIGN §3.4's order
        peaks = rec["memory"]["per_rank_peak_bytes"]
        assert len(peaks) == 2 and rec["memory"]["peak_bytes"] == max(peaks) > 0
        assert rec["comm"]["world_size"] == 2 and rec["comm"]["backend"] == "gloo"
        assert rec["comm"]["steps_counted"] == rec["config"]["steps"]
        assert rec["metrics"]["eval_loss"] > 0
    adam, oasis = recs["adam"]["comm"], recs["oasis"]["comm"]
    assert oasis["stats_allreduce_bytes_per_step"] > 0 == adam["stats_allreduce_bytes_per_step"]
    assert oasis["grad_allreduce_bytes_per_step"] < adam["grad_allreduce_bytes_per_step"]


def test_submitit_jobs_write_into_out_and_a_rerun_resumes(tmp_path):
    """--launcher submitit-local: each run is a submitit job (the code path of --launcher slurm, on
    submitit's local executor); records land in --out like a local sweep's; the same command again submits
    nothing."""
    out = tmp_path / "out"
    args = ("c4", "--profile", "smoke", "--methods", "adam,oasis", "--launcher", "submitit-local",
            "--time-min", "10", "--out", str(out))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted 2 local jobs" in proc.stderr
    recs = records.load_records(out)
    assert sorted(r["method"] for r in recs) == ["adam", "oasis"] and all(r["status"] == "ok" for r in recs)
    assert len(list((out / ".submitit").glob("*/*_result.pkl"))) == 2  # the jobs' own results
    again = run_cli(*args)
    assert again.returncode == 0 and "submitted" not in again.stderr
    assert "resuming: 2 of 2 runs already have an ok record" in again.stderr


def test_parallel_runs_share_the_sweep(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("c4", "--profile", "smoke", "--methods", "adam,oasis", "--parallel", "2",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records.load_records(out)
    assert sorted(r["method"] for r in recs) == ["adam", "oasis"]
    assert all(r["status"] == "ok" for r in recs)
    # two at a time: some run started before another had ended
    spans = sorted((datetime.fromisoformat(r["started_at"]).timestamp(), r["wall_s"]) for r in recs)
    assert any(start2 < start1 + wall1 for (start1, wall1), (start2, _) in zip(spans, spans[1:]))


@pytest.mark.skipif(shutil.which("srun") is not None, reason="on a Slurm machine --launcher slurm is valid")
def test_slurm_launcher_without_slurm_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["c4", "--launcher", "slurm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "srun" in err and "submitit-local" in err
    assert not out.exists()


def test_slurm_jobs_ask_for_the_runs_gpus_partition_and_time(tmp_path, monkeypatch):
    """The sbatch script submitit writes for a run of world_size 2 (rendered by submitit itself; a stub
    `srun` on PATH stands in for the cluster, which submitit looks for before anything else)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 0\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    from suites.launch.launchers import Submitit

    launcher = Submitit("slurm", tmp_path / "jobs", timeout_min=120, partition="gpu", gpus=True,
                        cpus_per_task=8)
    script = launcher.executor(2)._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--gpus-per-node=2", "--partition=gpu", "--time=120", "--cpus-per-task=8", "--nodes=1",
                 "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in script, line


def test_fsdp_runs_shard_and_evaluate_like_one_process(tmp_path, adam_c4):
    """--strategy fsdp: FSDP2 shards every method's model over the ranks; rank 0 evaluates an unsharded copy
    of the trained weights, which gives one process's validation loss."""
    out = tmp_path / "out"
    proc = run_cli("c4", "--profile", "smoke", "--methods", "adam,oasis", "--nproc", "2",
                   "--strategy", "fsdp", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["method"]: r for r in records.load_records(out)}
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["config"]["strategy"] == "fsdp" == rec["comm"]["strategy"]
        assert rec["comm"]["grad_reduce_scatter_bytes_per_step"] > 0 and rec["comm"]["steps_counted"] == 4
    assert recs["adam"]["metrics"]["eval_loss"] == pytest.approx(adam_c4["metrics"]["eval_loss"], rel=1e-5)
    # this rank's shard of Adam's state: half of one process's (llama-tiny's dims are even)
    assert recs["adam"]["memory"]["breakdown"]["optimizer"] * 2 == pytest.approx(
        adam_c4["memory"]["breakdown"]["optimizer"], rel=1e-4)
