"""The HumanEval sandbox against hostile programs: one test per class of misbehaviour.

Each hostile completion is placed in front of (or around) problem 0's canonical solution, so that a program
whose attack is *not* contained would pass; "fails" below therefore also means "the attack was stopped".
Where a defence is layered (guard and kernel), the tests switch the other layer off to show each one holding
on its own. The mechanisms themselves are described in suites/evaluate/sandbox.py. The one exception is the
section on deliberate forgery: those programs *pass*, pinning the documented limit of the threat model.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from suites.evaluate import sandbox
from suites.evaluate.tasks import humaneval
from suites.train import data

LANDLOCK = sandbox.landlock_abi()
needs_landlock = pytest.mark.skipif(LANDLOCK < 1, reason="the kernel has no Landlock")


@pytest.fixture(scope="module")
def problems():
    return data.humaneval_problems(None)


def program(problems, before: str = "", inside: str = "") -> str:
    """Problem 0 with its canonical solution; `before` runs at module level first, `inside` in its body."""
    first = problems[0]
    body = textwrap.indent(textwrap.dedent(inside), "    ") + first["canonical_solution"]
    return textwrap.dedent(before) + "\n" + humaneval.program_for(first, body)


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie is dead; its reaper (pid 1 here) may just not have run yet


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not process_gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


# ------------------------------------------------------------------------------------------------ correctness


def test_canonical_solutions_pass_and_wrong_ones_fail_in_parallel(problems):
    canonical = [humaneval.program_for(p, p["canonical_solution"]) for p in problems]
    wrong = [humaneval.program_for(p, "    return None\n") for p in problems[:10]]
    start = time.monotonic()
    outcomes = sandbox.run_many(canonical + wrong, 10.0)
    print(f"{len(outcomes)} programs in {time.monotonic() - start:.1f} s")
    assert [o.passed for o in outcomes] == [True] * len(problems) + [False] * len(wrong)
    assert len(problems) == 164 and all(o.finished for o in outcomes[: len(problems)])


# ----------------------------------------------------------------------------------------------- early exit

EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "sys.exit()": "import sys\nsys.exit()\n",
    "exit(0)": "exit(0)\n",
    "quit()": "quit()\n",
    "raise SystemExit(0)": "raise SystemExit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
}


@pytest.mark.parametrize("how", EARLY_EXITS)
def test_an_early_exit_with_status_zero_fails(problems, how):
    outcome = sandbox.run(program(problems, inside=EARLY_EXITS[how]), 10.0)
    assert outcome.returncode == 0  # the exit itself succeeded ...
    assert not outcome.finished and not outcome.passed  # ... but the tests never ran to the end


def test_the_same_program_without_the_exit_passes(problems):
    outcome = sandbox.run(program(problems), 10.0)
    assert outcome.passed and outcome.finished and outcome.returncode == 0


# --------------------------------------------------------------------- known limitation: deliberate forgery

# The sandbox's threat model is careless code (accidental exits, side effects), not a program that knows
# this module: the token's reader runs in the program's own process, so each of these writes the token back
# without running `check`. They are pinned here so that the documented limit stays exactly as documented;
# a design that closes them (the verdict produced where the program cannot reach) must turn these around.
FORGERIES = {
    "the token pipe named in sys.argv": """
        import os, sys
        os.write(int(sys.argv[2]), os.read(int(sys.argv[1]), 64))
    """,
    "a scan of the open descriptors": """
        import os
        fds = sorted(int(fd) for fd in os.listdir('/proc/self/fd') if int(fd) > 2)
        token = b''
        for fd in fds:
            try:
                os.set_blocking(fd, False)
                data = os.read(fd, 64)
            except OSError:
                continue
            if len(data) == 32:
                token = data
        for fd in fds:
            try:
                os.write(fd, token)
            except OSError:
                pass
    """,
    "the child's read, write and descriptors from the caller's frame": """
        import sys
        harness = sys._getframe(1).f_locals
        harness['write'](harness['result_fd'], harness['read'](harness['token_fd'], 64))
    """,
}


def wrong_program(problems, before: str = "") -> str:
    """Problem 0 with a body that fails its tests: it passes only if `check` never runs."""
    return textwrap.dedent(before) + "\n" + humaneval.program_for(problems[0], "    return None\n")


def test_a_wrong_program_without_a_forgery_fails(problems):
    outcome = sandbox.run(wrong_program(problems), 10.0)
    assert not outcome.passed and not outcome.finished and outcome.returncode == 1


@pytest.mark.parametrize("how", FORGERIES)
def test_known_limitation_a_deliberate_forgery_passes_without_running_check(problems, how):
    forged = FORGERIES[how] + "\n        import os\n        os._exit(0)\n"
    # a long test session holds many descriptors, so the child's pipes get high numbers (CI once saw them
    # above 19, past a fixed scan): hold 32 more here so the forgeries are pinned in that condition
    with contextlib.ExitStack() as held:
        for _ in range(32):
            held.enter_context(open(os.devnull))
        outcome = sandbox.run(wrong_program(problems, before=forged), 10.0)
    assert outcome.passed and outcome.finished and outcome.returncode == 0  # a pass the sandbox cannot tell


# --------------------------------------------------------------------------------- files outside the scratch

FILE_ATTACKS = {
    "os.remove": "os.remove(SENTINEL)",
    "os.unlink": "os.unlink(SENTINEL)",
    "Path.unlink": "pathlib.Path(SENTINEL).unlink()",
    "shutil.rmtree": "shutil.rmtree(FOLDER)",
    "os.rename": "os.rename(SENTINEL, SENTINEL + '.moved')",
    "os.truncate": "os.truncate(SENTINEL, 0)",
    "open(w) overwrite": "open(SENTINEL, 'w').write('overwritten')",
    "open(a) append": "open(SENTINEL, 'a').write('appended')",
    "write next to it": "open(os.path.join(FOLDER, 'intruder.txt'), 'w').write('x')",
    "Path.write_text": "pathlib.Path(FOLDER, 'intruder.txt').write_text('x')",
    "os.open": "os.close(os.open(os.path.join(FOLDER, 'intruder.txt'), os.O_CREAT | os.O_WRONLY))",
    "io.FileIO": "io.FileIO(os.path.join(FOLDER, 'intruder.txt'), 'w').close()",
    "os.mkdir": "os.mkdir(os.path.join(FOLDER, 'intruder'))",
    "relative path": "open('../' * 40 + SENTINEL.lstrip('/'), 'w').write('overwritten')",
    "rm via subprocess": "subprocess.run(['rm', '-f', SENTINEL])",
}
LAYERS = ["guard", pytest.param("landlock", marks=needs_landlock)]
ONLY = {"guard": {"landlock": False}, "landlock": {"guard": False}}  # keep one layer, switch the other off


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("attack", FILE_ATTACKS)
def test_files_outside_the_scratch_directory_survive(problems, tmp_path, layer, attack):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("intact")
    before = f"""
        import io, os, pathlib, shutil, subprocess
        FOLDER, SENTINEL = {str(tmp_path)!r}, {str(sentinel)!r}
        {FILE_ATTACKS[attack]}
    """
    outcome = sandbox.run(program(problems, before=before), 10.0, **ONLY[layer])
    assert sentinel.read_text() == "intact"
    assert sorted(os.listdir(tmp_path)) == ["sentinel.txt"]
    if attack != "rm via subprocess" or layer == "guard":  # rm itself is refused, the program may go on
        assert not outcome.passed


# -------------------------------------------------------------------------------------- children and groups

SPAWNS = {
    "subprocess.Popen": "subprocess.Popen(['sleep', '30'])",
    "subprocess.run": "subprocess.run(['true'])",
    "os.system": "os.system('sleep 30 &')",
    "os.popen": "os.popen('sleep 30 &')",
    "os.fork": "os.fork()",
    "os.posix_spawn": "os.posix_spawn('/bin/sleep', ['sleep', '30'], {})",
    "os.spawnv": "os.spawnv(os.P_NOWAIT, '/bin/sleep', ['sleep', '30'])",
    "os.execv": "os.execv('/bin/true', ['true'])",
    "multiprocessing": "multiprocessing.Process(target=time.sleep, args=(30,)).start()",
    "pty.fork": "pty.fork()",
    "ctypes": "import ctypes",
    "_posixsubprocess": "import _posixsubprocess",
}


@pytest.mark.parametrize("how", SPAWNS)
def test_the_guard_refuses_to_start_processes(problems, how):
    before = f"""
        import multiprocessing, os, pty, subprocess, time
        {SPAWNS[how]}
    """
    outcome = sandbox.run(program(problems, before=before), 10.0, landlock=False)
    assert not outcome.passed
    assert wait_gone(outcome.pgid) and group_members(outcome.pgid) == []


@pytest.mark.parametrize("ending", ["the program finishes", "the timeout kills it"])
def test_a_grandchild_dies_with_its_run(problems, tmp_path, ending):
    # guard off: the process-group kill alone must take the grandchild down
    pid_file, late_file = tmp_path / "pid", tmp_path / "late"
    before = f"""
        import os, time
        if os.fork() == 0:
            open({str(pid_file)!r}, 'w').write(str(os.getpid()))
            time.sleep(1.5)
            open({str(late_file)!r}, 'w').write('still alive')
            os._exit(0)
        while not os.path.exists({str(pid_file)!r}):
            time.sleep(0.01)
        {"time.sleep(60)" if ending == "the timeout kills it" else ""}
    """
    outcome = sandbox.run(program(problems, before=before), 1.0 if "timeout" in ending else 10.0,
                          guard=False, landlock=False)
    assert outcome.timed_out == ("timeout" in ending) and outcome.passed == ("finishes" in ending)
    grandchild = int(pid_file.read_text())
    assert wait_gone(grandchild)
    time.sleep(2.0)  # past the moment it would have written
    assert not late_file.exists()


class Interrupted(Exception):
    pass


def test_an_interrupted_run_leaves_no_process_behind(problems, tmp_path):
    # Ctrl-C (or any exception) in the harness while it waits must still take the whole group down
    pids = tmp_path / "pids"
    before = f"""
        import os, time
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{os.getpgid(0)}}')
        time.sleep(60)
    """

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with pytest.raises(Interrupted):
            sandbox.run(program(problems, before=before), 30.0, guard=False, landlock=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    leader, pgid = map(int, pids.read_text().split())
    assert wait_gone(leader) and wait_gone(pgid)
    deadline = time.monotonic() + 5.0
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == []


# ------------------------------------------------------------------------------------------------- output


def test_an_output_flood_never_reaches_the_harness_memory(problems):
    flood = """
        import sys
        chunk = b'x' * (1 << 20)
        for _ in range(512):
            sys.stdout.buffer.write(chunk)
            sys.stderr.buffer.write(chunk)
    """
    # A fresh harness process, so that its peak RSS is its own and not pytest's. VmHWM is the peak of this
    # address space; ru_maxrss would also carry the peak of the pytest process it was forked from.
    harness = textwrap.dedent(f"""
        from suites.evaluate import sandbox
        outcome = sandbox.run({program(problems, before=flood)!r}, 30.0)
        peak_kib = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))
        print(outcome.passed, int(peak_kib) * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", harness], capture_output=True, text=True, check=True)
    passed, peak_bytes = result.stdout.split()
    assert passed == "True"  # 1 GiB of output does not stop a correct program ...
    assert int(peak_bytes) < 128 << 20  # ... and none of it lands in the harness


# ------------------------------------------------------------------------------------------------- limits


def test_memory_beyond_the_address_space_limit_fails_in_the_child(problems):
    hog = f"""
        try:
            hog = bytearray({2 * sandbox.Limits().address_space})
        except MemoryError:
            raise SystemExit(3)
    """
    start = time.monotonic()
    outcome = sandbox.run(program(problems, before=hog), 10.0)
    assert outcome.returncode == 3 and not outcome.passed  # MemoryError in the child, not an OOM kill
    assert time.monotonic() - start < 5.0


def test_a_file_beyond_the_size_limit_fails(problems):
    big = f"""
        import errno
        try:
            open('big.bin', 'wb').write(b'x' * {2 * sandbox.Limits().file_size})
        except OSError as e:
            raise SystemExit(4 if e.errno == errno.EFBIG else 5)
    """
    outcome = sandbox.run(program(problems, before=big), 10.0)
    assert outcome.returncode == 4 and not outcome.passed


def test_cpu_time_is_limited_apart_from_the_wall_clock(problems):
    start = time.monotonic()
    outcome = sandbox.run(program(problems, before="while True:\n    pass\n"), 8.0,
                          limits=sandbox.Limits(cpu_seconds=1))
    # soft = hard, so the kernel's hard-limit SIGKILL; the harness kills only at the wall-clock timeout
    assert outcome.returncode == -signal.SIGKILL and not outcome.timed_out
    assert time.monotonic() - start < 7.0


def test_the_wall_clock_timeout_kills_a_sleeping_program(problems):
    outcome = sandbox.run(program(problems, before="import time\ntime.sleep(60)\n"), 1.0)
    assert outcome.timed_out and outcome.returncode == -signal.SIGKILL and not outcome.passed


def test_the_limits_are_in_force_in_the_child(problems):
    timeout = 2.5
    limits = sandbox.Limits()
    expected = {  # /proc/self/limits names; cpu seconds: the timeout rounded up, plus one
        "Max address space": limits.address_space,
        "Max processes": limits.processes,
        "Max file size": limits.file_size,
        "Max cpu time": 4,
        "Max core file size": 0,
    }
    check = f"""
        found = {{}}
        for line in open('/proc/self/limits'):
            name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
            found[name] = (soft, hard)
        for name, value in {expected!r}.items():
            assert found[name] == (str(value), str(value)), (name, found[name])
    """
    assert sandbox.run(program(problems, before=check), timeout).passed


def test_the_program_cannot_raise_its_limits_again(problems):
    # guard off (it would refuse `import resource`): what stops this is soft = hard, and for root the
    # dropped capabilities (CAP_SYS_RESOURCE would allow raising a hard limit)
    lift = """
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    """
    outcome = sandbox.run(program(problems, before=lift), 10.0, guard=False)
    assert not outcome.passed and outcome.returncode == 1


def test_the_child_holds_no_capabilities(problems):
    # for root this is what makes the hard limits final and takes away power over other users' processes
    check = """
        status = dict(line.split(':\t', 1) for line in open('/proc/self/status'))
        assert int(status['CapEff'], 16) == int(status['CapPrm'], 16) == 0, status['CapEff']
        assert status['NoNewPrivs'].strip() == '1'
    """
    assert sandbox.run(program(problems, before=check), 10.0, guard=False, landlock=False).passed


FORKS = """
    import os, time
    created = 0
    try:
        for _ in range(64):
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            created += 1
    except Exception:
        raise SystemExit(100 + created)
"""


def test_a_fork_bomb_is_contained_by_the_guard(problems):
    start = time.monotonic()
    outcome = sandbox.run(program(problems, before=FORKS), 10.0)
    assert outcome.returncode == 100 and not outcome.passed  # not a single fork
    assert time.monotonic() - start < 5.0
    assert wait_gone(outcome.pgid) and group_members(outcome.pgid) == []


@pytest.mark.skipif(
    not sandbox.nproc_enforced(),
    reason="Linux does not enforce RLIMIT_NPROC for uid 0: as root the guard (test above) contains forks",
)
def test_a_fork_bomb_is_contained_by_the_process_limit(problems):
    outcome = sandbox.run(program(problems, before=FORKS), 10.0, guard=False)
    assert 100 <= outcome.returncode < 100 + sandbox.Limits().processes and not outcome.passed
    assert wait_gone(outcome.pgid) and group_members(outcome.pgid) == []


# ------------------------------------------------------------------------------------ other processes, net


@pytest.mark.parametrize(
    "layer", ["guard", pytest.param("landlock", marks=pytest.mark.skipif(LANDLOCK < 6, reason="ABI < 6"))]
)
def test_other_processes_cannot_be_signalled(problems, layer):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        before = f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)\n"
        outcome = sandbox.run(program(problems, before=before), 10.0, **ONLY[layer])
        assert not outcome.passed
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.skipif(LANDLOCK < 4, reason="Landlock ABI < 4 has no network rules")
def test_tcp_connections_are_refused_by_landlock(problems):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        before = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
        outcome = sandbox.run(program(problems, before=before), 10.0, guard=False)
    assert not outcome.passed


# --------------------------------------------------------------------------------- scratch and environment


def test_each_run_gets_a_fresh_scratch_directory_and_a_minimal_environment(problems):
    seeded_hash = subprocess.run(
        [sys.executable, "-c", "print(hash('oasis'))"], env={"PYTHONHASHSEED": "0"},
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    check = f"""
        import os
        assert os.listdir('.') == ['program.py'], os.listdir('.')  # nothing left by an earlier run
        assert os.getcwd() == os.environ['TMPDIR'] == os.environ['HOME'] != {os.getcwd()!r}
        assert set(os.environ) <= {{'PATH', 'PYTHONHASHSEED', 'TMPDIR', 'HOME', 'LC_CTYPE'}}, set(os.environ)
        assert os.getpid() != {os.getpid()}
        assert hash('oasis') == {seeded_hash}  # PYTHONHASHSEED=0 is in force: set order is reproducible
        open('left-behind.txt', 'w').write('x')
        import tempfile
        with tempfile.TemporaryFile() as f:  # TMPDIR is the scratch directory, writable
            f.write(b'x')
    """
    first, second = sandbox.run_many([program(problems, before=check)] * 2, 10.0, workers=1)
    assert first.passed and second.passed
