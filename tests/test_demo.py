"""The shortened demo end to end (`kaizen demo --rounds 2` on a small recipe): the summary and the
report are produced, and round 2's training data came from round 1's search."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from test_flows import RECIPE

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"round", "greedy_accuracy", "maj8_accuracy", "ppm8_accuracy", "solved_share", "pairs",
                "sft_examples", "gate_passed", "wall_s"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("demo")
    recipe = {**RECIPE, "run": "demo-short",
              "eval": {**RECIPE["eval"], "modes": ["greedy", "maj@8", "ppm@8"]}}
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(workdir / "results")}
    home = workdir / "home"
    result = subprocess.run([str(Path(sys.executable).parent / "kaizen"), "demo", "--recipe", str(workdir / "recipe.yaml"),
                             "--rounds", "2", "--home", str(home)], env=env, capture_output=True, text=True, timeout=1500)
    return {"home": home, "result": result, "run_dir": home / "runs" / "demo-short"}


def test_demo_exits_cleanly(demo: dict) -> None:
    assert demo["result"].returncode == 0, demo["result"].stderr[-3000:]


def test_summary_has_a_row_per_round_with_the_issue_keys(demo: dict) -> None:
    summary = json.loads((demo["home"] / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2] and summary["total_wall_s"] > 0
    assert all(set(row) == SUMMARY_KEYS for row in summary["rounds"])


def test_report_is_written(demo: dict) -> None:
    assert "<img" in (demo["home"] / "report.html").read_text()


def test_demo_prints_the_round_table(demo: dict) -> None:
    assert "greedy" in demo["result"].stdout and "ppm@8" in demo["result"].stdout


def test_round_two_policy_trained_on_round_one_search_data(demo: dict) -> None:
    provenance = json.loads((demo["run_dir"] / "round-002" / "checkpoints" / "policy" / "provenance.json").read_text())
    round_one_sft = demo["run_dir"] / "round-001" / "mine" / "sft.parquet"
    assert str(round_one_sft) in [entry["path"] for entry in provenance["tables"]]


def test_round_one_sft_rows_are_round_one_search_trajectories(demo: dict) -> None:
    sft = pq.read_table(demo["run_dir"] / "round-001" / "mine" / "sft.parquet").to_pylist()
    nodes = pq.read_table(demo["run_dir"] / "round-001" / "rollout").to_pylist()
    correct_leaves = {(row["problem_id"], row["node_id"]) for row in nodes if row["correct"]}
    assert all(row["round"] == 1 and (row["problem_id"], row["leaf_id"]) in correct_leaves for row in sft)
