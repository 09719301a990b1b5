"""The rollout stage: MCTS over a problem set with a real policy, sandbox and grader; writes `nodes`.

This is where the pure search (`search.rollout`) meets the engines: a generation backend opened
on a checkpoint, the isolated code sandbox, the grader's worker processes and, from round 3, the
PPM. Prefect tasks and `kaizen rollout` both call `rollout_stage`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from models.backends import BACKENDS, BackendConfig, open_generator, open_ppm_scorer, require_policy_tokens
from search.arguments import OneLineParser
from search.mcts import MCTSConfig, SearchMode
from search.rollout import Problem, RolloutProgress, RolloutResult, RolloutStats, run_rollouts
from search.sandbox import SandboxConfig
from search.steps import StepFormat

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class RolloutStageConfig:
    """Everything a rollout stage needs besides the problems and the checkpoints."""

    mcts: MCTSConfig = field(default_factory=MCTSConfig, metadata={"help": "search settings"})
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"help": "generation engine"})
    sandbox: SandboxConfig = field(default_factory=SandboxConfig, metadata={"help": "code sandbox limits"})
    grader_workers: int = field(default=2, metadata={"help": "grader worker processes"})
    pipeline_groups: int = field(default=2, metadata={"help": "tree groups that take turns so execution overlaps generation"})


def search_trees(
    problems: Sequence[Problem],
    *,
    model: str | Path,
    config: RolloutStageConfig | None = None,
    ppm: str | Path | None = None,
    on_progress: Callable[[RolloutProgress], None] | None = None,
) -> RolloutResult:
    """Search every problem with the policy at `model` (and the PPM at `ppm`); returns the trees."""
    from search.grading import Grader
    from search.sandbox import Sandbox

    config = config or RolloutStageConfig()
    if config.mcts.uses_ppm and ppm is None:
        raise ValueError(f"search mode {config.mcts.mode.value!r} needs a PPM checkpoint (--ppm)")
    require_policy_tokens(model, config.mcts.step_format)
    with (
        open_ppm_scorer(ppm, config.backend) as scorer,
        open_generator(model, config.backend, seed=config.mcts.seed) as generator,
        Sandbox(config.sandbox) as sandbox,
        Grader(workers=config.grader_workers) as grader,
    ):
        return run_rollouts(
            problems,
            config.mcts,
            generator=generator,
            executor=sandbox,
            checker=grader,
            scorer=scorer,
            pipeline_groups=config.pipeline_groups,
            on_progress=on_progress,
        )


def rollout_stage(
    problems: Sequence[Problem],
    *,
    model: str | Path,
    out: str | Path,
    config: RolloutStageConfig | None = None,
    ppm: str | Path | None = None,
    run: str = "adhoc",
    round_number: int = 0,
    on_progress: Callable[[RolloutProgress], None] | None = None,
) -> RolloutStats:
    """Search every problem and write all trees to `out` (the `nodes` table, atomically)."""
    import pyarrow as pa

    from data_store.parquet import write_table
    from data_store.schema import NODES

    if not problems:  # a shard can be empty when a round has fewer problems than shards
        write_table(NODES.empty_table(), out, table="nodes")
        return RolloutStats()
    result = search_trees(problems, model=model, config=config, ppm=ppm, on_progress=on_progress)
    write_table(pa.Table.from_pylist(result.node_rows(run, round_number), schema=NODES), out, table="nodes")
    return result.stats


def search_problems(table: "pa.Table") -> list[Problem]:
    """The search's view of a `problems` table."""
    return [
        Problem(problem_id=row["problem_id"], question=row["problem"], answer=row["answer"])
        for row in table.select(["problem_id", "problem", "answer"]).to_pylist()
    ]


def tqdm_progress(description: str) -> tuple[Callable[[RolloutProgress], None], Callable[[], None]]:
    """A progress callback drawing a bar of finished trees on stderr, and the function that closes it.
    The bar appears with the first progress (after the model loaded): a model that does not load
    leaves only its error line."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def update(progress: RolloutProgress) -> None:
        if not bars:
            bars.append(tqdm(desc=description, unit="tree", file=sys.stderr, dynamic_ncols=True))
        bar = bars[0]
        bar.total = progress.trees_total
        bar.n = progress.trees_done
        bar.set_postfix(nodes=progress.nodes, tokens=progress.tokens_generated, refresh=False)
        bar.refresh()

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def cli_rollout(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen rollout", description="Run MCTS rollouts and write the nodes table.")
    parser.add_argument("--model", required=True, help="policy checkpoint (directory or model name)")
    parser.add_argument("--problems", required=True, help="JSONL/Parquet file with id, problem, answer, or a datasets name")
    parser.add_argument("--out", required=True, help="output directory; nodes.parquet is written there")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--rollouts", type=int, default=MCTSConfig.rollouts, help="rollouts per problem (default %(default)s)")
    parser.add_argument("--width", type=int, default=MCTSConfig.width, help="candidates per expansion (default %(default)s)")
    parser.add_argument("--max-depth", type=int, default=MCTSConfig.max_depth, help="deepest step (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=MCTSConfig.temperature, help="sampling temperature")
    parser.add_argument("--max-step-tokens", type=int, default=256, help="token cap per step (default %(default)s)")
    parser.add_argument("--ppm", default=None, help="PPM checkpoint: PPM-augmented MCTS (round 3+)")
    parser.add_argument("--step-format", choices=list(StepFormat), default=StepFormat.RSTAR.value,
                        help="the policy's step format (default %(default)s; coat: chain-of-action-thought)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="generation engine (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", default="adhoc", help="run name recorded in the table")
    parser.add_argument("--round", type=int, default=0, dest="round_number", help="round recorded in the table")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.round_number < 0:
        parser.error(f"--round must be >= 0, got {args.round_number}")

    from data_store.home import check_name
    from data_store.parquet import check_output_directory

    try:
        check_name(args.run, "run")
    except ValueError as err:
        parser.error(str(err))
    from data_store.problems import load_problems

    try:
        out = check_output_directory(args.out) / "nodes.parquet"
    except ValueError as err:
        parser.error(str(err))
    problems = search_problems(load_problems(args.problems, limit=args.limit, require_answer=True))
    if not problems:
        raise ValueError(f"{args.problems} has no problems")
    mcts = MCTSConfig(
        rollouts=args.rollouts,
        width=args.width,
        max_depth=args.max_depth,
        temperature=args.temperature,
        max_step_tokens=args.max_step_tokens,
        mode=SearchMode.PPM if args.ppm else SearchMode.TERMINAL,
        seed=args.seed,
        step_format=args.step_format,
    )
    config = RolloutStageConfig(mcts=mcts, backend=BackendConfig(backend=args.backend))
    update, close = tqdm_progress("rollouts")
    try:
        stats = rollout_stage(
            problems, model=args.model, out=out, config=config, ppm=args.ppm,
            run=args.run, round_number=args.round_number, on_progress=update,
        )
    finally:
        close()
    print(
        f"{stats.trees} problems, {stats.trees_solved} solved, {stats.nodes} nodes, "
        f"{stats.tokens_generated} tokens in {stats.wall_seconds:.1f} s -> {out}"
    )
    return 0
