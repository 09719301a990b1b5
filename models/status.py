"""`kaizen status`: where a run stands, read from its files alone (no Prefect, no model loaded).

For a multi-day run on a remote machine: which process holds the run now, which round is promoted
and which comes next, and per round its gate decision and held-out accuracy, which stages have
written their outputs, and what an interrupted stage left to resume from (saved rollout chunks,
training checkpoints). It says what the files say; a stage whose output exists may still be
re-executed by the next round if its inputs changed (Prefect's cache decides that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data_store.home import CHECKPOINT_OF
from search.arguments import OneLineParser

if TYPE_CHECKING:
    from models.pipeline import Pipeline

ROUND_DIR = re.compile(r"round-(\d+)")


@dataclass
class RoundStatus:
    round: int
    state: str  # promoted | stale: <why> | gate failed | not finished
    accuracy: float | None  # the gate's benchmark and mode
    gate_reason: str = ""
    done: list[str] = field(default_factory=list)
    resumable: list[str] = field(default_factory=list)


def _round_stages(pipeline: Pipeline, round_number: int) -> tuple[str, ...]:
    """The round's stages with outputs of their own in the round: the problems stage's are the run's."""
    return (*(stage for stage in pipeline.round_stages(round_number) if stage != "problems"), "gate")


def _stage_done(pipeline: Pipeline, round_number: int, stage: str) -> str | None:
    """The stage as it appears in the done list (with a shard count when some shards are missing), or None."""
    layout, run = pipeline.layout, pipeline.run
    if stage == "rollout":
        shards = pipeline.recipe.search.shards
        written = sum(layout.table_path(run, round_number, "nodes", shard=s).is_file() for s in range(shards))
        return None if written == 0 else "rollout" if written == shards else f"rollout ({written} of {shards} shards)"
    if stage in CHECKPOINT_OF:
        from models.training import PROVENANCE_FILE

        checkpoint = layout.checkpoint_dir(run, round_number, CHECKPOINT_OF[stage])
        return stage if (checkpoint / PROVENANCE_FILE).is_file() else None
    output = {
        "select": layout.table_path(run, round_number, "problems", stage="problems"),
        "mine": layout.stage_dir(run, round_number, "mine") / "pairs.parquet",
        "evaluate": layout.table_path(run, round_number, "eval"),
        "gate": layout.table_path(run, round_number, "rounds"),
    }[stage]
    return stage if output.is_file() else None


def _resumable(pipeline: Pipeline, round_number: int, stages: tuple[str, ...]) -> list[str]:
    """What interrupted stages of the round left to resume from, each marked `in progress` while a process
    holds the lock of the stage that saved it (it is working on it now) and `to resume` otherwise."""
    from data_store.home import lock_holder, output_lock
    from models.rollout import chunk_directory, chunk_manifest
    from models.training import checkpoint_step, complete_checkpoints

    def state(lock: Path) -> str:
        return "in progress" if lock_holder(lock) else "to resume"

    layout, run, found = pipeline.layout, pipeline.run, []
    if "rollout" in stages:
        for shard in range(pipeline.recipe.search.shards):
            nodes = layout.table_path(run, round_number, "nodes", shard=shard)
            saved = chunk_directory(nodes)
            chunks = len(list(saved.glob("chunk-*.parquet")))
            if chunks:
                total = chunk_manifest(saved).get("chunks", "?")
                found.append(f"{state(output_lock(nodes))}: rollout shard {shard}: {chunks} of {total} chunks saved")
    for stage in (s for s in stages if s in CHECKPOINT_OF):
        output = layout.checkpoint_dir(run, round_number, CHECKPOINT_OF[stage])
        for staging in sorted(output.parent.glob(f".{output.name}.partial-*")):
            checkpoints = complete_checkpoints(staging)  # none: nothing to resume, the next attempt deletes it
            if checkpoints:
                found.append(f"{state(output_lock(output))}: {stage}: checkpoint at step "
                             f"{checkpoint_step(checkpoints[-1])} saved")
    return found


def run_status(pipeline: Pipeline) -> list[RoundStatus]:
    """One entry per round directory of the run, in round order."""
    from models.report import round_figures

    run_dir = pipeline.layout.run_dir(pipeline.run)
    numbers = sorted(int(match[1]) for path in run_dir.glob("round-*")
                     if path.is_dir() and (match := ROUND_DIR.fullmatch(path.name)))  # not a copy like round-001.bak
    gate = pipeline.recipe.gate
    figures = {row.round: row for row in round_figures(pipeline.layout, pipeline.run)}
    rounds = []
    for number in numbers:
        stages = _round_stages(pipeline, number)
        stale = pipeline.stale_since(number)
        recorded = figures.get(number)
        if stale:
            state = f"stale: {stale}"
        elif pipeline.promotion(number) is not None:
            state = "promoted"
        elif recorded is not None and recorded.gate_passed is False:
            state = "gate failed"
        else:
            state = "not finished"
        accuracy = recorded.accuracy.get(f"{gate.benchmark}/{gate.mode}") if recorded else None
        done = [text for text in (_stage_done(pipeline, number, stage) for stage in stages) if text]
        rounds.append(RoundStatus(number, state, accuracy, recorded.gate_reason if recorded else "", done,
                                  _resumable(pipeline, number, stages)))
    return rounds


def format_status(pipeline: Pipeline) -> str:
    layout, run = pipeline.layout, pipeline.run
    holder = layout.run_holder(run)
    current = pipeline.current()
    promoted = "none yet" if current is None else f"round {current.round}" + (
        " (stale: a later `kaizen round` runs it again)" if pipeline.stale_since(current.round) else "")
    lines = [
        f"run {run!r} in {layout.home}",
        f"  in use by {holder}" if holder else "  idle (no process holds it)",
        f"  promoted: {promoted}",
        f"  next: round {pipeline.next_round()}",
    ]
    rounds = run_status(pipeline)
    if not rounds:
        return "\n".join([*lines, "  no round has started"])
    gate = pipeline.recipe.gate
    lines.append(f"round  {'state':<14} {gate.mode + ' ' + gate.benchmark:<24} stages with outputs")
    for entry in rounds:
        accuracy = f"{entry.accuracy:.3f}" if entry.accuracy is not None else "-"
        state = entry.state if len(entry.state) <= 14 else "stale"
        lines.append(f"{entry.round:>5}  {state:<14} {accuracy:<24} {', '.join(entry.done) or '-'}")
        if entry.state.startswith("stale:"):
            lines.append(f"{'':7}{entry.state}")
        if entry.state == "gate failed" and entry.gate_reason:
            lines.append(f"{'':7}gate: {entry.gate_reason}")
        lines += [f"{'':7}{text}" for text in entry.resumable]
    return "\n".join(lines)


def cli_status(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen status", description="Where a run stands: rounds, stages, what can resume.")
    parser.add_argument("--recipe", required=True, help="recipe name (deployments/recipes) or YAML path")
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $KAIZEN_HOME or ./kaizen_home)")
    args = parser.parse_args(argv)

    from data_store.home import Layout, get_home
    from models.pipeline import Pipeline
    from models.recipe import load_recipe

    layout = Layout(get_home(args.home))
    recipe = load_recipe(args.recipe)
    if not layout.home.is_dir():
        parser.error(f"data home {layout.home} does not exist (--home, or $KAIZEN_HOME)")
    if not layout.run_dir(recipe.run).is_dir():
        runs = sorted(path.name for path in (layout.home / "runs").glob("*") if path.is_dir())
        print(f"run {recipe.run!r} has not started in {layout.home} "
              f"(runs there: {', '.join(runs) if runs else 'none'})")
        return 0
    print(format_status(Pipeline(recipe, layout)))
    return 0
