"""The rollout stage: MCTS over a problem set with a real policy, sandbox and grader; writes `nodes`.

This is where the pure search (`search.rollout`) meets the engines: a generation backend opened
on a checkpoint, the isolated code sandbox, the grader's worker processes and, from round 3, the
PPM. Prefect tasks and `kaizen rollout` both call `rollout_stage`.

Long stages resume. With `chunk_problems` set, the stage searches its problems that many at a time
(engines opened once) and saves each finished chunk's trees in a hidden directory next to the
output (`.nodes-00003.chunks/`); a stage that dies (a lost node, a retry, a `kill -9`) and runs
again with the same problems, checkpoints and settings (those Prefect's cache key counts: not
devices, worker counts or batch sizes) skips the saved chunks, and searches again any it cannot
read. Each tree has its own RNG and samples are seeded per prompt (problems with the same text
share a chunk, so their sample counts never restart in a resumed process), so chunking does not
change what a problem's search finds (up to the float noise of other batch shapes). The output is
written, and the chunks deleted, when the last chunk is done. One process at a time writes an
output (a lock file next to it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
from stat import S_ISREG
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data_store.home import add_table_origin_arguments, check_table_origin
from models.backends import (
    BACKENDS,
    BackendConfig,
    generation_settings,
    open_generator,
    open_ppm_scorer,
    require_policy_tokens,
)
from search.arguments import OneLineParser, add_worked_examples_argument
from search.mcts import MCTSConfig, SearchMode
from search.rollout import Problem, RolloutProgress, RolloutResult, RolloutStats, run_rollouts
from search.sandbox import SandboxConfig
from search.policy import with_worked_examples
from search.steps import StepFormat, check_worked_examples

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
    chunk_problems: int | None = field(
        default=None,
        metadata={"help": "problems searched together and saved as one chunk; a stage that dies resumes after its "
                  "last saved chunk. None: all at once, nothing saved before the end"},
    )

    worked_examples: int = field(
        default=0,
        metadata={"help": "worked examples in the step format shown to the policy before every prompt: a base "
                  "model that never saw the format needs them (search.steps.WORKED_EXAMPLES)"},
    )

    def __post_init__(self) -> None:
        if self.chunk_problems is not None and self.chunk_problems < 1:
            raise ValueError(f"chunk_problems must be >= 1 (or None), got {self.chunk_problems}")
        check_worked_examples(self.worked_examples, self.mcts.step_format)


Search = Callable[[Sequence[Problem], "Callable[[RolloutProgress], None] | None"], RolloutResult]


@contextmanager
def open_search(model: str | Path, config: RolloutStageConfig | None = None,
                ppm: str | Path | None = None) -> Iterator[Search]:
    """The engines for searching with the policy at `model` (and the PPM at `ppm`), opened once; yields
    a function that searches a list of problems with them and returns the trees."""
    from search.grading import Grader
    from search.sandbox import Sandbox

    config = config or RolloutStageConfig()
    if config.mcts.uses_ppm and ppm is None:
        raise ValueError(f"search mode {config.mcts.mode.value!r} needs a PPM checkpoint (--ppm)")
    require_policy_tokens(model, config.mcts.step_format)
    with (
        open_ppm_scorer(ppm, config.backend) as scorer,
        open_generator(model, config.backend, seed=config.mcts.seed) as engine,
        Sandbox(config.sandbox) as sandbox,
        Grader(workers=config.grader_workers) as grader,
    ):
        generator = with_worked_examples(engine, config.worked_examples)

        def search(problems: Sequence[Problem],
                   on_progress: Callable[[RolloutProgress], None] | None = None) -> RolloutResult:
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

        yield search


def search_trees(
    problems: Sequence[Problem],
    *,
    model: str | Path,
    config: RolloutStageConfig | None = None,
    ppm: str | Path | None = None,
    on_progress: Callable[[RolloutProgress], None] | None = None,
) -> RolloutResult:
    """Search every problem with the policy at `model` (and the PPM at `ppm`); returns the trees."""
    with open_search(model, config, ppm) as search:
        return search(problems, on_progress)


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
    """Search every problem and write all trees to `out` (the `nodes` table, atomically); with
    `config.chunk_problems`, chunk by chunk, resuming after the chunks an earlier attempt saved."""
    import pyarrow as pa

    from data_store.parquet import write_table
    from data_store.schema import NODES

    from data_store.home import hold_lock, output_lock

    config, out = config or RolloutStageConfig(), Path(out)
    # One process at a time writes an output: two would delete or overwrite each other's chunks.
    with hold_lock(output_lock(out), "a rollout stage", str(out)):
        if not problems:  # a shard can be empty when a round has fewer problems than shards
            write_table(NODES.empty_table(), out, table="nodes")
            stats = RolloutStats()
        elif config.chunk_problems is None:
            result = search_trees(problems, model=model, config=config, ppm=ppm, on_progress=on_progress)
            write_table(pa.Table.from_pylist(result.node_rows(run, round_number), schema=NODES), out, table="nodes")
            stats = result.stats
        else:
            return _chunked_rollout_stage(problems, model=model, out=out, config=config, ppm=ppm, run=run,
                                          round_number=round_number, on_progress=on_progress)
        shutil.rmtree(chunk_directory(out), ignore_errors=True)  # an earlier, chunked attempt's
        return stats


CHUNK_FORMAT = 2
"""Version of the saved chunks' layout and labels; chunks of another version are searched again (2: printed
errors and printed results judged as `search.rollout` does since)."""


def chunk_directory(out: Path) -> Path:
    """Where a chunked stage writing `out` saves its finished chunks until the output is written."""
    return out.parent / f".{out.stem}.chunks"


def problem_chunks(problems: Sequence[Problem], size: int) -> list[list[Problem]]:
    """The problems in chunks of about `size`, in order, except that problems with the same text share
    their first one's chunk: the generator's per-prompt sample counts (`search.policy.PromptSeeds`)
    must not start again for a twin in a later chunk that a resumed process searches."""
    first_index: dict[str, int] = {}
    chunks: list[list[Problem]] = [[] for _ in range(-(-len(problems) // size))]
    for index, problem in enumerate(problems):
        chunks[first_index.setdefault(problem.question, index) // size].append(problem)
    return [chunk for chunk in chunks if chunk]


def _chunked_rollout_stage(problems: Sequence[Problem], *, model: str | Path, out: Path, config: RolloutStageConfig,
                           ppm: str | Path | None, run: str, round_number: int,
                           on_progress: Callable[[RolloutProgress], None] | None) -> RolloutStats:
    """`rollout_stage` with chunks, under the output's lock it holds."""
    import pyarrow as pa

    from data_store.parquet import write_json, write_table
    from data_store.schema import NODES

    chunks = problem_chunks(problems, config.chunk_problems or len(problems))
    saved = chunk_directory(out)
    identity = _search_identity(problems, model, ppm, config, run, round_number)
    if chunk_manifest(saved).get("identity") != identity and saved.exists():
        shutil.rmtree(saved)  # another search's chunks: left half-deleted, they must not pass for this one's
    saved.mkdir(parents=True, exist_ok=True)
    write_json(saved / "manifest.json", {"identity": identity, "chunks": len(chunks)})
    tables: list[pa.Table] = []
    stats: list[RolloutStats] = []
    with ExitStack() as engines:
        search: Search | None = None  # opened for the first chunk not saved yet: a finished stage loads nothing
        for index, chunk in enumerate(chunks):
            table_path, stats_path = saved / f"chunk-{index:05d}.parquet", saved / f"chunk-{index:05d}.json"
            loaded = _load_chunk(table_path, stats_path, chunk)
            if loaded is None:
                search = search or engines.enter_context(open_search(model, config, ppm))
                result = search(chunk, _offset_progress(on_progress, _sum_stats(stats), len(problems)))
                loaded = (pa.Table.from_pylist(result.node_rows(run, round_number), schema=NODES), result.stats)
                write_json(stats_path, dataclasses.asdict(result.stats))
                write_table(loaded[0], table_path, table="nodes")  # the table last: it marks the chunk done
            tables.append(loaded[0])
            stats.append(loaded[1])
    write_table(pa.concat_tables(tables), out, table="nodes")
    shutil.rmtree(saved)
    return _sum_stats(stats)


def chunk_manifest(saved: Path) -> dict:
    """The manifest of a chunk directory (`identity`, `chunks`); empty when there is none or it is unreadable."""
    try:
        manifest = json.loads((saved / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _load_chunk(table_path: Path, stats_path: Path, chunk: Sequence[Problem]) -> tuple[pa.Table, RolloutStats] | None:
    """A saved chunk's trees and stats, or None when it is not saved or not readable as this chunk."""
    import pyarrow.parquet as pq

    from data_store.schema import schema_problems

    if not table_path.is_file():
        return None
    try:
        table = pq.read_table(table_path)
        stats = RolloutStats(**json.loads(stats_path.read_text(encoding="utf-8")))
        ids = set(table.column("problem_id").to_pylist())
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if schema_problems(table.schema, "nodes") or ids != {p.problem_id for p in chunk}:
        return None
    return table, stats


def _offset_progress(on_progress: Callable[[RolloutProgress], None] | None, before: RolloutStats,
                     trees_total: int) -> Callable[[RolloutProgress], None] | None:
    """A chunk's progress as progress through the whole stage (`before`: the chunks done already)."""
    if on_progress is None:
        return None
    return lambda progress: on_progress(dataclasses.replace(
        progress, trees_done=before.trees + progress.trees_done, trees_total=trees_total,
        nodes=before.nodes + progress.nodes, tokens_generated=before.tokens_generated + progress.tokens_generated))


def _sum_stats(parts: Sequence[RolloutStats]) -> RolloutStats:
    """The chunks' stats as one stage's: counts and times add up (times are search time, the saved
    chunks' from the attempt that searched them); passes are the most any chunk made."""
    summed = {f.name: sum(getattr(part, f.name) for part in parts) for f in dataclasses.fields(RolloutStats)}
    return RolloutStats(**{**summed, "passes": max((part.passes for part in parts), default=0)})


def _model_fingerprint(model: str | Path | None) -> str | None:
    """Names a checkpoint's contents cheaply: its files' names, sizes and modification times (a
    retrained checkpoint at the same path differs); a hub name stands for itself."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return str(model)
    stats = ((item.name, item.stat()) for item in path.iterdir())
    files = sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats if S_ISREG(stat.st_mode))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()


def _search_identity(problems: Sequence[Problem], model: str | Path, ppm: str | Path | None,
                     config: RolloutStageConfig, run: str, round_number: int) -> str:
    """What saved chunks must have been searched with to be reused: the problems, the checkpoints and
    every setting that decides what a search finds (the search's, the sandbox's and the backend's),
    as Prefect's cache key counts them: not where or how fast (devices by kind, no worker counts)."""
    from search.sandbox import SANDBOX_PLACEMENT_FIELDS

    sandbox = {name: value for name, value in dataclasses.asdict(config.sandbox).items()
               if name not in SANDBOX_PLACEMENT_FIELDS}
    document = {
        "format": CHUNK_FORMAT,
        "problems": [[p.problem_id, p.question, p.answer, *([p.rollouts] if p.rollouts else [])] for p in problems],
        "model": _model_fingerprint(model), "ppm": _model_fingerprint(ppm), "mcts": repr(config.mcts),
        "backend": generation_settings(config.backend), "sandbox": sandbox,
        "chunk_problems": config.chunk_problems, "worked_examples": config.worked_examples, "run": run,
        "round": round_number,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


SEARCH_ROLLOUTS = "search_rollouts"
"""The metadata key of a round's problem that the round searches with its own rollout count
(`search.unsolved_rollouts`: the select stage sets it)."""


def search_problems(table: "pa.Table") -> list[Problem]:
    """The search's view of a `problems` table."""
    problems = []
    for row in table.select(["problem_id", "problem", "answer", "metadata"]).to_pylist():
        rollouts = json.loads(row["metadata"] or "{}").get(SEARCH_ROLLOUTS)
        if rollouts is not None and (type(rollouts) is not int or rollouts < 1):
            raise ValueError(f"problem {row['problem_id']}: metadata {SEARCH_ROLLOUTS} must be an integer >= 1, "
                             f"got {rollouts!r}")
        problems.append(Problem(row["problem_id"], row["problem"], row["answer"], rollouts))
    return problems


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
    parser.add_argument("--rollouts", type=int, default=MCTSConfig.rollouts,
                        help=f"rollouts per problem (default %(default)s; a problem whose metadata sets "
                             f"{SEARCH_ROLLOUTS}, as a round's select stage does, keeps its own)")
    parser.add_argument("--width", type=int, default=MCTSConfig.width, help="candidates per expansion (default %(default)s)")
    parser.add_argument("--max-depth", type=int, default=MCTSConfig.max_depth, help="deepest step (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=MCTSConfig.temperature,
                        help="sampling temperature (default %(default)s)")
    parser.add_argument("--max-step-tokens", type=int, default=MCTSConfig.max_step_tokens,
                        help="token cap per step (default %(default)s, as recipes)")
    parser.add_argument("--ppm", default=None, help="PPM checkpoint: PPM-augmented MCTS (round 3+)")
    parser.add_argument("--step-format", choices=list(StepFormat), default=StepFormat.RSTAR.value,
                        help="the policy's step format (default %(default)s; coat: chain-of-action-thought)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="generation engine (default %(default)s)")
    parser.add_argument("--seed", type=int, default=MCTSConfig.seed, help="sampling seed (default %(default)s)")
    parser.add_argument("--chunk-problems", type=int, default=None,
                        help="search this many problems at a time, saving each chunk: run again after a crash, it "
                             "resumes after the last saved chunk (default: all at once)")
    add_worked_examples_argument(parser)
    add_table_origin_arguments(parser, default_run="adhoc")
    args = parser.parse_args(argv)
    # MCTSConfig refuses these too, but under its own field names and only after the problems load.
    for flag in ("--limit", "--rollouts", "--width", "--max-depth", "--max-step-tokens", "--chunk-problems"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not 0 <= args.temperature < math.inf:  # also refuses NaN
        parser.error(f"--temperature must be finite and >= 0, got {args.temperature}")
    check_table_origin(parser, args)

    from data_store.parquet import check_output_directory
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
    config = RolloutStageConfig(mcts=mcts, backend=BackendConfig(backend=args.backend), chunk_problems=args.chunk_problems,
                                worked_examples=args.worked_examples)
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
