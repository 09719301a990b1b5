"""Child processes that die with the thread that started them, even when it is killed outright."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

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
