"""Crash recovery: `kill -9` of a round during its rollouts, then the same command again, gives the
same tables as an uninterrupted run, with no duplicated or missing rows; SIGTERM stops a round and
every process it started.

Both runs are `kaizen round` processes (ephemeral Prefect, a SQLite database of their own), so the
second attempt finds the first one's finished shard only through the persisted cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from test_flows import RECIPE

pytestmark = pytest.mark.slow

KAIZEN = str(Path(sys.executable).parent / "kaizen")
SORT_KEYS = {"nodes": ["problem_id", "node_id"], "pairs": ["problem_id", "prompt", "chosen", "rejected"],
             "sft": ["problem_id", "rank"]}


def kaizen_round(workdir: Path, home: Path, round_number: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "results")}
    return subprocess.Popen([KAIZEN, "round", "--recipe", str(workdir / "recipe.yaml"), "--home", str(home),
                             "--round", str(round_number)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def finish(process: subprocess.Popen) -> None:
    assert process.wait(900) == 0


def run_dir(home: Path) -> Path:
    return home / "runs" / RECIPE["run"]


def table(home: Path, round_dir: str, relative: str, name: str) -> list[dict]:
    rows = pq.read_table(run_dir(home) / round_dir / relative).to_pylist()
    return sorted(rows, key=lambda row: [str(row[key]) for key in SORT_KEYS[name]])


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    homes = {}
    for name in ("uninterrupted", "killed"):
        workdir = tmp_path_factory.mktemp(name)
        (workdir / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
        home = workdir / "home"
        finish(kaizen_round(workdir, home, 0))
        process = kaizen_round(workdir, home, 1)
        if name == "killed":
            first_shard = run_dir(home) / "round-001" / "rollout" / "nodes-00000.parquet"
            while not first_shard.exists():
                assert process.poll() is None, "the round ended before its first shard was written"
                time.sleep(0.1)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            assert not (run_dir(home) / "round-001" / "mine").exists(), "killed too late: mining had started"
            process = kaizen_round(workdir, home, 1)
        finish(process)
        homes[name] = home
    return homes


@pytest.mark.parametrize(("relative", "name"), [("rollout", "nodes"), ("mine/pairs.parquet", "pairs"),
                                                 ("mine/sft.parquet", "sft")])
def test_killed_and_resumed_round_matches_uninterrupted(homes: dict[str, Path], relative: str, name: str) -> None:
    assert table(homes["killed"], "round-001", relative, name) == table(homes["uninterrupted"], "round-001", relative, name)


def test_resumed_round_has_no_duplicate_nodes(homes: dict[str, Path]) -> None:
    rows = table(homes["killed"], "round-001", "rollout", "nodes")
    keys = [(row["problem_id"], row["node_id"]) for row in rows]
    assert len(keys) == len(set(keys))


def test_resumed_round_leaves_no_temporary_files(homes: dict[str, Path]) -> None:
    # Lock files stay: deleting one while another process waits on it would let two processes hold it.
    leftovers = [p for p in (run_dir(homes["killed"]) / "round-001").rglob(".*") if p.name != ".cache"
                 and ".cache" not in p.parts and p.suffix != ".lock"]
    assert leftovers == []


def test_sigterm_stops_the_round_and_everything_it_started(tmp_path: Path) -> None:
    """A process manager's SIGTERM to `kaizen` alone (not its group) must not orphan Prefect's
    ephemeral server or the training subprocess, and leaves no partial checkpoint behind."""
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    home = tmp_path / "home"
    process = kaizen_round(tmp_path, home, 0)
    checkpoints = run_dir(home) / "round-000" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob(".*partial*")):
        assert process.poll() is None and time.monotonic() < deadline, "bootstrap training never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while True:  # children get a moment to exit after their parent
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the terminated round are still running"
        time.sleep(0.5)
    assert not any(checkpoints.glob(".*partial*"))
