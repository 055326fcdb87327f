"""The child side of `suites.evaluate.sandbox`: run as a script, it contains itself, then runs `program.py`.

Stdlib only, and as few imports as possible: it starts once per program. The harness passes, as integer
arguments: the token pipe's read end, the result pipe's write end, the address-space, process, file-size
and CPU-second limits, and whether to apply Landlock and the guard. See suites/evaluate/sandbox.py for the
design and its threat model (the program runs in this process, so it can reach the token: accidental early
exits fail, deliberate forgery is not stopped).
"""

from __future__ import annotations

import functools
import os
import sys

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


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


@functools.cache
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


def _set_limits(address_space: int, processes: int, file_size: int, cpu_seconds: int) -> None:
    import resource

    for name, value in (
        ("RLIMIT_AS", address_space),
        ("RLIMIT_NPROC", processes),
        ("RLIMIT_FSIZE", file_size),
        ("RLIMIT_CPU", cpu_seconds),
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
        syscall(ctypes.c_long(_SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(scratch_fd)
        os.close(ruleset)


def _no_new_privileges() -> None:
    """No exec (of a setuid binary, or by root) can grant privileges from here on; Landlock requires it."""
    import ctypes

    if _libc().prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _drop_capabilities() -> None:
    """Root keeps its uid (the interpreter may be readable by root only) but loses every capability."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = _libc()
    if libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), ctypes.byref((Data * 2)())) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _disabled(name: str):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")

    return refuse


def _install_guard(scratch: str) -> None:
    """Disable destructive calls and writes outside `scratch`, in the spirit of human-eval's guard."""
    import builtins
    import io
    import shutil
    import subprocess

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
    for name in (
        "ctypes", "_ctypes", "posix", "_posixsubprocess", "resource", "psutil", "joblib", "ipdb", "tkinter",
    ):
        sys.modules[name] = None  # `import name` now raises ImportError


def main(argv: list[str]) -> None:
    token_fd, result_fd, address_space, processes, file_size, cpu_seconds, landlock, guard = map(int, argv)
    scratch = os.getcwd()
    read, write, exit_now = os.read, os.write, os._exit  # the program may rebind the os attributes
    with open("program.py", "rb") as f:
        source = f.read()
    _set_limits(address_space, processes, file_size, cpu_seconds)
    _no_new_privileges()
    if landlock:
        _landlock_writes_to(scratch)
    if os.geteuid() == 0:
        _drop_capabilities()
    if guard:
        _install_guard(scratch)
    code = compile(source, "program.py", "exec")
    del source
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    # Only here, after the program's last statement, does the token enter this process.
    write(result_fd, read(token_fd, 64))
    exit_now(0)  # lingering threads or atexit hooks of the program change nothing once it has finished


if __name__ == "__main__":
    main(sys.argv[1:])
