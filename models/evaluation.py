"""Evaluation of a checkpoint on real benchmarks: loading them, running the modes, the `eval` table.

The modes themselves (greedy, maj@K, ppm@K, mcts) live in `search.evaluation`; this module gives
them engines (one generator per `evaluate` call, shared by every benchmark and mode; the code
sandbox; the grader's workers; the PPM) and turns their records into the `eval` table and a summary
per benchmark and mode. Prefect tasks and `kaizen eval` both call `evaluate` and `write_eval`.

A benchmark spec is one of
    math500 | gsm8k | aime24 | amc23          the files in the shared data directory
    NAME=PATH                                 JSONL or Parquet with id, problem, answer
    NAME=hf:DATASET[:CONFIG]                  a Hugging Face `datasets` name
any of the last two followed by `?KEY=VALUE&...` with `split` (datasets; default test) and a field
mapping (`problem`, `answer`, `id`), e.g. `gsm8k=hf:openai/gsm8k:main?problem=question`. A
reference in GSM8K's `solution #### answer` form is cut to the answer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_store.home import add_table_origin_arguments, check_table_origin
from models.backends import BACKENDS, BackendConfig, open_generator, open_ppm_scorer, require_policy_tokens
from search.arguments import OneLineParser, add_worked_examples_argument
from search.evaluation import EvalMode, EvalSearchConfig, ModeResult, check_sampling, evaluate_modes, parse_mode
from search.grading import DEFAULT_TIMEOUT_S
from search.rollout import Problem, RolloutProgress
from search.sandbox import SandboxConfig
from search.policy import with_worked_examples
from search.steps import StepFormat, check_worked_examples

if TYPE_CHECKING:
    import pyarrow as pa

KNOWN_BENCHMARKS: dict[str, str] = {
    "math500": "math500_test.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}
"""Benchmark names and their files in `data_store.home.shared_data_dir()`."""

DATASET_PREFIX = "hf:"
SPEC_OPTIONS = ("split", "problem", "answer", "id")
SPEC_FORMS = f"a known name ({', '.join(KNOWN_BENCHMARKS)}), NAME=PATH or NAME=hf:DATASET[:CONFIG], options after '?'"
GSM8K_ANSWER_MARK = "####"
EVAL_FILE = "eval.parquet"
SUMMARY_FILE = "summary.json"


class EvalInputError(ValueError):
    """A benchmark, mode or setting that cannot be evaluated; the message is one line."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[Problem]


@dataclass
class EvalConfig(EvalSearchConfig):
    """Everything an evaluation needs besides the checkpoints and the benchmarks."""

    modes: list[str] = field(default_factory=lambda: ["greedy"], metadata={"help": "greedy, maj@K, ppm@K, mcts"})
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"help": "generation engine"})
    sandbox: SandboxConfig = field(default_factory=SandboxConfig, metadata={"help": "code sandbox limits"})
    grader_workers: int = field(default=2, metadata={"help": "grader worker processes"})
    grader_timeout_s: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "seconds of checking per answer"})
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N problems of each benchmark"})
    worked_examples: int = field(
        default=0,
        metadata={"help": "worked examples in the step format shown to the policy before every prompt: a base "
                  "model that never saw the format needs them (search.steps.WORKED_EXAMPLES)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            check_sampling(parse_modes(self.modes), self.temperature)
        except ValueError as err:
            raise EvalInputError(str(err)) from None
        if self.limit is not None and self.limit < 1:
            raise EvalInputError(f"limit must be >= 1, got {self.limit}")
        try:
            check_worked_examples(self.worked_examples, self.step_format)
        except ValueError as err:
            raise EvalInputError(str(err)) from None


@dataclass(frozen=True)
class BenchmarkSummary:
    """One benchmark in one mode."""

    benchmark: str
    mode: str
    n: int
    correct: int
    accuracy: float
    outcomes: dict[str, int]  # correct, wrong, and each other grader status (no_answer, timeout, ...)
    tokens: int
    wall_s: float

    @property
    def metric(self) -> str:
        return f"{self.benchmark}/{self.mode}"


@dataclass
class EvalReport:
    rows: pa.Table  # the `eval` table: one row per problem and mode
    summary: list[BenchmarkSummary]

    def metrics(self) -> dict[str, float]:
        """Accuracy per `benchmark/mode`, the gate's input (models.gate.decide_gate)."""
        return {line.metric: line.accuracy for line in self.summary}


@dataclass(frozen=True)
class EvalProgress:
    """What `evaluate`'s progress callback receives after every pass of a search."""

    benchmark: str
    search: str  # "greedy", "8 samples" (shared by maj@8 and ppm@8) or "mcts"
    progress: RolloutProgress


# --- benchmarks --------------------------------------------------------------------------------


def parse_modes(names: Sequence[str]) -> list[EvalMode]:
    """Modes by name, each once; EvalInputError names an unknown one and the valid forms."""
    try:
        modes = [parse_mode(name) for name in names]
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    if not modes:
        raise EvalInputError("no evaluation mode given")
    if len({mode.name for mode in modes}) < len(modes):
        raise EvalInputError(f"a mode is listed twice: {', '.join(names)}")
    return modes


@dataclass(frozen=True)
class _Source:
    name: str
    source: str  # a file path or a datasets name
    options: dict[str, str]  # split and field mapping


def _parse_spec(spec: str) -> _Source:
    from data_store.home import HomeError, check_name, shared_data_dir

    name, separator, target = spec.partition("=")
    name = name.strip()
    try:
        check_name(name, "benchmark")  # it names files and metric keys
    except HomeError as err:
        raise EvalInputError(f"bad benchmark spec {spec!r}: {err}") from None
    if not separator:
        if name not in KNOWN_BENCHMARKS:
            raise EvalInputError(f"unknown benchmark {name!r}; use {SPEC_FORMS}")
        return _Source(name, str(shared_data_dir() / KNOWN_BENCHMARKS[name]), {})
    target, _, query = target.strip().partition("?")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, equals, value = item.partition("=")
        if not equals or key not in SPEC_OPTIONS or not value:
            valid = ", ".join(f"{option}=..." for option in SPEC_OPTIONS)
            raise EvalInputError(f"bad option {item!r} in benchmark {name!r}; use {valid}")
        options[key] = value
    is_dataset = target.startswith(DATASET_PREFIX)
    source = target.removeprefix(DATASET_PREFIX) if is_dataset else target
    if not source:
        raise EvalInputError(f"benchmark {name!r} names no source; use {SPEC_FORMS}")
    if not is_dataset and not Path(source).is_file():
        raise EvalInputError(f"benchmark {name!r}: {source} is a directory, not a file" if Path(source).is_dir()
                             else f"benchmark {name!r}: no such file {source}")
    return _Source(name, source, options)


def benchmark_file(spec: str) -> Path | None:
    """The local file a benchmark spec reads, or None for a `datasets` name (or a spec that will fail to load)."""
    try:
        source = _parse_spec(spec)
    except EvalInputError:
        return None
    path = Path(source.source)
    return path if path.is_file() else None


def _reference(answer: str) -> str:
    """The reference answer, cut after GSM8K's `####` mark when it is a whole solution."""
    if GSM8K_ANSWER_MARK in answer:
        return answer.rpartition(GSM8K_ANSWER_MARK)[2].strip() or answer
    return answer


def load_benchmark(spec: str, limit: int | None = None) -> Benchmark:
    """Load a benchmark from a spec (module docstring); EvalInputError with one line if it cannot."""
    from data_store.problems import ProblemsError, load_problems

    source = _parse_spec(spec)
    fields_map = {key: value for key, value in source.options.items() if key != "split"}
    try:
        table = load_problems(
            source.source,
            fields=fields_map,
            split=source.options.get("split", "test"),
            require_answer=False,
            limit=limit,
        )
    except ProblemsError as err:
        raise EvalInputError(f"benchmark {source.name!r}: {err}") from None
    rows = table.select(["problem_id", "problem", "answer"]).to_pylist()
    if not rows:
        raise EvalInputError(f"benchmark {source.name!r} ({source.source}) has no problems")
    for row in rows:
        if row["answer"] is None:
            raise EvalInputError(
                f"benchmark {source.name!r} ({source.source}): problem {row['problem_id']} has no answer; "
                "every benchmark problem needs a reference answer"
            )
    problems = [Problem(row["problem_id"], row["problem"], _reference(row["answer"])) for row in rows]
    return Benchmark(source.name, problems)


def check_eval_settings(
    benchmarks: Sequence[str], modes: Sequence[str], config: dict[str, Any], *, extra_names: Collection[str] = ()
) -> None:
    """Check a recipe's evaluation settings without loading anything; EvalInputError names the first problem.

    `extra_names` are bare benchmark names the caller resolves itself (a run's held-out split).
    """
    for spec in benchmarks:
        if spec.strip() not in extra_names:
            _parse_spec(spec)
    parse_modes(modes)
    known = {option.name for option in fields(EvalConfig)} - {"modes"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise EvalInputError(f"unknown eval setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:  # the values' own rules (a temperature below 0, a limit of 0), before any work starts
        EvalConfig(**{**config, "modes": list(modes)})
    except (TypeError, ValueError) as err:
        raise EvalInputError(str(err)) from None


# --- evaluation --------------------------------------------------------------------------------


def evaluate(
    model: str | Path,
    benchmarks: Sequence[Benchmark],
    config: EvalConfig,
    ppm: str | Path | None = None,
    run: str = "eval",
    round_number: int = 0,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> EvalReport:
    """Evaluate the policy at `model` (and the PPM at `ppm`) on every benchmark in every mode of `config`.

    The PPM is loaded only when a mode needs it. Raises EvalInputError for a PPM mode without `ppm`
    or a benchmark name given twice, and models.tiny.ModelLoadError when the policy or the PPM does
    not load. Nothing is written here (see `write_eval`).
    """
    import pyarrow as pa

    from data_store.schema import EVAL, conform
    from search.grading import Grader
    from search.sandbox import Sandbox

    modes = parse_modes(config.modes)
    needing = [mode.name for mode in modes if mode.needs_ppm]
    if needing and ppm is None:
        raise EvalInputError(f"mode(s) {', '.join(needing)} need a PPM checkpoint (--ppm)")
    names = [benchmark.name for benchmark in benchmarks]
    if len(set(names)) < len(names):
        raise EvalInputError(f"a benchmark is listed twice: {', '.join(names)}")
    try:
        require_policy_tokens(model, config.step_format)
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    rows: list[dict[str, Any]] = []
    summary: list[BenchmarkSummary] = []
    with (
        open_ppm_scorer(ppm if needing else None, config.backend) as scorer,
        open_generator(model, config.backend, seed=config.seed) as engine,
        Sandbox(config.sandbox) as sandbox,
        Grader(workers=config.grader_workers, timeout_s=config.grader_timeout_s) as grader,
    ):
        generator = with_worked_examples(engine, config.worked_examples)
        for benchmark in benchmarks:
            report_progress = _progress_for(benchmark.name, on_progress)
            results = evaluate_modes(
                benchmark.problems[: config.limit],
                modes,
                config,
                generator=generator,
                executor=sandbox,
                checker=grader,
                scorer=scorer,
                on_progress=report_progress,
            )
            for result in results:
                rows += _rows(result, benchmark.name, run, round_number)
                summary.append(_summary(result, benchmark.name))
    table = conform(pa.Table.from_pylist(rows) if rows else EVAL.empty_table(), "eval")
    return EvalReport(table, summary)


def _progress_for(
    benchmark: str, on_progress: Callable[[EvalProgress], None] | None
) -> Callable[[str, RolloutProgress], None] | None:
    if on_progress is None:
        return None
    return lambda search, progress: on_progress(EvalProgress(benchmark, search, progress))


def _rows(result: ModeResult, benchmark: str, run: str, round_number: int) -> list[dict[str, Any]]:
    return [
        {
            "run": run,
            "round": round_number,
            "benchmark": benchmark,
            "problem_id": record.problem_id,
            "mode": result.mode.name,
            "prediction": record.prediction,
            "correct": record.correct,
            "extracted_answer": record.extracted_answer,
            "grader_status": record.status,
            "tokens": record.tokens,
        }
        for record in result.records
    ]


def _summary(result: ModeResult, benchmark: str) -> BenchmarkSummary:
    return BenchmarkSummary(
        benchmark=benchmark,
        mode=result.mode.name,
        n=len(result.records),
        correct=result.correct,
        accuracy=result.accuracy,
        outcomes=result.outcome_counts(),
        tokens=result.tokens,
        wall_s=round(result.wall_seconds, 3),
    )


def write_eval(report: EvalReport, out_dir: str | Path) -> Path:
    """Write `eval.parquet` and `summary.json` into `out_dir`; returns the table's path.

    Both files are written atomically and the summary last, after any older summary is removed:
    a directory with a summary holds a complete evaluation, and an interrupted write never pairs
    a new table with an old summary.
    """
    from data_store.parquet import write_json, write_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    table_path = write_table(report.rows, out / EVAL_FILE, table="eval")
    document = {"metrics": report.metrics(), "summary": [asdict(line) for line in report.summary]}
    write_json(out / SUMMARY_FILE, document, indent=2, sort_keys=True)
    return table_path


# --- CLI ---------------------------------------------------------------------------------------

PROG = "kaizen eval"


def format_summary(summary: Sequence[BenchmarkSummary]) -> str:
    """The benchmark x mode table `kaizen eval` prints."""
    header = ("benchmark", "mode", "accuracy", "correct/n", "not graded or wrong", "tokens", "wall s")
    lines = [
        (
            line.benchmark,
            line.mode,
            f"{100 * line.accuracy:.1f}%",
            f"{line.correct}/{line.n}",
            ", ".join(f"{name} {count}" for name, count in line.outcomes.items() if name != "correct") or "-",
            str(line.tokens),
            f"{line.wall_s:.1f}",
        )
        for line in summary
    ]
    widths = [max(len(row[column]) for row in (header, *lines)) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in (header, *lines))


class ProgressBars:
    """An `evaluate` progress callback: one bar of finished trees per benchmark and search, on stderr."""

    def __init__(self) -> None:
        self.label: str | None = None
        self._update: Callable[[RolloutProgress], None] | None = None
        self._close: Callable[[], None] | None = None

    def __call__(self, event: EvalProgress) -> None:
        from models.rollout import tqdm_progress

        label = f"{event.benchmark} {event.search}"
        if label != self.label:
            self.close()
            self.label = label
            self._update, self._close = tqdm_progress(label)
        assert self._update is not None
        self._update(event.progress)

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


# The generation settings a command line may set; both `kaizen eval` and `kaizen evaluate` (the flow) take them.
SEARCH_OPTIONS = ("temperature", "max_step_tokens", "max_depth", "mcts_width", "mcts_rollouts", "worked_examples")


def add_checkpoint_arguments(parser: OneLineParser) -> None:
    """The options of evaluating one checkpoint, shared by `kaizen eval` and `kaizen evaluate`."""
    defaults = EvalConfig()
    parser.add_argument("--model", required=True, help="policy checkpoint (directory or org/model hub name)")
    parser.add_argument("--ppm", default=None, help="PPM checkpoint; needed by ppm@K and mcts")
    parser.add_argument("--benchmark", action="append", required=True, dest="benchmarks", metavar="NAME[=SOURCE]",
                        help=f"repeatable; {SPEC_FORMS}")
    parser.add_argument("--mode", action="append", dest="modes", metavar="MODE",
                        help="repeatable: greedy (default), maj@K, ppm@K, mcts")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="generation engine (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="for maj@K, ppm@K and mcts (default %(default)s)")
    parser.add_argument("--max-step-tokens", type=int, default=defaults.max_step_tokens,
                        help="token cap per step (default %(default)s, as recipes)")
    parser.add_argument("--max-depth", type=int, default=defaults.max_depth, help="deepest step (default %(default)s)")
    parser.add_argument("--mcts-width", type=int, default=defaults.mcts_width,
                        help="mcts: candidates per expansion (default %(default)s)")
    parser.add_argument("--mcts-rollouts", type=int, default=defaults.mcts_rollouts,
                        help="mcts: rollouts per problem (default %(default)s)")
    parser.add_argument("--step-format", choices=list(StepFormat), default=defaults.step_format.value,
                        help="the policy's step format (default %(default)s; coat: chain-of-action-thought)")
    add_worked_examples_argument(parser)


def check_checkpoint_sources(model: str | Path, ppm: str | Path | None) -> None:
    """ModelLoadError, before anything starts, for a policy or PPM path with nothing there (one line)."""
    from models.tiny import PPM_SCORING_FILE, ModelLoadError, check_policy_source, require_model_source

    check_policy_source(model)
    if ppm is not None:
        require_model_source(ppm, "PPM")
        path = Path(ppm).expanduser()
        if path.is_dir() and not (path / PPM_SCORING_FILE).is_file():
            raise ModelLoadError(f"{ppm} is not a PPM checkpoint (no {PPM_SCORING_FILE}): --ppm takes what "
                                 "`kaizen train ppm` writes")


def checked_evaluation(args: Any) -> tuple[EvalConfig, list[Benchmark]]:
    """The config and loaded benchmarks of parsed `add_checkpoint_arguments` options; EvalInputError (or
    ProblemsError) in one line for bad values, a mode needing a PPM without --ppm, or a benchmark that
    is unknown, missing, malformed or empty. Nothing is loaded but the benchmarks (an `hf:` one through
    `datasets`, which caches it for the flow)."""
    config = EvalConfig(
        modes=args.modes or ["greedy"], **search_options(args), seed=args.seed,
        backend=BackendConfig(backend=args.backend), limit=args.limit, step_format=args.step_format,
    )
    if args.ppm is None and (needing := [mode.name for mode in parse_modes(config.modes) if mode.needs_ppm]):
        raise EvalInputError(f"mode(s) {', '.join(needing)} need a PPM checkpoint (--ppm)")
    return config, [load_benchmark(spec, limit=args.limit) for spec in args.benchmarks]


def search_options(args: Any) -> dict[str, Any]:
    """The SEARCH_OPTIONS values of parsed `add_checkpoint_arguments` options."""
    return {name: getattr(args, name) for name in SEARCH_OPTIONS}


def cli_eval(argv: list[str]) -> int:
    """`kaizen eval --model DIR --benchmark NAME[=SOURCE] ... --mode MODE ... --out DIR`."""
    parser = OneLineParser(prog=PROG, description="Evaluate a checkpoint on benchmarks; writes the eval table.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help=f"output directory; {EVAL_FILE} and {SUMMARY_FILE} go there")
    add_table_origin_arguments(parser, default_run="eval")
    args = parser.parse_args(argv)
    check_table_origin(parser, args)

    from data_store.parquet import check_output_directory
    from models.tiny import ModelLoadError

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    try:
        config, benchmarks = checked_evaluation(args)
        check_output_directory(args.out)
    except ValueError as err:
        return fail(str(err), 2)
    try:
        check_checkpoint_sources(args.model, args.ppm)
    except ModelLoadError as err:
        return fail(str(err), 1)
    started = time.perf_counter()
    bars = ProgressBars()
    try:
        report = evaluate(args.model, benchmarks, config, ppm=args.ppm, run=args.run,
                          round_number=args.round_number, on_progress=bars)
    except (EvalInputError, ModelLoadError) as err:
        return fail(str(err), 2 if isinstance(err, EvalInputError) else 1)
    finally:
        bars.close()
    out = write_eval(report, args.out)
    print(format_summary(report.summary))
    print(f"{report.rows.num_rows} rows in {time.perf_counter() - started:.1f} s -> {out}")
    return 0
