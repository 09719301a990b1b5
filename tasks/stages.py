"""Prefect tasks: one per stage of a round, each a decorator and a call into `models.pipeline`.

The decorators add what Prefect is for: retries with back-off, persisted results, logs, tags for
the GPU concurrency limit, and a cache key (`StageCache`) made of the stage, the run, the round,
the shard, the digest of the recipe sections the stage reads, the digests of the artifacts it
consumes and of the files outside the home its recipe names (problems, benchmarks, a base model
directory). Re-running a round (a UI Retry, `kaizen round` again after a crash) therefore returns the
finished stages from the cache and executes only what failed or what changed; a stage re-run by
hand (`kaizen stage`) gives new output digests, so every stage downstream of it misses the cache.
"""

from __future__ import annotations

import binascii
import hashlib
import inspect
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.results import ResultRecordMetadata

from models.pipeline import (
    LOGGER_NAME, Artifact, Evaluation, MissingInputError, Mined, Pipeline, ProblemPools, content_digest,
)
from models.backends import PLACEMENT_FIELDS as BACKEND_PLACEMENT_FIELDS
from models.backends import device_kinds
from models.tiny import ModelLoadError
from models.training import RUN_ONLY_KEYS, TrainingInputError
from models.vllm_server import PLACEMENT_FIELDS as VLLM_PLACEMENT_FIELDS
from models.vllm_server import VLLMSetupError
from search.sandbox import SANDBOX_PLACEMENT_FIELDS, SandboxSetupError

GPU_TAG = "kaizen-gpu"
"""Tag of the stages that hold an accelerator; a tag concurrency limit of 1 serialises them."""

CACHE_DIR = ".cache"

# The recipe sections each stage reads (dotted: one part of a section): its cache key changes when
# they do, and only then. A PPM setting must not retrain the policy, so training is split by kind.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "problems": ("problems", "seed"),
    "select": ("problems", "seed"),  # and which problems earlier rounds solved (its input)
    # problems.source: a curriculum run's tokenizer corpus and teacher come from the seed, not the pool's sizes
    "bootstrap": ("model", "problems.source", "bootstrap", "training.sft", "seed", "step_format"),
    "rollout": ("search", "backend", "sandbox", "seed"),
    "mine": ("mining",),
    "sft": ("model", "sft_data", "training.sft", "seed"),
    "rl": ("training.rl", "rl", "sandbox"),
    "ppm": ("training.ppm",),
    # the held-out split of a curriculum is drawn from its settings (how many a round searches does not count)
    "evaluate": ("eval", "problems.source", "problems.curriculum", "backend", "sandbox", "seed"),
}
# Settings that say where and how fast a stage runs, not what it computes: a run resumed on other
# hardware (another server, another GPU split, more workers, other batch sizes) keeps its finished
# stages; so do training settings that only watch and keep a run (timeouts, logging, intermediate
# checkpoints: models.training.RUN_ONLY_KEYS). Sampling is seeded per prompt, so batching changes
# results only by float rounding (one exception: two problems with the same text share their
# prompts' counts, and the grouping decides which gets which samples). Devices count by kind only
# (`models.backends.device_kinds`: the kind sets the precision models load in); the server's
# dtype, context length and extra arguments count. The search settings count as the round resolves
# them (`_round_search`), so a later round's round_overrides entry leaves the earlier rounds'
# rollouts alone.
KEY_LEAVES_OUT = (
    *(f"backend.{name}" for name in BACKEND_PLACEMENT_FIELDS),
    *(f"backend.vllm.{name}" for name in VLLM_PLACEMENT_FIELDS),
    *(f"sandbox.{name}" for name in SANDBOX_PLACEMENT_FIELDS),
    "search.grader_workers", "search.pipeline_groups", "search.chunk_problems",
    "eval.config.grader_workers", "eval.config.pipeline_groups",
    "search.mcts", "search.round_overrides", "search.ppm_from_round",
    # counted only where they apply (_parts_when_set)
    "bootstrap.worked_examples", "search.unsolved_rollouts",
    *(f"{section}.{name}" for section in ("training.sft", "training.ppm", "training.rl", "bootstrap.training")
      for name in RUN_ONLY_KEYS),
)


def _digest_of(value: Any) -> str:
    """A stable text for a task input: artifacts by digest, containers element-wise, scalars as they are."""
    if isinstance(value, Artifact):
        return value.digest
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_digest_of(item) for item in value) + "]"
    if is_dataclass(value) and not isinstance(value, type):
        return "{" + ",".join(f"{f.name}:{_digest_of(getattr(value, f.name))}" for f in fields(value)) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_digest_of(item)}" for key, item in sorted(value.items())) + "}"
    return repr(value)


def _round_search(pipeline: Pipeline, round_number: int) -> str:
    """The MCTS settings one round searches with (overrides applied, mode and seed set)."""
    mcts = pipeline.recipe.search.mcts_for_round(round_number, pipeline.recipe.seed)
    return "mcts=" + _digest_of(mcts)


def _parts_when_set(stage: str, pipeline: Pipeline, inputs: dict[str, Any]) -> list[str]:
    """Key parts of settings that count only where they apply, so stages they do not touch (and homes
    from before they existed) keep their keys: the worked examples round 0's base model is shown
    (`bootstrap.worked_examples`), and a round's rollouts for never-solved problems
    (`search.unsolved_rollouts`, written by the select stage into the problems the search reads)."""
    policy = inputs.get("policy") if stage in ("rollout", "evaluate") else None
    if policy is not None and (shown := pipeline.worked_examples_for(policy)):
        return [f"worked_examples={shown}"]
    if stage == "select" and (rollouts := pipeline.recipe.search.unsolved_rollouts.get(inputs.get("round_number"))):
        return [f"unsolved_rollouts={rollouts}"]
    return []


@dataclass
class StageCache(CachePolicy):
    """Cache key: stage, run, round and shard, the stage's recipe sections, its input artifacts and the
    files outside the home it reads (`Pipeline.external_files`)."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        stage = task_ctx.task.name
        pipeline: Pipeline = inputs["pipeline"]
        # The home: two homes running one recipe must not hand each other's files back as results.
        parts = [stage, str(pipeline.layout.home), pipeline.run,
                 pipeline.recipe.digest(*STAGE_SECTIONS[stage], leave_out=KEY_LEAVES_OUT)]
        if stage == "rollout":
            parts.append(_round_search(pipeline, inputs["round_number"]))
        if "backend" in STAGE_SECTIONS[stage]:
            parts.append("devices=" + device_kinds(pipeline.recipe.backend))
        parts += _parts_when_set(stage, pipeline, inputs)
        parts += [f"{name}={_digest_of(value)}" for name, value in sorted(inputs.items())
                  if name not in ("pipeline", "on_progress")]
        parts += [f"{path}={content_digest(path, large_by_mtime=False)}" for path in pipeline.external_files(stage)]
        return f"{stage}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:32]}"


class _ToRunLogger(logging.Handler):
    """Forwards the core's log records to the Prefect run logger, so the UI shows them with the task."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_run_logger().log(record.levelno, record.getMessage())
        except Exception:  # noqa: BLE001 - outside a run context there is nowhere to forward to
            pass


_core_logger = logging.getLogger(LOGGER_NAME)
_core_logger.setLevel(logging.INFO)
_core_logger.addHandler(_ToRunLogger())
_core_logger.propagate = False  # the run logger already prints to the console: once is enough


def _cache_dir(pipeline: Pipeline, round_number: int | None) -> Path:
    return Path(pipeline.layout.run_dir(pipeline.run) if round_number is None
                else pipeline.layout.round_dir(pipeline.run, round_number)) / CACHE_DIR


def cached(stage_task: Any, pipeline: Pipeline, round_number: int | None, *, refresh: bool = False) -> Any:
    """The task with its cache records and results kept inside the round's directory: deleting a round
    forgets them, and a home resumed by another user or machine (another Prefect results path) keeps them."""
    where = _cache_dir(pipeline, round_number)
    return stage_task.with_options(
        cache_policy=StageCache().configure(key_storage=where), refresh_cache=refresh,
        result_storage=where / "results",  # a Path: Prefect makes it a local file system without a saved block
    )


def has_cache_record(stage_task: Any, pipeline: Pipeline, round_number: int | None, *args: Any) -> bool:
    """Whether calling the `cached` stage with `args` would find a cache record, asked before calling:
    the key as Prefect computes it (the parameters, defaults applied), looked up where `cached` keeps it."""
    bound = inspect.signature(stage_task.fn).bind(*args)
    bound.apply_defaults()
    key = StageCache().compute_key(SimpleNamespace(task=stage_task), dict(bound.arguments), {})
    if key is None:
        return False
    try:  # as Prefect reads it: a record it cannot parse is a miss
        ResultRecordMetadata.load_bytes((_cache_dir(pipeline, round_number) / key).read_bytes())
    except Exception:  # noqa: BLE001 - missing, cut short or not a record
        return False
    return True


def has_run_before(stage_name: str, pipeline: Pipeline, round_number: int | None) -> bool:
    """Whether the stage has a cache record in that round (for any inputs and settings)."""
    return any(_cache_dir(pipeline, round_number).glob(f"{stage_name}-*"))


_STAGE_OPTIONS: dict[str, Any] = {"persist_result": True, "cache_policy": StageCache()}
# Prefect fails a task whose cached result it cannot read (a file cut short by a full disk or a power
# loss) with the decoder's error; the task itself never ran, and the flow computes it again.
UNREADABLE_RESULT: tuple[type[BaseException], ...] = (binascii.Error, pickle.UnpicklingError, EOFError)
# Our errors for bad input and a machine set up wrong (no bubblewrap, no vLLM environment): each says in
# its message what is wrong.
_EXPLAINED: tuple[type[BaseException], ...] = (
    MissingInputError, ModelLoadError, TrainingInputError, SandboxSetupError, VLLMSetupError,
)
# These fail the same way every time: retrying only delays the one line that says what is wrong; so
# does retrying an unreadable cached result.
NOT_RETRIED: tuple[type[BaseException], ...] = (
    ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
    *_EXPLAINED, *UNREADABLE_RESULT,
)


# Our own ValueError subclasses (ProblemsError, RecipeError, EvalInputError...) say what is wrong with
# the input in their message; a bare ValueError or KeyError may be a bug, whose traceback is wanted.
_OWN_PACKAGES = ("data_store", "models", "search", "tasks", "flows")
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_input_error(error: BaseException) -> bool:
    """Whether `error` is bad input that its message fully explains (no traceback needed to act on it)."""
    if not str(error):
        return False
    if isinstance(error, _PATH_ERRORS):
        # The system's own names its path; one raised with a message (ours) says it. A bare
        # "Permission denied" from a socket or a signal explains nothing.
        return error.filename is not None or len(error.args) == 1
    if isinstance(error, _EXPLAINED):
        return True
    return isinstance(error, ValueError) and type(error).__module__.partition(".")[0] in _OWN_PACKAGES


class _InputErrorsWithoutTraceback(logging.Filter):
    """Keeps Prefect's "Task run failed" / "Encountered exception" records of bad input to their one
    line: two tracebacks of Prefect's engine above the CLI's one-line error only hid it. Only where
    the line itself says what went wrong (a record such as "Error computing cache key" keeps its
    traceback, the only place its cause shows), and never under KAIZEN_DEBUG=1."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if (error is not None and is_input_error(error) and not os.environ.get("KAIZEN_DEBUG")
                and any(text in record.getMessage() for text in (str(error), repr(error)))):
            record.exc_info = record.exc_text = None
        return True


for _run_logger in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_run_logger).addFilter(_InputErrorsWithoutTraceback())


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry what may pass next time (a lost device, a killed subprocess,
    a network error), not bad input (NOT_RETRIED)."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no exception to judge by: keep the retry policy
        return True
    return not isinstance(error, NOT_RETRIED)


_RETRY = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_jitter_factor": 0.5,
          "retry_condition_fn": worth_retrying}


@task(name="problems", **_STAGE_OPTIONS)
def problems_task(pipeline: Pipeline) -> ProblemPools:
    return pipeline.prepare_problems()


@task(name="select", **_STAGE_OPTIONS)
def select_task(pipeline: Pipeline, round_number: int, pool: Artifact, never_solved: list[str]) -> Artifact:
    return pipeline.select_problems(round_number, pool, never_solved)


@task(name="bootstrap", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def bootstrap_task(pipeline: Pipeline) -> Artifact:
    return pipeline.bootstrap()


@task(name="rollout", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def rollout_task(
    pipeline: Pipeline, round_number: int, shard: int, problems: Artifact, policy: Artifact, ppm: Artifact | None
) -> Artifact:
    progress = PrefectProgress(f"round {round_number} rollouts, shard {shard}")
    try:
        return pipeline.rollout_shard(round_number, shard, problems, policy, ppm, on_progress=progress.update)
    finally:
        progress.close()


@task(name="mine", **_STAGE_OPTIONS)
def mine_task(pipeline: Pipeline, round_number: int, nodes: list[Artifact], problems: Artifact) -> Mined:
    return pipeline.mine(round_number, nodes, problems)


@task(name="sft", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def sft_task(pipeline: Pipeline, round_number: int, tables: list[Artifact], previous_policy: Artifact | None) -> Artifact:
    return pipeline.train_sft(round_number, tables, previous_policy)


@task(name="rl", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def rl_task(pipeline: Pipeline, round_number: int, nodes: list[Artifact], problems: Artifact, policy: Artifact) -> Artifact:
    return pipeline.train_rl(round_number, nodes, problems, policy)


@task(name="ppm", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def ppm_task(
    pipeline: Pipeline, round_number: int, tables: list[Artifact], policy: Artifact, previous_ppm: Artifact | None
) -> Artifact | None:
    return pipeline.train_ppm(round_number, tables, policy, previous_ppm)


@task(name="evaluate", tags=[GPU_TAG], **_STAGE_OPTIONS, **_RETRY)
def evaluate_task(pipeline: Pipeline, round_number: int, policy: Artifact, ppm: Artifact | None,
                  label: str = "eval") -> Evaluation:
    progress = PrefectProgress(f"round {round_number} {label}")
    try:
        return pipeline.evaluate(round_number, policy, ppm, on_progress=progress.update, label=label)
    finally:
        progress.close()


@task(name="evaluate-checkpoint", tags=[GPU_TAG], cache_policy=NO_CACHE, **_RETRY)
def evaluate_checkpoint_task(model: str, benchmarks: list[Any], config: Any, ppm: str | None) -> Any:
    """Any checkpoint on loaded benchmarks (the `evaluate` flow): not a round's stage, so nothing is cached."""
    from models.evaluation import evaluate

    progress = PrefectProgress(f"evaluate {model}")
    try:
        return evaluate(model, benchmarks, config, ppm=ppm, on_progress=progress.update)
    finally:
        progress.close()


class PrefectProgress:
    """Reports a stage's progress as a Prefect progress artifact (the UI's bar), log lines, and a
    progress bar on the terminal (only when stderr is one)."""

    def __init__(self, description: str, every_s: float = 5.0) -> None:
        from prefect.artifacts import create_progress_artifact
        from tqdm import tqdm

        self.description = description
        self.every_s = every_s
        self.last = 0.0
        self.artifact_id = create_progress_artifact(progress=0.0, description=description)
        self.bar = tqdm(desc=description, unit="tree", file=sys.stderr, dynamic_ncols=True, disable=None, leave=False)

    def update(self, progress: Any) -> None:
        from prefect.artifacts import update_progress_artifact

        done, total = _done_total(progress)
        self.bar.total, self.bar.n = total, done
        self.bar.refresh()
        now = time.monotonic()
        if total and (now - self.last >= self.every_s or done >= total):
            self.last = now
            update_progress_artifact(self.artifact_id, progress=100.0 * done / total)
            get_run_logger().info("%s: %d/%d", self.description, done, total)

    def close(self) -> None:
        self.bar.close()


def _done_total(progress: Any) -> tuple[int, int]:
    """(done, total) from a rollout progress record, or the one inside an evaluation's."""
    progress = getattr(progress, "progress", progress)
    for done_name, total_name in (("trees_done", "trees_total"), ("done", "total")):
        if hasattr(progress, done_name):
            return getattr(progress, done_name), getattr(progress, total_name)
    raise TypeError(f"unknown progress record {progress!r}")

