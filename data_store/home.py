"""Where Kaizen's data lives: the home directory and its run / round / stage / shard layout.

This is the only module that knows paths. Everything a pipeline produces sits under one home:

    {home}/problems/{pool}.parquet                                  problem pools shared by runs
    {home}/runs/{run}/round-{round:03d}/{stage}/{table}.parquet     one file per round and stage
    {home}/runs/{run}/round-{round:03d}/{stage}/{table}-{shard:05d}.parquet   or one per shard
    {home}/runs/{run}/round-{round:03d}/checkpoints/{name}/         Hugging Face checkpoints

A run is worked on by one process at a time: the flows hold `Layout.hold_run` (an exclusive
`flock` on `runs/{run}/.lock`, released by the kernel when the process dies, however it dies), so
a nightly round that fires while yesterday's is still training, or a `kaizen stage` typed during a
`kaizen run`, stops at once, naming the process that has the run, instead of both writing the same
files.

The home is `$KAIZEN_HOME`, or `./kaizen_home` under the current working directory. It may never
be inside the code tree (a package directory, tests, .git): data written there would be picked up
as code, packaged, or committed.

Read-only problems shared between checkouts (the benchmarks, the training pools) live outside the
home, in `shared_data_dir()`.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HOME_ENV = "KAIZEN_HOME"
DEFAULT_HOME_NAME = "kaizen_home"
SHARED_DATA_ENV = "KAIZEN_SHARED_DATA"

# The directories under the repository root that hold code; the root itself may host the home
# (`./kaizen_home` next to pyproject.toml is git-ignored).
CODE_ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("data_store", "search", "models", "tasks", "flows", "tests", "benchmarks", "deployments", ".git")

# The stages of a round, in the order they run: round 0 bootstraps, later rounds search (rl only when
# the recipe enables it). Here, with no heavy import, so that `kaizen stage --help` can list them.
BOOTSTRAP_ROUND_STAGES = ("problems", "bootstrap", "evaluate")
SEARCH_ROUND_STAGES = ("problems", "select", "rollout", "mine", "sft", "rl", "ppm", "evaluate")
STAGES = ("problems", "select", "bootstrap", "rollout", "mine", "sft", "rl", "ppm", "evaluate")
CHECKPOINT_OF = {"bootstrap": "policy", "sft": "policy", "rl": "policy-rl", "ppm": "ppm"}
"""The checkpoint directory (`Layout.checkpoint_dir`) each training stage writes in its round."""

# The stage each table is written by; `Layout.table_path` uses it when no stage is given.
TABLE_STAGES: dict[str, str] = {
    "nodes": "rollout",
    "pairs": "mine",
    "sft": "mine",
    "eval": "eval",
    "rounds": "gate",
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HomeError(ValueError):
    """The configured home directory or a name inside it is not acceptable."""


class RunBusyError(RuntimeError):
    """Another process is working on the run (it holds the run's lock)."""


# Run locks this process holds: lock file -> (its descriptor, how many nested holds). A flow inside
# a flow (evolve -> round) takes the lock its parent holds: flock would refuse a second descriptor.
_held_locks: dict[Path, tuple[int, int]] = {}
_held_locks_guard = threading.Lock()


def get_home(explicit: str | Path | None = None) -> Path:
    """The data home: `explicit` (a `--home` option) if given, else `$KAIZEN_HOME` if set, else
    `./kaizen_home`; refused inside the code tree, however it was chosen."""
    configured = explicit or os.environ.get(HOME_ENV)
    home = Path(configured).expanduser() if configured else Path.cwd() / DEFAULT_HOME_NAME
    home = home.resolve()
    for code_dir in (CODE_ROOT / name for name in CODE_DIRS):
        if home == code_dir or code_dir in home.parents:
            raise HomeError(f"data home {home} is inside the code tree ({code_dir}); choose a directory outside it")
    if home == CODE_ROOT:
        raise HomeError(f"data home {home} is the code tree itself; choose a directory outside it")
    if home.exists() and not home.is_dir():
        raise HomeError(f"data home {home} exists and is not a directory")
    return home


def shared_data_dir() -> Path:
    """The benchmark and training problems shared between checkouts: `$KAIZEN_SHARED_DATA`, else
    `../shared/data` next to the repository root (may not exist)."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else CODE_ROOT / ".." / "shared" / "data"


def check_name(value: str, what: str) -> str:
    """Run, stage, table and pool names become path components: no separators, no leading dot."""
    if not _NAME.fullmatch(value):
        raise HomeError(f"{what} name {value!r} must be letters, digits, '.', '_' or '-' and not start with '.' or '-'")
    return value



def add_table_origin_arguments(parser: argparse.ArgumentParser, default_run: str) -> None:
    """`--run NAME --round N`: the run and round a table written outside a pipeline run records."""
    parser.add_argument("--run", default=default_run, help="run name recorded in the table")
    parser.add_argument("--round", type=int, default=0, dest="round_number", help="round recorded in the table")


def check_table_origin(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for a --run that is no run name or a negative --round: the table may later be
    copied into a run of a home, whose names become paths."""
    if args.round_number < 0:
        parser.error(f"--round must be >= 0, got {args.round_number}")
    try:
        check_name(args.run, "run")
    except HomeError as err:
        parser.error(str(err))

@dataclass(frozen=True)
class Layout:
    """Paths of every table file under one home directory."""

    home: Path

    @classmethod
    def default(cls) -> Layout:
        return cls(get_home())

    def problems_path(self, pool: str) -> Path:
        return self.home / "problems" / f"{check_name(pool, 'problem pool')}.parquet"

    def run_dir(self, run: str) -> Path:
        return self.home / "runs" / check_name(run, "run")

    def round_dir(self, run: str, round_number: int) -> Path:
        if round_number < 0:
            raise HomeError(f"round must be >= 0, got {round_number}")
        return self.run_dir(run) / f"round-{round_number:03d}"

    def stale_marker(self, run: str, round_number: int) -> Path:
        """The file that marks a finished round as out of date (a stage of it, or of a round it builds
        on, ran again since its gate): its figures and checkpoints are not to be built on or reported."""
        return self.round_dir(run, round_number) / "STALE"

    def stage_dir(self, run: str, round_number: int, stage: str) -> Path:
        return self.round_dir(run, round_number) / check_name(stage, "stage")

    def table_path(
        self, run: str, round_number: int, table: str, *, shard: int | None = None, stage: str | None = None
    ) -> Path:
        """The file of `table` for a round: `{table}.parquet`, or `{table}-{shard:05d}.parquet` for a shard."""
        check_name(table, "table")
        stage = stage or TABLE_STAGES.get(table)
        if stage is None:
            raise HomeError(f"table {table!r} has no default stage; pass stage=")
        name = f"{table}.parquet" if shard is None else f"{table}-{shard:05d}.parquet"
        return self.stage_dir(run, round_number, stage) / name

    def lock_path(self, run: str) -> Path:
        return self.run_dir(run) / ".lock"

    def hold_run(self, run: str, what: str) -> AbstractContextManager[None]:
        """Hold the run for this process while the block runs; RunBusyError if another holds it (`hold_lock`).

        `what` says what holds it (a flow's name), for the message another process gets."""
        path = self.lock_path(run)
        return hold_lock(path, what, f"run {run!r} in {self.home}")

    def run_holder(self, run: str) -> str | None:
        """Who holds the run now (`hold_run`'s words: what, pid, host, since when), or None when nobody does."""
        return lock_holder(self.lock_path(run))

    def checkpoint_dir(self, run: str, round_number: int, name: str) -> Path:
        return self.round_dir(run, round_number) / "checkpoints" / check_name(name, "checkpoint")

    def table_files(self, table: str) -> list[Path]:
        """Every finished file of `table`, across runs and rounds, in path order.

        A table with a default stage is read from that stage's directory only: another stage may
        write a table of the same name for another purpose (`eval-sft` holds the evaluation of the
        policy before RL, which the `eval` view must not mix with the round's own). Only final names
        match: a writer's temporary file is hidden (leading dot) and does not end in `.parquet`, so
        a reader never sees a file that is still being written.
        """
        check_name(table, "table")
        if table == "problems":
            return sorted((self.home / "problems").glob("*.parquet"))
        rounds = self.home / "runs"
        stage = TABLE_STAGES.get(table, "*")
        files = set(rounds.glob(f"*/round-*/{stage}/{table}.parquet")) | set(
            rounds.glob(f"*/round-*/{stage}/{table}-[0-9]*.parquet")
        )
        return sorted(path for path in files if not path.name.startswith("."))


def output_lock(output: Path) -> Path:
    """The lock file a stage holds while it writes `output` (a file or a directory): `.{stem}.lock` beside it."""
    return output.parent / f".{output.stem}.lock"


def lock_holder(path: Path) -> str | None:
    """Who holds the lock file `path` now (`hold_lock`'s words: what, pid, host, since when), or None when
    nobody does."""
    if path in _held_locks:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted unless someone holds it
    except BlockingIOError:
        return path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
    finally:
        os.close(descriptor)
    return None


@contextmanager
def hold_lock(path: Path, what: str, subject: str) -> Iterator[None]:
    """Hold the lock file `path` for this process while the block runs (an exclusive flock, dropped by
    the kernel when the process dies; a process may hold it again inside itself). RunBusyError,
    naming `subject` and the holder, when another process holds it (`_take_lock` waits a moment)."""
    with _held_locks_guard:
        if path in _held_locks:
            descriptor, depth = _held_locks[path]
            _held_locks[path] = (descriptor, depth + 1)
        else:
            _held_locks[path] = (_take_lock(path, what, subject), 1)
    try:
        yield
    finally:
        with _held_locks_guard:
            descriptor, depth = _held_locks.pop(path)
            if depth > 1:
                _held_locks[path] = (descriptor, depth - 1)
            else:
                os.close(descriptor)  # releases the flock


def _take_lock(path: Path, what: str, subject: str, patience_s: float = 0.5) -> int:
    """An exclusive flock on `path`, its descriptor, and who holds it written inside; RunBusyError if
    another process holds it for `patience_s` (a `kaizen status` looking at it holds it for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
                    raise RunBusyError(f"{subject} is in use by {holder}; wait for it to end or stop it") from None
                time.sleep(0.02)
            except OSError as err:
                raise HomeError(f"cannot lock {path}: {err.strerror or err} (the data home's filesystem must "
                                "support flock)") from None
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode(), 0)
    except BaseException:
        os.close(descriptor)  # also releases a lock taken before the failure
        raise
    return descriptor
