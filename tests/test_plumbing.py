"""Shared plumbing: atomic writes, output checks before work, one-line CLI errors, the dtype vocabulary."""

import json
import os
import stat

import pytest

from suites import cli, dtypes, files


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
