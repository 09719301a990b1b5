"""Child processes that do not outlive what started them: the kernel tie and the in-child watcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models.lifetime import (
    WATCHED_PROCESS_ENV, _launcher, _targets, process_identity, process_is_running, tie_to_this_thread,
    watch_environment,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG and /proc are Linux's")
REPO_ROOT = Path(__file__).resolve().parents[1]

# A launcher as models.training starts a run: the child in a session of its own, watching it. The
# child starts a grandchild in its group (as accelerate starts its workers) and both print their pids.
LAUNCHER = """
import os, subprocess, sys, time
from models.lifetime import watch_environment
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                         env={**os.environ, **watch_environment()})
time.sleep(600)
"""
WATCHING_CHILD = """
import subprocess, time
from models.lifetime import stop_when_parent_gone
stop_when_parent_gone(interval_s=0.1, grace_s=1.0)
worker = subprocess.Popen(["sleep", "600"])
print(__import__("os").getpid(), worker.pid, flush=True)
time.sleep(600)
"""
# Its worker ignores SIGTERM: only the SIGKILL after the grace period ends it.
CHILD_WITH_A_STUBBORN_WORKER = """
import subprocess, time
from models.lifetime import stop_when_parent_gone
stop_when_parent_gone(interval_s=0.1, grace_s=1.0)
worker = subprocess.Popen(["sh", "-c", "trap '' TERM; echo ready; exec sleep 600"], stdout=subprocess.PIPE, text=True)
worker.stdout.readline()
print(__import__("os").getpid(), worker.pid, flush=True)
time.sleep(600)
"""
# As accelerate launches through torch elastic: the launcher (a session of its own, which would
# restart its workers) starts each worker in a session of its own; the worker watches.
ELASTIC_LAUNCHER = """
import os, subprocess, sys, time
worker_code = ("from models.lifetime import stop_when_parent_gone; import time; "
               "stop_when_parent_gone(interval_s=0.1, grace_s=1.0); print('up', flush=True); time.sleep(600)")
worker = subprocess.Popen([sys.executable, "-c", worker_code], start_new_session=True, stdout=subprocess.PIPE, text=True)
worker.stdout.readline()
print(os.getpid(), worker.pid, flush=True)
time.sleep(600)
"""


def _start_in_a_thread_that_exits() -> subprocess.Popen:
    started: list[subprocess.Popen] = []

    def start() -> None:
        started.append(subprocess.Popen(["sleep", "60"], start_new_session=True, preexec_fn=tie_to_this_thread()))

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    return started[0]


def test_a_tied_child_in_its_own_session_dies_with_the_thread_that_started_it() -> None:
    child = _start_in_a_thread_that_exits()
    deadline = time.monotonic() + 5
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is not None
    child.wait()


def test_an_untied_child_outlives_the_thread() -> None:
    holder: list[subprocess.Popen] = []
    thread = threading.Thread(target=lambda: holder.append(subprocess.Popen(["sleep", "60"], start_new_session=True)))
    thread.start()
    thread.join()
    time.sleep(0.3)
    try:
        assert holder[0].poll() is None
    finally:
        holder[0].kill()
        holder[0].wait()


def _launch(child_code: str) -> tuple[subprocess.Popen, list[str]]:
    """The launcher, and the identities (`process_identity`) of the processes its child printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, child_code], stdout=subprocess.PIPE, text=True,
                                env=env)
    return launcher, [process_identity(int(pid)) for pid in launcher.stdout.readline().split()]


def _wait_until_gone(processes: list[str], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(map(process_is_running, processes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(map(process_is_running, processes))


def _kill(processes: list[str]) -> None:
    for process in processes:
        if process_is_running(process):
            os.kill(int(process.partition(":")[0]), signal.SIGKILL)


@pytest.mark.parametrize("child", [WATCHING_CHILD, CHILD_WITH_A_STUBBORN_WORKER, ELASTIC_LAUNCHER],
                         ids=["its-group", "a-worker-ignoring-sigterm", "an-elastic-launcher-and-worker"])
def test_killing_the_launcher_outright_stops_what_the_watching_child_started(child: str) -> None:
    launcher, pids = _launch(child)
    launcher.kill()
    launcher.wait()
    try:
        assert _wait_until_gone(pids, timeout_s=10)
    finally:
        _kill(pids)  # nothing left sleeping for ten minutes after a failure


def test_a_watching_child_keeps_running_while_the_launcher_lives() -> None:
    launcher, pids = _launch(WATCHING_CHILD)
    try:
        time.sleep(1.0)
        assert all(map(process_is_running, pids))
    finally:
        _kill(pids)
        launcher.kill()
        launcher.wait()


def test_the_watched_identity_names_this_process() -> None:
    assert process_is_running(watch_environment()[WATCHED_PROCESS_ENV])


def test_a_reused_pid_with_another_start_time_is_not_the_watched_process() -> None:
    assert not process_is_running(f"{os.getpid()}:1")


def test_an_exited_process_is_not_running() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert not process_is_running(f"{child.pid}:")


def test_a_child_orphaned_before_its_watcher_started_names_no_launcher() -> None:
    """Its parent is then init or a subreaper (or, here, a process the watched one never started)."""
    assert _launcher(watched_pid=2**22 + 12345) is None


def test_init_and_every_process_are_never_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    import models.lifetime

    monkeypatch.setattr(models.lifetime, "_own_session", lambda pid: True)  # as init is on most machines
    assert all(abs(target) > 1 for target in _targets(launcher="1:"))
