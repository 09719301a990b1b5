"""Code sandbox: math programs work, each attack from the issue fails, the CLI keeps its word."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import search.sandbox as sandbox_module
from flows.cli import main
from search.sandbox import ExecResult, Sandbox, SandboxConfig, SandboxSetupError, SandboxUnavailable

LIMITS = SandboxConfig(timeout_s=1.0, memory_mb=256, max_processes=8, max_file_bytes=1_000_000)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(LIMITS) as box:
        yield box


@pytest.fixture(scope="module")
def patient() -> Iterator[Sandbox]:
    """Generous timeouts, for tests whose property is ordering, not limits: a loaded CI machine
    can take over a second to fork a sympy program, which LIMITS would call a timeout."""
    with Sandbox(SandboxConfig(**{**LIMITS.__dict__, "timeout_s": 30.0})) as box:
        yield box


@pytest.fixture(scope="module")
def one_worker() -> Iterator[Sandbox]:
    """A single worker, so consecutive programs are guaranteed to share it (for leak tests)."""
    with Sandbox(SandboxConfig(**{**LIMITS.__dict__, "workers": 1})) as box:
        yield box


def run(box: Sandbox, source: str) -> ExecResult:
    return box.run(textwrap.dedent(source))


def host_processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                if marker.encode() in cmdline.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


# Normal programs


def test_stdlib_math_program_prints_its_result(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import math, itertools
        from fractions import Fraction
        total = sum(Fraction(1, n) for n in range(1, 5))
        pairs = len(list(itertools.combinations(range(6), 2)))
        print(total, pairs, math.comb(10, 3), math.isqrt(99))
    """)
    assert result == ExecResult(ok=True, stdout="25/12 15 120 9\n", error=None)


def test_sympy_program_prints_its_result(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        from sympy import symbols, solve, Rational
        x = symbols('x')
        print(sorted(solve(x**2 - 5*x + 6, x)), Rational(3, 4) + Rational(1, 4))
    """)
    assert result.stdout == "[2, 3] 1\n" and result.ok


def test_numpy_program_prints_its_result(sandbox: Sandbox) -> None:
    pytest.importorskip("numpy")
    result = run(sandbox, "import numpy as np\nprint(int(np.arange(1, 11).sum()))")
    assert result.stdout == "55\n" and result.ok


def test_exception_is_reported_as_its_last_traceback_line(sandbox: Sandbox) -> None:
    result = run(sandbox, "print('before')\n1 / 0")
    assert result == ExecResult(ok=False, stdout="before\n",
                                error="ZeroDivisionError: division by zero")


def test_sys_exit_with_nonzero_code_is_an_error(sandbox: Sandbox) -> None:
    assert run(sandbox, "import sys\nsys.exit(3)").error == "SystemExit: 3"


def test_stderr_is_not_mixed_into_stdout(sandbox: Sandbox) -> None:
    result = run(sandbox, "import sys\nprint('warn', file=sys.stderr)\nprint('out')")
    assert result.stdout == "out\n"


def test_run_many_returns_results_in_input_order(patient: Sandbox) -> None:
    programs = [f"print({i})" if i % 3 else f"import sympy\nprint(sympy.Integer({i}))"
                for i in range(40)]
    programs[7] = "raise ValueError('seven')"
    results = patient.run_many(programs)
    assert [r.stdout for r in results] == [
        "" if i == 7 else f"{i}\n" for i in range(40)]
    assert results[7].error == "ValueError: seven"


def test_concurrent_callers_each_get_their_own_results(patient: Sandbox) -> None:
    programs = [f"print({i})" if i % 4 else f"import sympy\nprint(sympy.Integer({i}))"
                for i in range(60)]
    with ThreadPoolExecutor(6) as pool:
        outputs = list(pool.map(lambda program: patient.run(program).stdout, programs))
    assert outputs == [f"{i}\n" for i in range(60)]


def test_programs_queued_behind_a_retiring_worker_still_run(sandbox: Sandbox) -> None:
    leave_ipc = "import ctypes\nctypes.CDLL(None).shmget(0, 4096, 0o1600)\nprint('ipc')"
    programs = [leave_ipc if i % 5 == 3 else f"print({i})" for i in range(20)]
    results = sandbox.run_many(programs)
    assert [r.stdout for r in results] == ["ipc\n" if i % 5 == 3 else f"{i}\n" for i in range(20)]


def test_an_answer_sent_just_before_the_worker_retires_is_kept(
        one_worker: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retiring worker answers and exits; the host may only notice when it pipelines the next
    request. Regression: that program was then reported as killing its worker."""
    leave_ipc = "import ctypes\nctypes.CDLL(None).shmget(0, 4096, 0o1600)\nprint('ipc')"
    send = sandbox_module._WorkerSlot.send

    def send_once_the_worker_is_gone(slot: sandbox_module._WorkerSlot, index: int,
                                     payload: bytes) -> None:
        if slot.in_flight:  # a host slow to come back: the worker answered and exited meanwhile
            slot._process.wait(timeout=30)
        send(slot, index, payload)

    monkeypatch.setattr(sandbox_module._WorkerSlot, "send", send_once_the_worker_is_gone)
    results = one_worker.run_many([leave_ipc, "print('next')"])
    assert [(r.stdout, r.error) for r in results] == [("ipc\n", None), ("next\n", None)]


def test_programs_and_outputs_larger_than_a_pipe_pass_through(sandbox: Sandbox) -> None:
    programs = [f"#{'x' * 300_000}\nprint('y' * 50_000)\nprint({i})" for i in range(6)]
    results = sandbox.run_many(programs)
    assert [r.stdout for r in results] == [f"{'y' * 50_000}\n{i}\n" for i in range(6)]


# State does not leak between programs


def test_globals_do_not_leak(one_worker: Sandbox) -> None:
    run(one_worker, "leaked = 41")
    assert run(one_worker, "print(leaked)").error == "NameError: name 'leaked' is not defined"


def test_program_runs_in_fresh_globals_without_the_workers_imports(sandbox: Sandbox) -> None:
    assert run(sandbox, "print(os.getpid())").error == "NameError: name 'os' is not defined"


def test_module_monkeypatching_does_not_leak(one_worker: Sandbox) -> None:
    run(one_worker, "import math\nmath.pi = 3")
    assert run(one_worker, "import math\nprint(math.pi)").stdout == "3.141592653589793\n"


def test_files_do_not_leak(one_worker: Sandbox) -> None:
    run(one_worker, "open('note.txt', 'w').write('x')\nopen('/tmp/other.txt', 'w').write('y')")
    result = run(one_worker, "import os\nprint(os.listdir('.'), 'other.txt' in os.listdir('/tmp'))")
    assert result.stdout == "[] False\n"


def test_worker_is_kept_when_site_packages_lives_under_tmp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bwrap builds the mount point of an installation under the host's /tmp inside the private
    /tmp; cleaning must not take it for a program's leftover and replace the worker every time
    (a checkout, and so its .venv, under /tmp). Regression."""
    starts = []
    start = sandbox_module._Launcher.start

    def counted_start(launcher: sandbox_module._Launcher,
                      preload: tuple[str, ...]) -> tuple[subprocess.Popen, str | None]:
        starts.append(preload)
        return start(launcher, preload)

    monkeypatch.setattr(sandbox_module._Launcher, "start", counted_start)
    with tempfile.TemporaryDirectory(dir="/tmp") as under_tmp:
        site_packages = Path(under_tmp, "venv", "site-packages")
        site_packages.mkdir(parents=True)
        monkeypatch.syspath_prepend(str(site_packages))
        with Sandbox(SandboxConfig(**{**LIMITS.__dict__, "workers": 1})) as box:
            outputs = [run(box, f"print({i})").stdout for i in range(3)]
    assert (outputs, len(starts)) == (["0\n", "1\n", "2\n"], 1)


def test_sysv_shared_memory_does_not_leak(one_worker: Sandbox) -> None:
    created = run(one_worker, "import ctypes\nprint(ctypes.CDLL(None).shmget(0, 4096, 0o1600))")
    assert created.stdout.strip().isdigit()
    table = run(one_worker, "print(len(open('/proc/sysvipc/shm').read().splitlines()))")
    assert table.stdout == "1\n"  # header only


# Limits


def test_infinite_loop_times_out(sandbox: Sandbox) -> None:
    result = run(sandbox, "while True:\n    pass")
    assert (result.timed_out, result.error) == (True, "timeout")


def test_sleep_times_out(sandbox: Sandbox) -> None:
    assert run(sandbox, "import time\ntime.sleep(60)").timed_out


def test_cpu_burning_children_are_killed_at_the_timeout(sandbox: Sandbox) -> None:
    marker = f"burn-{uuid.uuid4().hex}"
    result = run(sandbox, f"""
        import subprocess, sys
        for _ in range(3):
            subprocess.Popen([sys.executable, '-c', 'while True: pass', '{marker}'])
        while True:
            pass
    """)
    assert result.timed_out and host_processes_mentioning(marker) == []


def test_cpu_time_over_several_threads_ends_as_a_cpu_timeout() -> None:
    # Two threads hashing large buffers (hashlib drops the GIL) on two free cores use 3 s of CPU,
    # the limit for a 2.99 s timeout, in about 1.5 s of wall time: the CPU limit ends the program
    # first. The program prints the CPU time it has used as it goes.
    with Sandbox(SandboxConfig(**{**LIMITS.__dict__, "timeout_s": 2.99, "workers": 1})) as box:
        result = run(box, """
            import hashlib, threading, time
            data = bytes(1 << 24)
            def burn():
                while True:
                    hashlib.sha256(data).digest()
            for _ in range(2):
                threading.Thread(target=burn, daemon=True).start()
            while True:
                time.sleep(0.05)
                print(time.process_time(), flush=True)
        """)
    cpu_used = float(result.stdout.split()[-1]) if result.stdout.split() else 0.0
    if result.error == "timeout" and cpu_used < 3:
        pytest.skip(f"too few free cores: {cpu_used:.1f} s of CPU by the 2.99 s wall-clock limit")
    assert (result.timed_out, result.error) == (True, "timeout (CPU time limit of 3 s)")


@pytest.mark.parametrize("bomb", [
    "data = bytearray(4 * 1024 ** 3)",
    "chunks = []\nwhile True:\n    chunks.append(' ' * 10 ** 6)",
], ids=["one-allocation", "gradual"])
def test_memory_bomb_reports_memory_exceeded(sandbox: Sandbox, bomb: str) -> None:
    result = run(sandbox, bomb)
    assert (result.memory_exceeded, result.error) == (True, "memory limit exceeded")


def test_fork_bomb_is_stopped_by_the_process_limit(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os, time
        forked = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
        except OSError:
            print(forked)
    """)
    assert int(result.stdout) < LIMITS.max_processes


def test_a_program_that_forks_and_waits_for_its_child_ends_ok(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os
        pid = os.fork()
        if pid:
            os.waitpid(pid, 0)
            print('parent')
    """)
    assert result == ExecResult(ok=True, stdout="parent\n", error=None)


def test_file_size_limit(sandbox: Sandbox) -> None:
    result = run(sandbox, f"open('big', 'wb').write(b'x' * {2 * LIMITS.max_file_bytes})")
    assert result.error == "OSError: [Errno 27] File too large"


def test_huge_output_is_truncated_with_a_marker(sandbox: Sandbox) -> None:
    result = run(sandbox, "for _ in range(1000):\n    print('x' * 10000)")
    limit = LIMITS.max_output_bytes
    assert result.ok and result.stdout.startswith("x" * 100)
    assert result.stdout.endswith(f"[output truncated: more than {limit} bytes]")
    assert len(result.stdout) < limit + 100


# Isolation


def test_cannot_connect_to_a_listener_on_the_host(sandbox: Sandbox) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        result = run(sandbox, f"""
            import socket
            socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hello')
        """)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert not result.ok


def test_dns_does_not_resolve(sandbox: Sandbox) -> None:
    result = run(sandbox, "import socket\nsocket.getaddrinfo('example.com', 443)")
    assert result.error is not None and result.error.startswith("socket.gaierror")


def test_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_TEST_SECRET", "hunter2")
    with Sandbox(LIMITS) as box:
        result = run(box, "import os\nprint(dict(os.environ))")
    assert result.ok and "hunter2" not in result.stdout and "KAIZEN" not in result.stdout


def test_cannot_read_a_file_in_the_hosts_tmp(sandbox: Sandbox) -> None:
    with tempfile.NamedTemporaryFile("w", dir=tempfile.gettempdir(), suffix=".secret") as secret:
        secret.write("hunter2")
        secret.flush()
        result = run(sandbox, f"print(open({secret.name!r}).read())")
    assert result.error is not None and result.error.startswith("FileNotFoundError")


def test_cannot_read_a_file_in_the_home_directory(sandbox: Sandbox) -> None:
    secret = Path.home() / f".kaizen-sandbox-test-{uuid.uuid4().hex}"
    secret.write_text("hunter2")
    try:
        result = run(sandbox, f"print(open({str(secret)!r}).read())")
    finally:
        secret.unlink()
    assert result.error is not None and "hunter2" not in result.stdout


def test_cannot_write_outside_the_private_tmp(sandbox: Sandbox) -> None:
    targets = ["/", "/usr", "/etc", "/dev/shm", str(Path.home()), sys.prefix,
               os.path.dirname(os.__file__)]
    result = run(sandbox, f"""
        written = []
        for directory in {targets!r}:
            try:
                open(directory + '/kaizen-escape', 'w').write('x')
                written.append(directory)
            except OSError:
                pass
        print(written)
    """)
    assert result.stdout == "[]\n"


SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists() or not Path("/usr/bin/setpriv").exists(),
                    reason="runs the sandbox's host as an unprivileged user, which needs root and setpriv")
def test_a_host_that_is_not_root_gives_programs_no_writable_place_but_tmp() -> None:
    # bwrap's root and /dev belong to the user who starts it: writable, unless remounted read-only.
    program = ("import os\nfor d in ('/', '/etc', '/dev', '/dev/shm', '/tmp'):\n    try:\n"
               "        open(d + '/probe', 'w').close(); print(d)\n    except OSError:\n        pass")
    host = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
            "from search.sandbox import Sandbox, SandboxConfig\n"
            f"with Sandbox(SandboxConfig(workers=1)) as box: print(box.run({program!r}).stdout, end='')")
    result = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             str(SYSTEM_PYTHON), "-I", "-c", host], capture_output=True, text=True, timeout=60,
                            cwd="/", check=False)
    assert result.stdout == "/tmp\n", result.stderr


def test_child_processes_die_with_the_program(sandbox: Sandbox) -> None:
    marker = f"{uuid.uuid4().int % 10 ** 6 + 10 ** 6}.5"  # a unique `sleep` argument
    result = run(sandbox, f"""
        import subprocess
        subprocess.Popen(['sleep', '{marker}'], start_new_session=True)
        print('spawned')
    """)
    assert result.stdout == "spawned\n" and host_processes_mentioning(f"sleep\0{marker}") == []


def test_threads_do_not_keep_the_program_alive(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import threading, time
        threading.Thread(target=time.sleep, args=(60,)).start()
        print('main done')
    """)
    assert result == ExecResult(ok=True, stdout="main done\n", error=None)


def test_program_cannot_create_namespaces(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
    """)
    assert result.stdout == "-1 1\n"  # EPERM


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch only happens for a root host")
def test_program_runs_unprivileged_when_the_host_is_root(sandbox: Sandbox) -> None:
    assert run(sandbox, "import os\nprint(os.getuid(), os.getgroups())").stdout == "65534 []\n"


def test_program_whose_worker_dies_gets_an_error_and_the_next_one_runs(one_worker: Sandbox) -> None:
    def kill_the_workers() -> None:  # from the host: programs cannot reach their worker
        for pool in one_worker._pools.values():
            for slot in pool._slots:
                if slot._process is not None:
                    slot._process.kill()

    timer = threading.Timer(0.3, kill_the_workers)
    timer.start()
    killed = run(one_worker, "import time\ntime.sleep(0.9)")
    timer.join()
    assert killed.error is not None and "worker died" in killed.error
    assert run(one_worker, "print('next')").stdout == "next\n"


@pytest.mark.parametrize("attack", [
    "os.kill(2, signal.SIGSTOP)",  # the worker
    "os.kill(-1, signal.SIGSTOP)",  # every process the uid may signal, the worker too
    "os.kill(0, signal.SIGSTOP)",  # the process group the program shares with its worker
    "resource.prlimit(2, resource.RLIMIT_FSIZE, (1000, 1000))",  # would break every later program
    "os.setpriority(os.PRIO_PROCESS, 2, 19)",
    "os.setpriority(os.PRIO_USER, 0, 19)",  # every process of the uid
    "os.sched_setaffinity(2, {0})",
    "import fcntl\nfcntl.fcntl(os.pipe()[0], fcntl.F_SETOWN, 2)",  # the kernel would send it SIGIO
    "import fcntl, socket, struct\ns = socket.socket()\nfcntl.ioctl(s.fileno(), 0x8901, struct.pack('i', 2))",
], ids=["kill-worker", "kill-all", "kill-group", "prlimit-worker", "renice-worker", "renice-uid", "pin-worker",
        "own-pipe", "own-socket"])
def test_a_program_cannot_touch_its_worker(one_worker: Sandbox, attack: str) -> None:
    result = run(one_worker, f"import os, resource, signal\n{attack}")
    assert result.error == "PermissionError: [Errno 1] Operation not permitted"
    assert run(one_worker, "print('next')").stdout == "next\n"


def test_a_program_may_still_limit_renice_and_signal_itself_and_its_children(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os, resource, subprocess
        resource.prlimit(0, resource.RLIMIT_NOFILE, (64, 64))
        os.nice(1)
        child = subprocess.Popen(["sleep", "5"])
        child.kill()
        print(child.wait())
    """)
    assert result.stdout == "-9\n"


@pytest.mark.parametrize("syscall", [
    "libc.syscall(319 if machine == 'x86_64' else 279, b'x', 0)",  # memfd_create
    "libc.syscall(240 if machine == 'x86_64' else 180, b'/kz', 0o100 | 2, 0o600, None)",  # mq_open
    "libc.syscall(248 if machine == 'x86_64' else 217, b'user', b'kz', b'v', 1, -4)",  # add_key
], ids=["memfd", "posix-message-queue", "keyring"])
def test_kernel_objects_that_outlive_a_program_are_refused(sandbox: Sandbox, syscall: str) -> None:
    result = run(sandbox, f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        machine = os.uname().machine
        print({syscall}, ctypes.get_errno())
    """)
    assert result.stdout == "-1 1\n"  # EPERM


def test_sockets_other_than_unix_and_ip_are_refused(sandbox: Sandbox) -> None:
    result = run(sandbox, "import socket\nsocket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)")
    assert result.error == "PermissionError: [Errno 1] Operation not permitted"


def test_a_status_report_forged_by_the_program_is_not_believed(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os
        for fd in range(3, 64):
            try:
                os.write(fd, b'{"ok": true}')
                os.close(fd)
            except OSError:
                pass
        raise ValueError("this program failed")
    """)
    assert not result.ok


def test_a_program_that_points_the_report_pipe_elsewhere_is_not_believed(sandbox: Sandbox) -> None:
    result = run(sandbox, """
        import os
        null = os.open("/dev/null", os.O_WRONLY)
        for fd in range(3, 64):
            if fd != null:
                try:
                    os.dup2(null, fd)
                except OSError:
                    pass
        raise ValueError("this program failed")
    """)
    assert not result.ok


def test_a_program_ending_in_os_exit_0_is_not_reported_ok(sandbox: Sandbox) -> None:
    result = run(sandbox, "import os\nos._exit(0)")
    assert not result.ok and "without reporting" in result.error


# Bad input


@pytest.mark.parametrize(("program", "error"), [
    ("print(", "syntax error: '(' was never closed (line 1)"),
    ("x = 1\0", "syntax error: source code string cannot contain null bytes"),
    ("", "empty program"),
    ("  \n\t\n", "empty program"),
    ("print('\udc80')", "program is not valid UTF-8: surrogates not allowed at position 7"),
    ("#" * (LIMITS.max_program_bytes + 1),
     f"program too large: {LIMITS.max_program_bytes + 1} bytes "
     f"(limit {LIMITS.max_program_bytes})"),
], ids=["syntax", "null-byte", "empty", "blank", "not-utf8", "oversized"])
def test_bad_program_gets_an_error_result(sandbox: Sandbox, program: str, error: str) -> None:
    assert sandbox.run(program) == ExecResult(ok=False, stdout="", error=error)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="docker")


@pytest.mark.parametrize("timeout_s", [0.0, float("inf")], ids=["zero", "infinite"])
def test_config_refuses_a_zero_or_infinite_timeout(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=timeout_s)


def test_a_very_long_exception_message_is_cut_to_the_error_text_limit(sandbox: Sandbox) -> None:
    result = run(sandbox, "raise ValueError('x' * 10_000)")
    assert result.error == ("ValueError: " + "x" * 10_000)[:2000]


# Failing loudly


def test_missing_bwrap_raises_with_the_fix(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxSetupError, match=r"apt-get install bubblewrap.*isolation='none'"):
        Sandbox(LIMITS)


def test_bwrap_that_cannot_create_namespaces_raises_with_its_message(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\n"
                    "echo 'bwrap: No permissions to create new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        Sandbox(LIMITS)


def test_isolation_none_still_runs_programs_with_limits() -> None:
    with Sandbox(SandboxConfig(**{**LIMITS.__dict__, "isolation": "none"})) as box:
        assert run(box, "print(6 * 7)").stdout == "42\n"
        assert run(box, "while True:\n    pass").timed_out


# CLI


def kaizen_exec(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                stdin: bytes, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["exec", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_one_json_object_and_exits_0_when_the_program_fails(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = kaizen_exec(monkeypatch, capsys, b"print('hi')\n1/0\n")
    assert code == 0
    assert json.loads(out) == {"ok": False, "stdout": "hi\n",
                               "error": "ZeroDivisionError: division by zero",
                               "timed_out": False, "memory_exceeded": False}


def test_cli_reports_a_non_utf8_program_as_a_json_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = kaizen_exec(monkeypatch, capsys, b"print('\xff')")
    assert code == 0 and json.loads(out)["error"].startswith("program is not valid UTF-8")


def test_cli_reports_an_oversized_program_as_a_json_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    limit = SandboxConfig.max_program_bytes
    code, out, _ = kaizen_exec(monkeypatch, capsys, b"#" * (limit + 10))
    assert code == 0 and json.loads(out)["error"] == f"program too large: more than {limit} bytes"


def test_cli_timeout_option(monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = kaizen_exec(monkeypatch, capsys, b"import time\ntime.sleep(9)", "--timeout",
                               "0.3")
    assert code == 0 and json.loads(out)["timed_out"] is True


def test_cli_batch_prints_one_line_per_program_in_order(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [json.dumps({"code": f"print({i} * {i})"}) for i in range(12)]
    code, out, _ = kaizen_exec(monkeypatch, capsys, "\n".join(lines).encode(), "--batch")
    assert code == 0
    assert [json.loads(line)["stdout"] for line in out.splitlines()] == [
        f"{i * i}\n" for i in range(12)]


def test_cli_batch_names_the_malformed_line_and_runs_nothing(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stdin = b'{"code": "print(1)"}\n{"code": "print(2)"\n{"code": "print(3)"}\n'
    code, out, err = kaizen_exec(monkeypatch, capsys, stdin, "--batch")
    assert (code, out) == (2, "")
    assert err.startswith("kaizen exec: error: line 2: malformed JSON") and err.count("\n") == 1


def test_cli_batch_rejects_a_line_without_code(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = kaizen_exec(monkeypatch, capsys, b'{"code": "print(1)"}\n[1, 2]\n', "--batch")
    assert code == 2 and "line 2" in err


def test_cli_usage_error_is_one_line_and_exit_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = kaizen_exec(monkeypatch, capsys, b"print(1)", "--timeout", "soon")
    assert (code, out) == (2, "")
    assert err.startswith("kaizen exec: error:") and err.count("\n") == 1


def test_cli_without_bwrap_says_how_to_fix_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = kaizen_exec(monkeypatch, capsys, b"print(1)")
    assert (code, out) == (1, "")
    assert "apt-get install bubblewrap" in err and err.count("\n") == 1


def test_installed_kaizen_script_runs_a_program() -> None:
    script = Path(sys.executable).with_name("kaizen")
    completed = subprocess.run([str(script), "exec"], input=b"print(2 ** 10)",
                               capture_output=True, timeout=60, check=False)
    assert completed.returncode == 0
    assert json.loads(completed.stdout)["stdout"] == "1024\n"
