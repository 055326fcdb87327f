"""Writing results safely: the one atomic writer of the project, and checks that an output can be written.

Every file the harness, the memory tools and the report builder produce goes through `atomic_write`: the
bytes land in a temporary file in the destination folder, are flushed to disk, and replace the final name
in one `os.replace`, so a reader (or an interrupted run) never sees a half-written file. Files are created
world-readable (0644, like `open()` under the usual umask), not 0600 as `tempfile.mkstemp` would leave them.

`check_output_dir` / `check_output_file` are called before any work starts, so that a bad `--out` is a
one-line usage error and not a traceback after an hour of training.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644


class OutputError(ValueError):
    """An output path that cannot be written (the CLIs turn it into a one-line usage error, exit 2)."""


def json_safe(obj):
    """JSON-stable form: tuples become lists, non-finite floats (a diverged loss) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 1) -> str:
    """The canonical JSON text the project writes: NaN/inf as null, tuples as lists, a final newline."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False) + "\n"


def atomic_write(path: str | os.PathLike, data: bytes | str, *, mode: int = FILE_MODE) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace); returns the path.

    Parent folders are created. On any failure the temporary file is removed and the previous file at
    `path`, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1) -> Path:
    """`atomic_write` of `json_text(obj)`."""
    return atomic_write(path, json_text(obj, indent))


def atomic_dir(final: str | os.PathLike, fill) -> Path:
    """Create folder `final` atomically: `fill(tmp_dir)` writes into a sibling temp folder, which is then
    renamed into place. If another process created `final` first, its copy is kept and ours is dropped
    (callers use this for caches whose content is a pure function of their name)."""
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a cache is as readable as the files in it
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool = False):
    """Hold an exclusive `flock` on the file `path` (created if needed, left in place afterwards) for the
    body of the `with`; yields True when held, or False at once when another process holds it and
    `wait` is false. The kernel drops the lock when its holder exits, however it exits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Raise OutputError unless `path` is (or can be created as) a writable folder. Creates nothing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{what} {path}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {path}: folder is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: cannot be created ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot be created ({parent} is not writable)")
    return path


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise OutputError unless a file can be written at `path` (its folder exists or can be created,
    and `path` is not a folder). Creates nothing and leaves an existing file alone."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder, expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: file is not writable")
    check_output_dir(path.parent if str(path.parent) else ".", what=f"{what} {path}: folder")
    return path
