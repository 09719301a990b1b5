"""The Prefect flows end to end on a tiny model: a bootstrap round and a search round, resuming
after an injected failure from the cache, and a failed gate stopping `evolve`.

One run is built up across the tests of this module (each stage costs seconds to a minute on CPU),
so the tests read the run in the order they are written; each still asserts one property.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow

RECIPE = {
    "run": "flowtest",
    "model": {"base": "tiny", "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}},
    "problems": {"source": "curriculum", "curriculum": {"train": 6, "test": 4, "levels": [1, 2]}},
    "bootstrap": {"teacher": "curriculum", "problems": 40, "training": {"num_train_epochs": 2, "learning_rate": 3.0e-3}},
    "search": {"mcts": {"rollouts": 2, "width": 2, "max_step_tokens": 48}, "shards": 2},
    "eval": {"benchmarks": ["curriculum-test"], "modes": ["greedy", "maj@2", "ppm@2"], "config": {"max_step_tokens": 48}},
    "gate": {"benchmark": "curriculum-test", "tolerance": 1.0},
    "training": {
        "sft": {"num_train_epochs": 1, "learning_rate": 1.0e-3, "per_device_train_batch_size": 8, "max_length": 512},
        "ppm": {"num_train_epochs": 1, "learning_rate": 1.0e-3, "per_device_train_batch_size": 8, "max_length": 512},
    },
}


SUBFLOWS = {"rollouts"}


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # The harness does not isolate result storage (DESIGN section 3): give it its own directory.
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("results")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flows")


def write_recipe(workdir: Path, name: str, **section_changes: dict[str, Any]) -> str:
    data = yaml.safe_load(yaml.safe_dump(RECIPE))
    for section, changes in section_changes.items():
        data[section].update(changes)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def task_states(flow_state: Any) -> dict[str, list[str]]:
    """Task name -> state names of every task run of a flow run and its subflow runs (not the subflows' own)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    flow_run_id = flow_state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        flow_ids = {flow_run_id, *(child.id for child in children)}
        states: dict[str, list[str]] = {}
        for task_run in client.read_task_runs(limit=200):
            is_subflow = task_run.name.rsplit("-", 1)[0] in SUBFLOWS
            if task_run.flow_run_id in flow_ids and not is_subflow:
                states.setdefault(task_run.name.rsplit("-", 1)[0], []).append(task_run.state.name)
    return states


@pytest.fixture(scope="module")
def rounds(prefect: None, workdir: Path) -> dict[str, Any]:
    """Round 0 (bootstrap) and round 1 of the tiny recipe, run through the round flow."""
    from flows.evolve import round_flow

    recipe, home = write_recipe(workdir, "tiny"), str(workdir / "home")
    return {
        "recipe": recipe, "home": home,
        "round0": round_flow(recipe, 0, home), "round1": round_flow(recipe, 1, home),
    }


def run_dir(rounds: dict[str, Any]) -> Path:
    return Path(rounds["home"]) / "runs" / RECIPE["run"]


def test_round_writes_one_nodes_file_per_shard(rounds: dict[str, Any]) -> None:
    shards = sorted(p.name for p in (run_dir(rounds) / "round-001" / "rollout").glob("*.parquet"))
    assert shards == ["nodes-00000.parquet", "nodes-00001.parquet"]


def test_shards_together_hold_every_problem_once(rounds: dict[str, Any]) -> None:
    nodes = pq.read_table(run_dir(rounds) / "round-001" / "rollout").to_pylist()
    roots = [row["problem_id"] for row in nodes if row["node_id"] == 0]
    assert len(roots) == len(set(roots)) == RECIPE["problems"]["curriculum"]["train"]


def test_a_round_keeps_the_run_report_current(rounds: dict[str, Any]) -> None:
    assert "<h1>Run " in (run_dir(rounds) / "report.html").read_text()


def test_round_records_its_gate_decision(rounds: dict[str, Any]) -> None:
    row = pq.read_table(run_dir(rounds) / "round-001" / "gate" / "rounds.parquet").to_pylist()[0]
    assert row["gate_passed"] and "curriculum-test/greedy" in row["gate_reason"]


def test_passed_round_is_promoted(rounds: dict[str, Any]) -> None:
    from flows.evolve import open_pipeline

    assert open_pipeline(rounds["recipe"], rounds["home"]).current().round == 1


def test_round_one_policy_trained_on_round_zero_data(rounds: dict[str, Any]) -> None:
    provenance = json.loads((run_dir(rounds) / "round-001" / "checkpoints" / "policy" / "provenance.json").read_text())
    tables = [entry["path"] for entry in provenance["tables"]]
    assert any("round-000" in path for path in tables) and any("round-001" in path for path in tables)


def round_row(rounds: dict[str, Any], round_number: int) -> dict[str, Any]:
    return pq.read_table(run_dir(rounds) / f"round-{round_number:03d}" / "gate" / "rounds.parquet").to_pylist()[0]


@pytest.fixture(scope="module")
def rerun(rounds: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Round 1 run again with nothing changed, and its `rounds` row before and after; under another
    Prefect results path (another user or machine resuming the home), which the home does not depend on."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from flows.evolve import round_flow

    before = round_row(rounds, 1)
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("other-results")}):
        state = round_flow(rounds["recipe"], 1, rounds["home"], return_state=True)
    return {"state": state, "before": before, "after": round_row(rounds, 1)}


def test_rerun_of_a_finished_round_is_all_cache_hits(rerun: dict[str, Any]) -> None:
    states = task_states(rerun["state"])
    assert states and all(names == ["Cached"] * len(names) for names in states.values()), states


def test_rerun_from_the_cache_keeps_the_rounds_wall_time(rerun: dict[str, Any]) -> None:
    wall = [json.loads(rerun[when]["metrics"])["wall_s"] for when in ("before", "after")]
    assert wall[0] == wall[1] and rerun["before"]["started_at"] == rerun["after"]["started_at"]


@pytest.fixture(scope="module")
def resumed(rounds: dict[str, Any]) -> dict[str, Any]:
    """Round 2 with PPM training failing once, then run again."""
    import flows.evolve as evolve
    from models.pipeline import Pipeline

    real = Pipeline.train_ppm
    failing_task = evolve.ppm_task.with_options(retries=0)

    def broken(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected PPM failure")

    patch = pytest.MonkeyPatch()
    patch.setattr(Pipeline, "train_ppm", broken)
    patch.setattr(evolve, "ppm_task", failing_task)
    try:
        failed = evolve.round_flow(rounds["recipe"], 2, rounds["home"], return_state=True)
    finally:
        patch.undo()
    assert Pipeline.train_ppm is real
    again = evolve.round_flow(rounds["recipe"], 2, rounds["home"], return_state=True)
    return {"failed": failed, "again": again}


def test_injected_failure_fails_the_round(resumed: dict[str, Any]) -> None:
    assert resumed["failed"].is_failed()


def test_rerun_after_failure_reuses_finished_stages(resumed: dict[str, Any]) -> None:
    states = task_states(resumed["again"])
    assert {name: states[name] for name in ("problems", "select", "rollout", "mine", "sft")} == {
        "problems": ["Cached"], "select": ["Cached"], "rollout": ["Cached", "Cached"], "mine": ["Cached"],
        "sft": ["Cached"],
    }


def test_rerun_after_failure_executes_the_failed_stage(resumed: dict[str, Any]) -> None:
    states = task_states(resumed["again"])
    assert states["ppm"] == ["Completed"] and resumed["again"].is_completed()


def test_failed_gate_stops_evolve_before_the_next_round(resumed: dict[str, Any], rounds: dict[str, Any], workdir: Path) -> None:
    from flows.evolve import evolve_flow

    strict = write_recipe(workdir, "strict", gate={"min_gain": 1.0, "tolerance": 0.0})
    state = evolve_flow(strict, 2, 3, rounds["home"], return_state=True)
    assert state.is_failed() and "failed its gate" in str(state.message)
    assert not (run_dir(rounds) / "round-003").exists()


def test_a_round_whose_gate_fails_is_a_failed_flow_run(resumed: dict[str, Any], rounds: dict[str, Any], workdir: Path) -> None:
    from flows.evolve import round_flow

    strict = write_recipe(workdir, "strict", gate={"min_gain": 1.0, "tolerance": 0.0})
    state = round_flow(strict, 2, rounds["home"], return_state=True)
    assert state.is_failed() and "round 2 failed its gate" in str(state.message)


def test_failed_gate_withdraws_the_promotion(resumed: dict[str, Any], rounds: dict[str, Any]) -> None:
    from flows.evolve import open_pipeline

    # test_failed_gate_stops_evolve_before_the_next_round re-judged round 2 with an impossible gain.
    assert open_pipeline(rounds["recipe"], rounds["home"]).current().round == 1


def test_stage_rerun_marks_later_stages_stale(resumed: dict[str, Any], rounds: dict[str, Any]) -> None:
    from flows.evolve import stage_flow

    stale = stage_flow(rounds["recipe"], "ppm", 2, rounds["home"])
    marker = json.loads((run_dir(rounds) / "round-002" / "STALE").read_text())
    assert stale[0] == "evaluate" and marker["rerun"] == "ppm"



def test_a_stage_rerun_that_would_run_an_earlier_stage_again_is_refused(
    resumed: dict[str, Any], rounds: dict[str, Any], workdir: Path
) -> None:
    from flows.evolve import stage_flow

    other_search = write_recipe(workdir, "other-search", search={"mcts": {"rollouts": 2, "width": 2, "max_step_tokens": 40}})
    state = stage_flow(other_search, "ppm", 2, rounds["home"], return_state=True)
    assert state.is_failed() and "would also run rollout: nothing is cached for its present inputs" in str(state.message)
    assert "rollout" not in task_states(state)

def test_round_without_its_promoted_predecessor_fails_before_any_gpu_stage(rounds: dict[str, Any]) -> None:
    from flows.evolve import round_flow

    state = round_flow(rounds["recipe"], 5, rounds["home"], return_state=True)
    assert state.is_failed() and "starts from round 4, which is not promoted" in str(state.message)
    assert not (run_dir(rounds) / "round-005" / "rollout").exists()
