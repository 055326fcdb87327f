"""Shared plumbing: atomic writes, output checks before work, one-line CLI errors, the dtype vocabulary."""

import json
import os
import stat

import pytest

from suites.core import cli, dtypes, files


def test_atomic_write_is_world_readable_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"
    files.write_json(path, {"x": (1, 2), "nan": float("nan")})
    assert json.loads(path.read_text()) == {"x": [1, 2], "nan": None}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    files.atomic_write(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary left behind


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    class Boom:
        pass

    with pytest.raises(TypeError):
        files.write_json(path, {"x": Boom()})  # not serialisable: fails before anything is replaced
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_check_output_dir(tmp_path):
    assert files.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checks create nothing
    (tmp_path / "afile").write_text("x")
    with pytest.raises(files.OutputError, match="not a folder"):
        files.check_output_dir(tmp_path / "afile")
    with pytest.raises(files.OutputError, match="cannot be created"):
        files.check_output_dir(tmp_path / "afile" / "below")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_check_output_dir_unwritable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(files.OutputError, match="not writable"):
        files.check_output_dir(locked / "x")


def test_check_output_file(tmp_path):
    assert files.check_output_file(tmp_path / "d" / "x.json") == tmp_path / "d" / "x.json"
    with pytest.raises(files.OutputError, match="is a folder"):
        files.check_output_file(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(files.OutputError):
        files.check_output_file(tmp_path / "afile" / "x.json")


def test_atomic_dir_keeps_the_first_copy(tmp_path):
    final = tmp_path / "cache" / "entry"
    files.atomic_dir(final, lambda d: (d / "a").write_text("first"))
    files.atomic_dir(final, lambda d: (d / "a").write_text("second"))
    assert (final / "a").read_text() == "first"
    assert sorted(p.name for p in final.parent.iterdir()) == ["entry"]


def test_dtype_vocabulary():
    import torch

    assert dtypes.canonical("bf16") == dtypes.canonical("BFloat16") == "bfloat16"
    assert dtypes.torch_dtype("fp32") is torch.float32
    assert dtypes.name_of(torch.float16) == "float16"
    with pytest.raises(ValueError, match="not one of"):
        dtypes.canonical("int8")


def test_cli_main_exit_codes(capsys):
    def bad(argv):
        raise cli.UsageError("no such thing")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.cli_main("prog", bad) == 2
    assert capsys.readouterr().err == "prog: error: no such thing\n"
    assert cli.cli_main("prog", interrupted) == 130
    assert capsys.readouterr().err.strip() == "prog: interrupted"
    p = cli.Parser(prog="prog")
    p.add_argument("--n", type=int)
    with pytest.raises(cli.UsageError, match="invalid int value"):
        p.parse_args(["--n", "x"])


# ------------------------------------------------------------------------------------------- scoped patches


def test_patched_restores_on_every_exit_and_refuses_a_missing_target():
    import types

    from suites.core.patching import patched

    owner = types.SimpleNamespace(f="original")
    owner.__name__ = "owner"
    with patched(owner, "f", "ours", why="a test") as original:
        assert original == "original" and owner.f == "ours"
    assert owner.f == "original"
    with pytest.raises(KeyError), patched(owner, "f", "ours", why="a test"):
        raise KeyError("inside")
    assert owner.f == "original"
    with pytest.raises(AttributeError, match="owner.g: it does not exist.*because a test"):
        with patched(owner, "g", "ours", why="a test"):
            pass
    assert not hasattr(owner, "g")
    with pytest.raises(RuntimeError, match="patched again"):
        with patched(owner, "f", "ours", why="a test"):
            owner.f = "someone else's"
    assert owner.f == "original"


def test_fake_construction_restores_module_apply_and_refuses_a_missing_one(monkeypatch):
    from torch import nn

    from suites.measure.meters import fake_construction
    from suites.train.models import build_model

    original = nn.Module._apply
    with pytest.raises(ValueError, match="inside"), fake_construction():
        build_model("llama-tiny")
        assert nn.Module._apply is not original
        raise ValueError("inside")
    assert nn.Module._apply is original
    monkeypatch.delattr(nn.Module, "_apply")
    with pytest.raises(AttributeError, match="_apply: it does not exist"):
        with fake_construction():
            pass


def test_galore8bit_cpu_step_patches_cuda_synchronize_only_during_the_step(monkeypatch):
    import torch

    from suites.core.registry import build_method, method_defaults
    from suites.train.models import build_model

    model = build_model("llama-tiny")
    cfg = {**method_defaults("galore8bit"), "lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999),
           "eps": 1e-8, "rank": 4, "seed": 0}
    model, optimizer = build_method("galore8bit", model, cfg)
    batch = torch.randint(0, 100, (1, 8))
    original = torch.cuda.synchronize
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()  # on CPU-only torch this raises unless synchronize is a no-op during the step
    assert torch.cuda.synchronize is original
    monkeypatch.delattr(torch.cuda, "synchronize")
    with pytest.raises(AttributeError, match="synchronize: it does not exist"):
        optimizer.step()
