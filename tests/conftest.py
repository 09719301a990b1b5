"""Fixtures shared by test modules; a module that needs another shape defines its own `tiny_model`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from models.tiny import build_tiny_model, default_corpus


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer tiny model with a 1,024-token vocabulary, as the training and attention tests use."""
    corpus = default_corpus(seed=0, synthetic_examples=300, include_shared=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus, num_layers=2, vocab_size=1024)


_RUN_HOLDER = """
import sys, time
from pathlib import Path
from data_store.home import Layout
with Layout(Path(sys.argv[1])).hold_run(sys.argv[2], "a test holder"):
    print("held", flush=True)
    time.sleep(300)
"""

_LOCK_HOLDER = """
import sys, time
from pathlib import Path
from data_store.home import hold_lock
with hold_lock(Path(sys.argv[1]), sys.argv[2], sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def hold_elsewhere() -> Iterator[Callable[..., subprocess.Popen]]:
    """Starts a process that runs a holder script (its arguments given) until killed; kills them all at the end."""
    holders: list[subprocess.Popen] = []

    def hold(script: str, *arguments: str) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", script, *arguments], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.fixture
def hold_run_elsewhere(hold_elsewhere: Callable[..., subprocess.Popen]) -> Callable[[Path, str], subprocess.Popen]:
    """Starts processes that hold a run of a home (`Layout.hold_run`) until killed."""
    return lambda home, run: hold_elsewhere(_RUN_HOLDER, str(home), run)


@pytest.fixture
def hold_lock_elsewhere(hold_elsewhere: Callable[..., subprocess.Popen]) -> Callable[..., subprocess.Popen]:
    """Starts processes that hold a lock file (`data_store.home.hold_lock`, as `what`) until killed."""
    return lambda path, what="a test holder": hold_elsewhere(_LOCK_HOLDER, str(path), what)
