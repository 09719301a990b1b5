"""Rollout shards as Ray tasks (prefect-ray) on a local Ray instance, on CPU."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow
pytest.importorskip("prefect_ray", reason="the `ray` extra is not installed (make test-slow installs it)")

from test_flows import RECIPE  # noqa: E402 - after the skip: the same tiny recipe


@pytest.fixture(scope="module")
def ray_round(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.evolve import round_flow

    workdir = tmp_path_factory.mktemp("ray")
    recipe = {**RECIPE, "run": "raytest", "execution": {"task_runner": "ray"}}
    path = workdir / "ray.yaml"
    path.write_text(yaml.safe_dump(recipe))
    home = str(workdir / "home")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: workdir / "results"}):
        with prefect_test_harness(server_startup_timeout=120):
            round_flow(str(path), 0, home)
            result = round_flow(str(path), 1, home, return_state=True)
    return {"state": result, "run_dir": Path(home) / "runs" / "raytest"}


def test_round_with_ray_shards_completes(ray_round: dict) -> None:
    assert ray_round["state"].is_completed()


def test_each_ray_shard_wrote_its_nodes(ray_round: dict) -> None:
    files = sorted((ray_round["run_dir"] / "round-001" / "rollout").glob("nodes-*.parquet"))
    roots = [row for f in files for row in pq.read_table(f, columns=["node_id"]).to_pylist() if row["node_id"] == 0]
    assert len(files) == 2 and len(roots) == RECIPE["problems"]["curriculum"]["train"]


@pytest.mark.parametrize(("execution", "reserved"), [
    ({"task_runner": "ray", "ray_gpus_per_shard": 1}, {"num_gpus": 1.0}),
    ({"task_runner": "ray"}, {}),
    ({"task_runner": "thread", "ray_gpus_per_shard": 1}, {}),
])
def test_ray_shards_reserve_the_gpus_the_recipe_asks_for(tmp_path: Path, execution: dict, reserved: dict) -> None:
    from prefect_ray.context import RemoteOptionsContext

    from flows.evolve import _shard_resources, open_pipeline
    from models.recipe import parse_recipe

    pipeline = open_pipeline(parse_recipe({**RECIPE, "execution": execution}), str(tmp_path))
    with _shard_resources(pipeline):
        assert RemoteOptionsContext.get().current_remote_options == reserved
