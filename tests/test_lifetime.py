"""Child processes tied to the thread that started them: killed by the kernel when it is gone."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from models.lifetime import tie_to_this_thread

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")


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
