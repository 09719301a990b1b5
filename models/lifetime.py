"""Child processes that do not outlive what started them, even when it is killed outright.

Two ways, for two kinds of child. `tie_to_this_thread` is a kernel tie (PR_SET_PDEATHSIG) for a
child that does nothing else at start (the vLLM server). `watch_environment` + `stop_when_parent_gone`
is a watcher thread inside the child (training runs): no `preexec_fn`, which in a training start
sometimes cost `kaizen` its SIGTERM; it follows the whole process, not one of its threads, and it
reaches processes in sessions of their own (accelerate's launcher and its workers).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def tie_to_this_thread() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGTERM the child when the thread starting it exits.

    A server starts in a session of its own (so its whole process group can be stopped), so without
    this a flow run killed outright (SIGKILL from a cancelled run or the OOM killer) leaves it
    holding its GPUs, and every later server start fails. The
    signal follows the starting thread, not the process: a child is always waited for by the call
    that started it, in that thread. prctl is looked up here, before the fork, so the child only
    makes one call. None (no tie) off Linux.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def tie() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return tie


WATCHED_PROCESS_ENV = "KAIZEN_WATCHED_PROCESS"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None for no such
    process, a zombie (it has already exited) or no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may itself hold spaces and parentheses
    return None if fields[0] == "Z" else fields


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks after boot), or None where it cannot be read.

    Together with the pid it names one process: a pid reused by a later process has another start.
    """
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def process_identity(pid: int) -> str:
    """`pid:start_time`, naming one process for `process_is_running` (just `pid:` without /proc)."""
    return f"{pid}:{_start_time(pid) or ''}"


def watch_environment() -> dict[str, str]:
    """Environment entries naming this process, for a child that `stop_when_parent_gone` watches."""
    return {WATCHED_PROCESS_ENV: process_identity(os.getpid())}


def process_is_running(identity: str) -> bool:
    """Whether the process named `pid:start_time` (`process_identity`) still runs."""
    pid_text, _, start = identity.partition(":")
    pid = int(pid_text)
    if start:
        return _start_time(pid) == start
    try:  # no /proc here: the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_session(pid: int) -> bool:
    """Whether `pid` leads a session of its own (as a launcher's `start_new_session` makes it)."""
    try:
        return os.getpgid(pid) == pid == os.getsid(pid)
    except OSError:
        return False


def _launcher(watched_pid: int) -> str | None:
    """`pid:start_time` of the process between the watched one and this one (accelerate's launcher),
    or None when this process was started by the watched one directly, or its parent is not the
    watched process's child (the watched process already gone: this process was handed to init or a
    subreaper, whose session must never be stopped)."""
    parent = os.getppid()
    if parent <= 1 or parent == watched_pid or _parent_of(parent) != watched_pid:
        return None
    return process_identity(parent)


def _targets(launcher: str | None) -> list[int]:
    """What to stop, as `os.kill` targets (negative: a process group): this process's group when it
    is a session of its own (never the group of a shell that ran this module by hand with the
    variable set), else this process; and the session of accelerate's launcher, whose torch-elastic
    workers each get a session of their own (it could otherwise restart them)."""
    me = os.getpid()
    targets = [-os.getpgrp() if _own_session(me) else me]
    if launcher is not None:
        launcher_pid = int(launcher.partition(":")[0])
        if process_is_running(launcher) and _own_session(launcher_pid):
            targets.append(-launcher_pid)
    return [target for target in targets if abs(target) > 1]  # never init, never "every process" (-1)


# Run detached (a session of its own): the SIGTERM also ends the process that starts it.
_STOPPER = """
import os, signal, sys, time
targets, grace_s = [int(t) for t in sys.argv[1].split(",")], float(sys.argv[2])
for sig, pause_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0)):
    for target in targets:
        try:
            os.kill(target, sig)
        except OSError:
            pass
    time.sleep(pause_s)
"""


def _stop(targets: list[int], grace_s: float) -> None:
    """SIGTERM `targets`, SIGKILL them `grace_s` later, from a detached process; directly (no
    grace) when no process can be started, as right after an OOM kill may happen."""
    try:
        subprocess.Popen([sys.executable, "-I", "-c", _STOPPER, ",".join(map(str, targets)), str(grace_s)],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    except OSError:
        for target in sorted(targets, key=lambda t: abs(t) == os.getpgrp()):  # our own group last
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass


def stop_when_parent_gone(interval_s: float = 2.0, grace_s: float = 10.0) -> threading.Thread | None:
    """In a child started with `watch_environment()`: stop what the launch started once that process is gone.

    A daemon thread checks every `interval_s`; when the watched process has exited (a flow run
    SIGKILLed, the OOM killer) it has a detached process send SIGTERM to this process's group (a
    session of its own) and to accelerate's launcher's session, then SIGKILL after `grace_s` to
    whatever ignored it. (Detached: this process dies of its own SIGTERM, and the SIGKILL must
    still come.) Without it an orphaned training run keeps its GPUs until someone finds it.
    Returns None (nothing watched) when the environment names no process.
    """
    identity = os.environ.get(WATCHED_PROCESS_ENV)
    if not identity:
        return None
    launcher = _launcher(int(identity.partition(":")[0]))  # read now: once orphaned, the parent is init

    def watch() -> None:
        while process_is_running(identity):
            time.sleep(interval_s)
        targets = _targets(launcher)
        if targets:
            _stop(targets, grace_s)

    thread = threading.Thread(target=watch, name="stop-when-parent-gone", daemon=True)
    thread.start()
    return thread
