"""deployments/prefect.yaml against a real Prefect server: deploy, a process worker, a run through the API.

Starts `prefect server start` (SQLite in a temporary PREFECT_HOME), runs `make deploy` (the GPU
work pool, its concurrency limit, every deployment), triggers the evaluate
deployment on a tiny model, and lets `prefect worker start --run-once` execute it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "kaizen-gpu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PWD": str(REPO),  # the pull step's working directory
    }
    log = open(tmp_path_factory.mktemp("logs") / "server.log", "w")
    process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not come up; see {log.name}")
            time.sleep(1)
        yield env
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def prefect(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def api(env: dict[str, str], method: str, path: str, payload: dict | None = None) -> object:
    response = httpx.request(method, env["PREFECT_API_URL"] + path, json=payload, timeout=30)
    response.raise_for_status()
    return response.json()


def make_deploy(env: dict[str, str]) -> None:
    # -o: the virtual environment running these tests is installed; make must not reinstall it
    result = subprocess.run(["make", "-s", "-o", ".venv/.installed", "deploy"], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def deployed(server: dict[str, str]) -> dict[str, str]:
    make_deploy(server)
    return server


def test_every_deployment_is_registered(deployed: dict[str, str]) -> None:
    names = {row["name"] for row in api(deployed, "POST", "/deployments/filter", {})}
    assert names == {"kaizen-evolve", "kaizen-next-round", "kaizen-stage", "kaizen-evaluate"}


def test_the_stage_deployment_asks_for_the_stage_and_the_round(deployed: dict[str, str]) -> None:
    deployment = api(deployed, "GET", "/deployments/name/stage/kaizen-stage")
    assert {"stage", "round_number"} <= set(deployment["parameter_openapi_schema"]["required"])


def test_nightly_round_takes_its_cron_from_the_recipe(deployed: dict[str, str]) -> None:
    deployment = api(deployed, "GET", "/deployments/name/round/kaizen-next-round")
    assert [entry["schedule"]["cron"] for entry in deployment["schedules"]] == ["0 2 * * *"]


def test_gpu_stages_share_one_concurrency_slot(deployed: dict[str, str]) -> None:
    limit = api(deployed, "GET", f"/concurrency_limits/tag/{POOL}")
    assert limit["concurrency_limit"] == 1


def test_a_run_that_fires_while_another_of_its_deployment_runs_is_cancelled(deployed: dict[str, str]) -> None:
    deployment = api(deployed, "GET", "/deployments/name/round/kaizen-next-round")
    limit, options = deployment["global_concurrency_limit"], deployment["concurrency_options"]
    assert (limit["limit"], options["collision_strategy"]) == (1, "CANCEL_NEW")


def test_the_nightly_round_stops_after_the_last_round(deployed: dict[str, str]) -> None:
    deployment = api(deployed, "GET", "/deployments/name/round/kaizen-next-round")
    assert deployment["parameters"]["last_round"] == 4


def test_deploying_again_keeps_a_raised_gpu_limit(deployed: dict[str, str]) -> None:
    assert prefect(deployed, "concurrency-limit", "create", POOL, "4").returncode == 0  # more GPUs
    try:
        make_deploy(deployed)
        assert api(deployed, "GET", f"/concurrency_limits/tag/{POOL}")["concurrency_limit"] == 4
    finally:
        prefect(deployed, "concurrency-limit", "create", POOL, "1")


def test_deploy_rejects_a_bad_recipe_naming_the_field(server: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "deployments" / "recipes" / "rstar-qwen2.5-math-7b.yaml").read_text().replace(
        "width: 8", "widht: 8"))
    spec = tmp_path / "prefect.yaml"
    spec.write_text((REPO / "deployments" / "prefect.yaml").read_text().replace(
        "kaizen check-recipe rstar-qwen2.5-math-7b", f"kaizen check-recipe {bad}"))
    result = prefect(server, "deploy", "--prefect-file", str(spec), "--all")
    assert result.returncode != 0 and "search.mcts.widht: unknown key" in result.stdout + result.stderr


def test_worker_runs_a_deployment_triggered_through_the_api(deployed: dict[str, str], tmp_path: Path) -> None:
    from models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=1, intermediate_size=64)
    deployment = api(deployed, "GET", "/deployments/name/evaluate/kaizen-evaluate")
    parameters = {"model": str(model), "benchmarks": ["gsm8k"], "modes": ["greedy"], "limit": 2,
                  "out": str(tmp_path / "eval")}
    flow_run = api(deployed, "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
    worker = prefect(deployed, "worker", "start", "--pool", POOL, "--run-once", timeout=600)
    state = api(deployed, "GET", f"/flow_runs/{flow_run['id']}")["state"]
    assert state["type"] == "COMPLETED", json.dumps(state) + worker.stdout[-3000:] + worker.stderr[-3000:]
    assert (tmp_path / "eval" / "eval.parquet").exists()
