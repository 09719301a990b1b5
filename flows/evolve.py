"""Prefect flows: `evolve` (gated rounds), `round` (one round), `rollouts` (its shards), `evaluate`.

A round: problems -> select -> rollouts (sharded) -> mine -> SFT -> PPM -> evaluate -> gate ->
record -> promote. Round 0 is the bootstrap: problems -> bootstrap -> evaluate -> gate. The gate
compares the round's evaluation with the promoted round it started from; a round that fails it is
recorded but never promoted, and `evolve` stops with the gate's reasons.

Flows take plain parameters (a recipe name or path, round numbers, a home directory) so the
Prefect UI and deployments can fill them in. Every stage is a cached task (`tasks.stages`): a
retried or re-run round executes only the stages that did not finish.

`kaizen run`, `kaizen round`, `kaizen stage` and `kaizen evaluate` (`flows.commands`) run these
flows in-process (ephemeral Prefect unless PREFECT_API_URL points at a server).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from data_store.home import Layout, get_home
from data_store.parquet import check_output_directory
from models.gate import decide_gate
from models.pipeline import Artifact, Current, Pipeline, RoundRecord, artifacts_current
from models.recipe import Recipe, load_recipe
from models.report import round_markdown, write_run_report
from tasks.stages import (
    UNREADABLE_RESULT,
    bootstrap_task,
    cached,
    evaluate_checkpoint_task,
    evaluate_task,
    has_cache_record,
    has_run_before,
    mine_task,
    ppm_task,
    problems_task,
    rl_task,
    rollout_task,
    select_task,
    sft_task,
)

class GateFailed(RuntimeError):
    """A round's evaluation did not pass its gate; evolution stops here."""


def open_pipeline(recipe: str | Recipe, home: str | None = None, overrides: dict[str, Any] | None = None) -> Pipeline:
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    # Before any flow starts: a home that cannot be written would fail the first stage, in Prefect's logs.
    return Pipeline(loaded, Layout(check_output_directory(get_home(home), "data home")))


def _task_runner(pipeline: Pipeline) -> Any:
    """Ray when the recipe asks (shards spread over the cluster), else one shard at a time in-process."""
    execution = pipeline.recipe.execution
    if execution.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=execution.ray_address) if execution.ray_address else RayTaskRunner()
    return ThreadPoolTaskRunner(max_workers=1)


@flow(name="rollouts")
def rollouts_flow(
    pipeline: Pipeline, round_number: int, problems: Artifact, policy: Artifact, ppm: Artifact | None,
    refresh: bool = False, cache_only: bool = False,
) -> tuple[list[Artifact], bool]:
    """Every rollout shard of a round, each its own task (on Ray when the recipe says so); the shards'
    nodes tables, and whether any shard ran rather than came from the cache. With `cache_only`, a
    cached shard whose files changed since is refused (StageWouldRun), not searched again."""
    pipeline.drop_stale_shards(round_number)
    shard_task = cached(rollout_task, pipeline, round_number, refresh=refresh)
    with _shard_resources(pipeline):
        futures = [shard_task.submit(pipeline, round_number, shard, problems, policy, ppm)
                   for shard in range(pipeline.recipe.search.shards)]
        for future in futures:  # every shard ends (saving its chunks) before any failure is raised
            future.wait()
        states = [future.state for future in futures]
        again = cached(rollout_task, pipeline, round_number, refresh=True)
        nodes, ran = [], False
        for shard, state in enumerate(states):
            if why := _unusable_cache_hit(state):
                if cache_only:
                    raise StageWouldRun(f"round {round_number} rollout shard {shard} would run again ({why}); "
                                        "run the round (kaizen round) or re-run rollout first (kaizen stage rollout)")
                get_run_logger().warning("round %d rollout shard %d: %s; running it again", round_number, shard, why)
                pipeline.mark_rerunning(round_number)
                state = again(pipeline, round_number, shard, problems, policy, ppm, return_state=True)
            ran = ran or state.name != "Cached"
            nodes.append(state.result())  # raises a shard's failure
        return nodes, ran


def _unusable_cache_hit(state: Any) -> str | None:
    """Why a result from the cache cannot be used (its files changed since, or it cannot be read), or
    None for a fresh result or a usable cached one (fresh results are not hashed a second time)."""
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        return f"its cached result cannot be read ({error!r})" if isinstance(error, UNREADABLE_RESULT) else None
    if state.is_completed() and state.name == "Cached" and not artifacts_current(state.result()):
        return "the cached result's files changed since"
    return None


def _shard_resources(pipeline: Pipeline) -> AbstractContextManager[Any]:
    """On Ray, the GPUs each shard reserves (Ray then sets the shard's CUDA_VISIBLE_DEVICES)."""
    execution = pipeline.recipe.execution
    if execution.task_runner != "ray" or not execution.ray_gpus_per_shard:
        return nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=execution.ray_gpus_per_shard)


class StageWouldRun(ValueError):
    """Re-running one stage (the stage flow) would also run an earlier stage, not take it from the cache."""


def _run_round(pipeline: Pipeline, round_number: int, refresh: frozenset[str] = frozenset(),
               stop_after: str | None = None) -> dict[str, Any] | None:
    """The stages of one round; with `stop_after` (the stage flow), only up to that stage, nothing
    promoted, and every stage before it taken from the cache (StageWouldRun before any would run)."""
    logger = get_run_logger()
    started_at = datetime.now(timezone.utc)
    executed: list[str] = []  # stages run by this call rather than taken from the cache

    def about_to_run(name: str, why: str) -> None:
        if stop_after is not None and name not in refresh:
            raise StageWouldRun(
                f"re-running {stop_after} of round {round_number} would also run {name}: {why}. Run the round "
                f"(kaizen round) to run what it needs, or re-run {name} first (kaizen stage {name})")
        pipeline.mark_rerunning(round_number)  # before the first stage that rewrites the round's outputs

    def not_cached(name: str, where: int | None) -> str:
        if not has_run_before(name, pipeline, where):
            return "it has not run yet"
        return ("nothing is cached for its present inputs and settings (the recipe, a --set value or an input "
                "differs from those it ran with)")

    def stage(name: str, stage_task: Any, *args: Any, per_round: bool = True) -> Any:
        where = round_number if per_round else None
        announced = name in refresh or not has_cache_record(stage_task, pipeline, where, *args)
        if announced:
            about_to_run(name, "asked for" if name in refresh else not_cached(name, where))
        state = cached(stage_task, pipeline, where, refresh=name in refresh)(*args, return_state=True)
        if why := _unusable_cache_hit(state):
            about_to_run(name, why)
            logger.warning("round %d %s: %s; running it again", round_number, name, why)
            executed.append(name)
            return cached(stage_task, pipeline, where, refresh=True)(*args)
        if state.name != "Cached":
            if not announced:  # Prefect ran what looked cached: mark the round now, late as it is
                pipeline.mark_rerunning(round_number)
            executed.append(name)
        return state.result()

    pools = stage("problems", problems_task, pipeline, per_round=False)
    if stop_after == "problems":
        return None
    stats: dict[str, Any] = {}
    if round_number == 0:
        previous: Current | None = None
        policy = stage("bootstrap", bootstrap_task, pipeline)
        ppm = None
        if stop_after == "bootstrap":
            return None
    else:
        previous = pipeline.starting_point(round_number)  # before any GPU stage: the inputs must exist
        # Read once, here: the task's cache key covers it (a rollout re-run since changes what is unsolved).
        problems = stage("select", select_task, pipeline, round_number, pools.train,
                         pipeline.never_solved(round_number))
        if stop_after == "select":
            return None
        search_ppm = pipeline.search_ppm(round_number, previous.ppm)
        uncached = [shard for shard in range(pipeline.recipe.search.shards) if not has_cache_record(
            rollout_task, pipeline, round_number, pipeline, round_number, shard, problems, previous.policy, search_ppm)]
        if "rollout" in refresh or uncached:
            about_to_run("rollout", "asked for" if "rollout" in refresh else
                         f"{not_cached('rollout', round_number)} (shard {', '.join(map(str, uncached))})")
        nodes, searched = rollouts_flow.with_options(task_runner=_task_runner(pipeline))(
            pipeline, round_number, problems, previous.policy, search_ppm, refresh="rollout" in refresh,
            cache_only=stop_after is not None and "rollout" not in refresh,
        )
        if searched:
            executed.append("rollout")
        if stop_after == "rollout":
            return None
        mined = stage("mine", mine_task, pipeline, round_number, nodes, problems)
        stats.update(mined.counts, solved_share=mined.counts["trees_solved"] / max(mined.counts["trees"], 1),
                     solved_by_level=mined.solved_by_level)
        if stop_after == "mine":
            return None
        policy = stage("sft", sft_task, pipeline, round_number, pipeline.history("sft", round_number) + [mined.sft],
                       pipeline.continued_from("sft", previous.policy))
        if stop_after == "sft":
            return None
        if pipeline.recipe.rl.enabled:
            sft_policy = policy
            policy = stage("rl", rl_task, pipeline, round_number, nodes, problems, sft_policy)
            if stop_after == "rl":
                return None
        ppm = stage("ppm", ppm_task, pipeline, round_number,
                    pipeline.history("pairs", round_number) + [mined.pairs], policy,
                    pipeline.continued_from("ppm", previous.ppm)) or previous.ppm
        if stop_after == "ppm":
            return None
    evaluation = stage("evaluate", evaluate_task, pipeline, round_number, policy, ppm)
    if round_number > 0 and pipeline.recipe.rl.enabled:
        # The same evaluation of the policy before RL, so recipes can be compared with and without it.
        stats["eval_without_rl"] = stage("evaluate", evaluate_task, pipeline, round_number, sft_policy, ppm,
                                         "eval-sft").metrics
    if stop_after == "evaluate":
        return None
    decision = decide_gate(evaluation.metrics, previous.metrics if previous else None, pipeline.recipe.gate,
                           has_ppm=ppm is not None)
    stats["wall_s"] = (datetime.now(timezone.utc) - started_at).total_seconds()
    record = RoundRecord(round_number, policy, ppm, evaluation.metrics, stats, decision.passed, list(decision.reasons))
    # With every stage from the cache (mining's cache hit means the same trees) this call replayed the
    # round: its seconds are not what the round cost, so the row keeps the timing of the run that did.
    pipeline.record_round(record, started_at, replayed=not executed)
    pipeline.promote(record)
    _publish(pipeline, record, evaluation)
    try:  # the run's HTML report, kept current after every round (runs/{run}/report.html)
        write_run_report(pipeline.layout, pipeline.run)
    except Exception as err:  # noqa: BLE001 - a report that cannot be drawn must not fail a finished round
        logger.warning("run report not written: %s", err)
    verdict = "passed" if decision.passed else "FAILED"
    logger.info("round %d gate %s: %s", round_number, verdict, "; ".join(decision.reasons))
    return {"round": round_number, "gate_passed": decision.passed, "gate_reasons": list(decision.reasons),
            "metrics": evaluation.metrics, "stats": stats}


def _publish(pipeline: Pipeline, record: RoundRecord, evaluation: Any) -> None:
    """The round's markdown report and eval table in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"{pipeline.run}-round-{record.round}".lower().replace("_", "-").replace(".", "-")
    create_markdown_artifact(key=key, markdown=round_markdown(pipeline.run, record, evaluation.summary),
                             description=f"{pipeline.run}: round {record.round}")
    create_table_artifact(key=f"{key}-eval", table=evaluation.summary,
                          description=f"{pipeline.run}: round {record.round} evaluation")


@flow(name="round", log_prints=True)
def round_flow(recipe: str, round_number: int | None = None, home: str | None = None,
               overrides: dict[str, Any] | None = None, last_round: int | None = None) -> dict[str, Any] | None:
    """One round of a recipe (the next one after the promoted round when no number is given).

    `overrides` sets recipe fields by dotted name, e.g. {"search.mcts.rollouts": 16}. A round whose
    gate fails is recorded and published, and then the flow run fails (GateFailed): a nightly run
    that cannot move on must not look like a success. With `last_round` (the nightly deployment
    sets it), the next round past it is not run: the flow ends at once and returns None.
    """
    pipeline = open_pipeline(recipe, home, overrides)
    with pipeline.layout.hold_run(pipeline.run, "a round flow"):
        number = pipeline.next_round() if round_number is None else round_number
        if last_round is not None and number > last_round:
            print(f"run {pipeline.run!r}: round {number} is past the last round ({last_round}); nothing to run")
            return None
        result = _run_round(pipeline, number)
    assert result is not None
    if not result["gate_passed"]:
        raise GateFailed(f"round {number} failed its gate: {'; '.join(result['gate_reasons'])}")
    return result


@flow(name="evolve", log_prints=True)
def evolve_flow(recipe: str, start: int | None = None, end: int = 4, home: str | None = None,
                overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rounds start..end; each must pass its gate before the next starts."""
    pipeline = open_pipeline(recipe, home, overrides)
    with pipeline.layout.hold_run(pipeline.run, "an evolve flow"):  # its rounds hold it too, from here
        first = pipeline.next_round() if start is None else start
        results = []
        for number in range(first, end + 1):  # a failed gate raises in round_flow and ends the loop
            results.append(round_flow(recipe, number, str(pipeline.layout.home), overrides))
    return results


@flow(name="stage", log_prints=True)
def stage_flow(recipe: str, stage: str, round_number: int, home: str | None = None,
               overrides: dict[str, Any] | None = None) -> list[str]:
    """Re-run exactly one stage of a round (its upstream stages come from the cache); returns the stale stages."""
    pipeline = open_pipeline(recipe, home, overrides)
    with pipeline.layout.hold_run(pipeline.run, "a stage flow"):
        order = check_stage(pipeline, stage, round_number)
        _run_round(pipeline, round_number, refresh=frozenset({stage}), stop_after=stage)
        stale = list(order[order.index(stage) + 1:]) + ["gate", "promote"]
        pipeline.mark_stale(round_number, stage, stale)
    get_run_logger().info("re-ran %s of round %d; now stale: %s (running round %d again brings them up to date)",
                          stage, round_number, ", ".join(stale), round_number)
    return stale


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    model: str, benchmarks: list[str], modes: list[str] | None = None, ppm: str | None = None,
    limit: int | None = None, out: str | None = None, backend: str = "hf", seed: int = 0, step_format: str = "rstar",
    temperature: float | None = None, max_step_tokens: int | None = None, max_depth: int | None = None,
    mcts_width: int | None = None, mcts_rollouts: int | None = None, worked_examples: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate any checkpoint (written in `step_format`) on benchmarks; writes the eval table to `out` when given.

    The generation settings left None take `models.evaluation.EvalConfig`'s defaults.

    The accuracies also go to the run's logs and to a table artifact in the UI, so a run without `out`
    keeps its figures.
    """
    from prefect.artifacts import create_table_artifact

    from models.evaluation import write_eval

    search = {"temperature": temperature, "max_step_tokens": max_step_tokens, "max_depth": max_depth,
              "mcts_width": mcts_width, "mcts_rollouts": mcts_rollouts, "worked_examples": worked_examples}
    config, loaded = _evaluation_inputs(benchmarks, modes, limit, backend, seed, step_format, search)
    report = evaluate_checkpoint_task(model, loaded, config, ppm)
    if out:
        write_eval(report, out)
    rows = [row if isinstance(row, dict) else vars(row) for row in report.summary]
    logger = get_run_logger()
    for row in rows:
        logger.info("%s", json.dumps(row))
    create_table_artifact(table=rows, description=f"evaluation of {model}")
    return rows


def _evaluation_inputs(
    benchmarks: list[str], modes: list[str] | None, limit: int | None, backend: str, seed: int, step_format: str,
    search: dict[str, Any],
) -> tuple[Any, list[Any]]:
    """The evaluation's config and loaded benchmarks; EvalInputError on a bad mode, value or benchmark."""
    from models.backends import BackendConfig
    from models.evaluation import EvalConfig, load_benchmark

    config = EvalConfig(modes=modes or ["greedy"], seed=seed, backend=BackendConfig(backend=backend),
                        step_format=step_format, **{name: value for name, value in search.items() if value is not None})
    return config, [load_benchmark(spec, limit=limit) for spec in benchmarks]


def check_round(pipeline: Pipeline, round_number: int) -> None:
    """A round can run: its number is valid and (after round 0) it has a promoted, up-to-date predecessor."""
    if round_number < 0:
        raise ValueError(f"round must be >= 0, got {round_number}")
    if round_number > 0:
        pipeline.starting_point(round_number)


def check_stage(pipeline: Pipeline, stage: str, round_number: int) -> tuple[str, ...]:
    """The stages of the round, after checking that `stage` is one of them and the round can run."""
    order = pipeline.round_stages(round_number)
    if stage not in order:
        raise ValueError(f"round {round_number} has no stage {stage!r}; its stages are {', '.join(order)}")
    check_round(pipeline, round_number)
    return order
