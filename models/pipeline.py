"""The stages of a self-evolution round as plain functions over a recipe and a data home.

problems -> rollouts (sharded) -> mine -> train SFT -> train PPM -> evaluate -> gate -> promote.
Round 0 is the bootstrap: the base model, or the base model fine-tuned on a teacher's solutions.
A recipe's step format (rstar, or Satori's chain-of-action-thought) reaches every stage through its
sections (`models.recipe`); the bootstrap reads it here, to write the teacher's solutions in it.

Stages hand each other `Artifact`s (a path and a content digest), never tables or models, so an
orchestrator can persist them, key caches on them and ship them between machines. Every stage
writes its output atomically (a temporary name renamed on success) and overwrites what a failed
or superseded attempt left, so a stage can always be run again. A round starts from the
checkpoints of the round before it, as that round's `promoted.json` records them; the file exists
only while the round's gate passes. "Current" is the latest promoted round.

The Prefect tasks in `tasks/` are thin wrappers over these functions; nothing here imports Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from data_store.home import BOOTSTRAP_ROUND_STAGES, CHECKPOINT_OF, SEARCH_ROUND_STAGES, Layout
from data_store.parquet import write_json, write_table
from data_store.schema import conform
from models.recipe import CURRICULUM, CURRICULUM_TEST, TINY, Recipe

# Files above this size are identified by their size and 256 evenly spaced 16 KiB windows rather
# than all of their content: hashing tens of gigabytes of weights for every cache key would cost
# minutes. The files a stage writes also by their modification time: a LoRA merge that changed one
# projection kind (~4% of the bytes) slips past all 256 windows about once in 20 rewrites. Files
# outside the home (a base model) not: copied or downloaded again, it is the same model.
_CONTENT_HASH_LIMIT = 64 * 2**20
_WINDOWS, _WINDOW_BYTES = 256, 16 * 2**10
PROMOTED_FILE = "promoted.json"
RERUN_ROUND = "round"
"""What a STALE record names as re-run when a whole earlier round ran again and changed its promotion."""
LOGGER_NAME = "kaizen.pipeline"
log = logging.getLogger(LOGGER_NAME)


class MissingInputError(RuntimeError):
    """A stage's input is not where an earlier stage (or its cached result) said it would be."""


@dataclass(frozen=True)
class Artifact:
    """A stage output: where it is and a digest of its content (the cache keys of later stages use it)."""

    path: str
    digest: str

    @classmethod
    def of(cls, path: str | Path) -> Artifact:
        return cls(str(path), content_digest(Path(path)))

    def require(self, what: str) -> Path:
        """The path, after checking it still exists (a cache hit can outlive a deleted file)."""
        path = Path(self.path)
        if not path.exists():
            raise MissingInputError(f"{what} {path} is missing; re-run the stage that writes it (kaizen stage)")
        return path


def artifacts_current(value: Any) -> bool:
    """Whether every Artifact in a stage's result (nested in lists, dicts, dataclasses) still has the
    content it was recorded with. A cached result is only as good as the files it points to, and
    stages write to fixed paths: a later run with other settings may have rewritten them."""
    if isinstance(value, Artifact):
        path = Path(value.path)
        return path.exists() and content_digest(path) == value.digest
    if isinstance(value, (list, tuple)):
        return all(artifacts_current(item) for item in value)
    if isinstance(value, dict):
        return all(artifacts_current(item) for item in value.values())
    if is_dataclass(value) and not isinstance(value, type):
        return all(artifacts_current(getattr(value, f.name)) for f in fields(value))
    return True


def content_digest(path: Path, *, large_by_mtime: bool = True) -> str:
    """SHA-256 over a file, or over a directory's relative paths, sizes and contents (large files
    sampled, see _CONTENT_HASH_LIMIT; hidden entries such as `.git` or a hub download's `.cache` left out)."""
    if not path.exists():
        raise MissingInputError(f"{path} does not exist")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0".encode())
        with file.open("rb") as handle:
            if stat.st_size > _CONTENT_HASH_LIMIT:
                if large_by_mtime:
                    digest.update(str(stat.st_mtime_ns).encode())
                step = (stat.st_size - _WINDOW_BYTES) // (_WINDOWS - 1)
                for window in range(_WINDOWS):
                    handle.seek(window * step)
                    digest.update(handle.read(_WINDOW_BYTES))
                continue
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ProblemPools:
    """The run's training pool and, for a curriculum, its held-out split."""

    train: Artifact
    test: Artifact | None = None


@dataclass(frozen=True)
class Mined:
    """The round's mined tables, their sizes, and how many problems the search solved per level."""

    pairs: Artifact
    sft: Artifact
    counts: dict[str, int] = field(default_factory=dict)
    solved_by_level: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    """An evaluation's files and its accuracies keyed `benchmark/mode`."""

    artifact: Artifact
    metrics: dict[str, float]
    summary: list[dict[str, Any]]


@dataclass(frozen=True)
class Current:
    """The promoted state a round starts from."""

    round: int
    policy: Artifact
    ppm: Artifact | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class RoundRecord:
    """What the `rounds` table keeps about one round."""

    round: int
    policy: Artifact
    ppm: Artifact | None
    metrics: dict[str, float]
    stats: dict[str, Any]
    gate_passed: bool
    gate_reasons: list[str]


class Pipeline:
    """The stages of one run (a recipe) under one data home."""

    def __init__(self, recipe: Recipe, layout: Layout) -> None:
        self.recipe = recipe
        self.layout = layout
        self.run = recipe.run

    # --- problems ---------------------------------------------------------------------------

    def prepare_problems(self) -> ProblemPools:
        """Write the run's problem pools (the curriculum's two splits, or the normalised source)."""
        problems = self.recipe.problems
        train_path = self.layout.problems_path(f"{self.run}-train")
        if problems.source == CURRICULUM:
            from data_store.curriculum import make_curriculum
            from data_store.problems import problems_table

            train, test = make_curriculum(
                problems.curriculum.train, problems.curriculum.test, seed=self.recipe.seed,
                **({"levels": tuple(problems.curriculum.levels)} if problems.curriculum.levels else {}),
            )
            # Pools are `problems` tables (the data store's view reads them), the level in metadata.
            pools = []
            for split, pool in (("train", train), ("test", test)):
                path = self.layout.problems_path(f"{self.run}-{split}")
                table = problems_table((problem.row() for problem in pool), source=path.stem)
                pools.append(Artifact.of(write_table(table, path, table="problems")))
            return ProblemPools(*pools)
        return ProblemPools(Artifact.of(write_table(self._source_problems(self.recipe.problems.limit), train_path,
                                                    table="problems")))

    def _source_problems(self, limit: int | None) -> Any:
        """The first `limit` problems of the recipe's source as a problems table; ProblemsError when it has none."""
        from data_store.problems import ProblemsError, load_problems

        problems = self.recipe.problems
        table = load_problems(problems.source.removeprefix("hf:"), fields=problems.fields or None,
                              split=problems.split, limit=limit)
        if table.num_rows == 0:
            raise ProblemsError(f"problems.source {problems.source!r} has no problems")
        return table

    def check_problems(self) -> None:
        """ProblemsError, in one line, for a problems file (or local `datasets` directory) that is missing,
        empty or whose first problem is malformed, before any stage runs. Only the first: the problems
        stage reads (and checks) the whole pool, once; reading it here would cost every command's start-up
        0.6 s per 12k problems (MATH's pool), tens of seconds for rStar-Math's 747k. A `datasets` name is left to the
        problems stage: looking it up may download it."""
        from data_store.problems import problems_file

        source = self.recipe.problems.source
        if source == CURRICULUM or source.startswith("hf:"):
            return
        if problems_file(source) is not None or Path(source).expanduser().is_dir():
            self._source_problems(limit=1)

    def select_problems(self, round_number: int, pool: Artifact, never_solved: Sequence[str] | None = None) -> Artifact:
        """This round's search problems: all of the pool, or a seeded sample of `per_round`, never-solved
        first (`never_solved`: the ids `never_solved(round_number)` gives, read here when not given)."""
        from data_store.problems import load_problems

        table = load_problems(pool.require("problem pool"))
        per_round = self.recipe.problems.per_round
        more_rollouts = self.recipe.search.unsolved_rollouts.get(round_number)
        sampled = per_round is not None and per_round < table.num_rows
        if sampled or more_rollouts:
            never_solved = set(self.never_solved(round_number) if never_solved is None else never_solved)
        if sampled:
            ids = table.column("problem_id").to_pylist()
            # A seeded shuffle before the stable sort: pools are often ordered (by level, subject or
            # source), and the first rows of one are a biased sample of it.
            order = list(range(len(ids)))
            random.Random(f"{self.recipe.seed}/{round_number}").shuffle(order)
            order.sort(key=lambda index: ids[index] not in never_solved)
            table = table.take(sorted(order[:per_round]))
        if more_rollouts:
            table = _with_search_rollouts(table, never_solved, more_rollouts)
        out = self.layout.table_path(self.run, round_number, "problems", stage="problems")
        return Artifact.of(write_table(table, out, table="problems"))

    def never_solved(self, round_number: int) -> list[str]:
        """The searched problems no round before `round_number` solved (sorted); empty when nothing depends
        on it: the rounds do not sample their problems (`problems.per_round` unset) and this round gives
        no problem more rollouts (`search.unsolved_rollouts`)."""
        if self.recipe.problems.per_round is None and round_number not in self.recipe.search.unsolved_rollouts:
            return []
        from data_store.views import connect, unsolved_problems

        with connect(self.layout.home) as con:
            return sorted(unsolved_problems(con, self.run, through_round=round_number - 1))

    # --- round 0 ----------------------------------------------------------------------------

    def base_model(self) -> str:
        """The base model's directory or hub name; a recipe's 'tiny' base is built once per shape and seed.

        The directory is named after what the model is built from, so a run whose recipe changes the
        tiny model's shape or the seed gets a new base instead of silently reusing the old one.
        """
        if self.recipe.model.base != TINY:
            return self.recipe.model.base
        from dataclasses import replace

        from models.tiny import build_tiny_model

        # What the model is built from: its shape, the seed, and (for its tokenizer's corpus) the problems' source.
        out = self.layout.checkpoint_dir(self.run, 0, f"base-{self.recipe.digest('model', 'problems.source', 'seed')[:12]}")
        if not out.exists():
            corpus = None
            if self.recipe.problems.source == CURRICULUM:
                from data_store.curriculum import curriculum_corpus

                corpus = curriculum_corpus(seed=self.recipe.seed)
            build_tiny_model(out, corpus=corpus, config=replace(self.recipe.model.tiny, seed=self.recipe.seed))
        return str(out)

    def bootstrap(self) -> Artifact:
        """Round 0's policy: the base model, or the base model fine-tuned on the teacher's solutions."""
        base = self.base_model()
        bootstrap = self.recipe.bootstrap
        if bootstrap.teacher is None:
            return Artifact.of(base) if Path(base).exists() else Artifact(base, base)
        import pyarrow as pa

        from data_store.curriculum import EASIEST_LEVEL, bootstrap_sft_rows, make_curriculum
        from models.training import train_sft

        # The teacher's problems come from their own seed stream, so they never coincide with the
        # pool's held-out split (which is decided by content hash anyway).
        teacher_problems, _ = make_curriculum(bootstrap.problems, 0, seed=self.recipe.seed + 1, levels=(EASIEST_LEVEL,))
        rows = [
            {**row, "run": self.run, "round": 0, "sft_format": "teacher", "rank": 1, "leaf_id": -1,
             "mean_q": 1.0, "min_q": 1.0}
            for row in bootstrap_sft_rows(teacher_problems, self.recipe.step_format)
        ]
        sft = write_table(pa.Table.from_pylist(rows), self.layout.table_path(self.run, 0, "sft"), table="sft")
        policy = train_sft([sft], self.layout.checkpoint_dir(self.run, 0, CHECKPOINT_OF["bootstrap"]), recipe=self.recipe.training,
                           base_model=base, overrides=bootstrap.training, overwrite=True)
        _log_training("bootstrap SFT", 0, policy)
        return Artifact.of(policy)

    def worked_examples_for(self, policy: Artifact) -> int:
        """How many worked examples `policy` is shown before every prompt: `bootstrap.worked_examples`
        while it is round 0's policy under teacher: null (the base model as is, which never saw the
        step format), none once a round's SFT taught it the format."""
        bootstrap = self.recipe.bootstrap
        if not bootstrap.worked_examples or bootstrap.teacher is not None:
            return 0
        return bootstrap.worked_examples if policy.path == self.base_model() else 0

    # --- search -----------------------------------------------------------------------------

    def shard_problems(self, problems: Artifact, shard: int) -> list[Any]:
        """The problems of one rollout shard: every `shards`-th row starting at `shard`."""
        from data_store.problems import load_problems
        from models.rollout import search_problems

        all_problems = search_problems(load_problems(problems.require("round problems")))
        return all_problems[shard:: self.recipe.search.shards]

    def rollout_config(self, round_number: int, ppm: Artifact | None, policy: Artifact) -> Any:
        """The round's rollout settings for `policy`; a PPM-augmented round without a PPM yet searches
        terminal-guided."""
        from dataclasses import replace

        from models.rollout import RolloutStageConfig
        from search.mcts import SearchMode

        mcts = self.recipe.search.mcts_for_round(round_number, self.recipe.seed)
        if mcts.uses_ppm and ppm is None:
            mcts = replace(mcts, mode=SearchMode.TERMINAL)
        return RolloutStageConfig(
            mcts=mcts, backend=self.recipe.backend, sandbox=self.recipe.sandbox,
            grader_workers=self.recipe.search.grader_workers, pipeline_groups=self.recipe.search.pipeline_groups,
            chunk_problems=self.recipe.search.chunk_problems, worked_examples=self.worked_examples_for(policy),
        )

    def search_ppm(self, round_number: int, ppm: Artifact | None) -> Artifact | None:
        """The PPM a round's search reads: none in terminal-guided rounds, so retraining an earlier
        round's PPM does not invalidate searches that never used it."""
        return ppm if self.recipe.search.mcts_for_round(round_number, self.recipe.seed).uses_ppm else None

    def rollout_shard(
        self, round_number: int, shard: int, problems: Artifact, policy: Artifact, ppm: Artifact | None,
        on_progress: Callable[[Any], None] | None = None,
    ) -> Artifact:
        """Search one shard of the round's problems with the current policy; writes its `nodes` file."""
        from models.rollout import rollout_stage

        config = self.rollout_config(round_number, ppm, policy)
        out = self.layout.table_path(self.run, round_number, "nodes", shard=shard)
        stats = rollout_stage(
            self.shard_problems(problems, shard), model=_model_path(policy, "policy"), out=out, config=config,
            ppm=ppm.require("PPM checkpoint") if config.mcts.uses_ppm and ppm else None,
            run=self.run, round_number=round_number, on_progress=on_progress,
        )
        log.info("round %d shard %d: %s search solved %d of %d problems; %d nodes, %d tokens at %.0f tokens/s",
                 round_number, shard, config.mcts.mode.value, stats.trees_solved, stats.trees, stats.nodes,
                 stats.tokens_generated, stats.tokens_per_second)
        return Artifact.of(out)

    def drop_stale_shards(self, round_number: int) -> None:
        """Delete the round's nodes files of shards beyond the recipe's count (left by an earlier attempt with
        more shards): the `nodes` view reads every file, and would count their trees as this round's."""
        from models.rollout import chunk_directory

        wanted = {self.layout.table_path(self.run, round_number, "nodes", shard=shard)
                  for shard in range(self.recipe.search.shards)}
        stage_dir = next(iter(wanted)).parent
        for path in stage_dir.glob("nodes-*.parquet"):
            if path not in wanted:
                log.info("round %d: removing %s, a shard this recipe no longer has", round_number, path.name)
                path.unlink()
        # Chunks saved by a shard that died, of a shard this recipe no longer has, would never be collected.
        wanted_chunks = {chunk_directory(shard) for shard in wanted}
        for path in stage_dir.glob(".nodes-*.chunks"):
            if path not in wanted_chunks:
                shutil.rmtree(path, ignore_errors=True)

    # --- mining and training ----------------------------------------------------------------

    def mine(self, round_number: int, nodes: Sequence[Artifact], problems: Artifact) -> Mined:
        """Pairs and SFT trajectories from this round's trees."""
        from data_store.mining import mine, write_mined
        from data_store.problems import load_problems

        problem_table = load_problems(problems.require("round problems"))
        result = mine([node.require("nodes shard") for node in nodes], problem_table, self.recipe.mining)
        pairs, sft = write_mined(result, self.layout.stage_dir(self.run, round_number, "mine"))
        log.info("round %d mining: %s", round_number, result.summary())
        status = result.problem_status
        counts = {
            "pairs": result.pairs.num_rows,
            "sft_examples": result.sft.num_rows,
            "trees": status.num_rows,
            "trees_solved": int(sum(status.column("solved").to_pylist())),
        }
        return Mined(Artifact.of(pairs), Artifact.of(sft), counts, solved_by_level(status, problem_table))

    def history(self, table: str, before_round: int) -> list[Artifact]:
        """The `table` files ("sft" or "pairs") of earlier rounds of this run, oldest first."""
        files = []
        for round_number in range(before_round):
            path = self.layout.table_path(self.run, round_number, table)
            if path.exists():
                files.append(Artifact.of(path))
        return files

    def sft_set(self, round_number: int, tables: Sequence[Artifact]) -> list[Path]:
        """The files the round's SFT reads: `tables` as they are, or mixed as `sft_data` says (a sample of
        round 0's teacher rows, copies of the verified rows) into one table in the round's sft stage."""
        paths = [table.require("sft table") for table in tables]
        settings = self.recipe.sft_data
        if not settings.mixes:
            return paths
        import random

        import pyarrow as pa
        import pyarrow.parquet as pq

        teacher = self.layout.table_path(self.run, 0, "sft").resolve()
        parts = []
        for path in paths:
            table = pq.read_table(path)
            if Path(path).resolve() == teacher:
                if settings.teacher_rows is not None and settings.teacher_rows < table.num_rows:
                    # Seeded by round, so each round rehearses different teacher rows, reproducibly.
                    sample = random.Random(f"{self.recipe.seed}:{round_number}").sample(range(table.num_rows), settings.teacher_rows)
                    table = table.take(sorted(sample))
                parts.append(table)
            else:
                parts += [table] * settings.verified_copies
        mixed = pa.concat_tables([conform(part, "sft") for part in parts])
        out = self.layout.table_path(self.run, round_number, "sft_mix", stage="sft")
        log.info("round %d SFT set: %d rows (%s teacher rows, verified rows x%d)", round_number, mixed.num_rows,
                 "all" if settings.teacher_rows is None else settings.teacher_rows, settings.verified_copies)
        return [write_table(mixed, out, table="sft")]

    def round_stages(self, round_number: int) -> tuple[str, ...]:
        """The stages round `round_number` runs, in order: round 0 bootstraps, later rounds search (the
        rl stage only when the recipe enables it)."""
        if round_number == 0:
            return BOOTSTRAP_ROUND_STAGES
        return tuple(stage for stage in SEARCH_ROUND_STAGES if stage != "rl" or self.recipe.rl.enabled)

    def continued_from(self, kind: str, previous: Artifact | None) -> Artifact | None:
        """`previous` when the recipe's `training.KIND.init_from` is `previous`, else None: a training
        stage's cache key then covers only the checkpoint it starts from."""
        return previous if self.recipe.training.for_kind(kind).get("init_from", "base") == "previous" else None

    def train_sft(self, round_number: int, tables: Sequence[Artifact], previous_policy: Artifact | None) -> Artifact:
        """The round's policy: SFT on the verified trajectories so far (`sft_set`), from the base model, or
        continued from `previous_policy` (given under `init_from: previous`: `continued_from`)."""
        from models.training import train_sft

        # Under init_from: previous a missing previous policy is an error, not a silent start from the base.
        checkpoint = train_sft(
            self.sft_set(round_number, tables), self.layout.checkpoint_dir(self.run, round_number, CHECKPOINT_OF["sft"]),
            recipe=self.recipe.training, base_model=self.base_model(),
            previous_checkpoint=_model_path(previous_policy, "previous policy") if previous_policy else None,
            overwrite=True,
        )
        _log_training("SFT", round_number, checkpoint)
        return Artifact.of(checkpoint)

    def train_rl(self, round_number: int, nodes: Sequence[Artifact], problems: Artifact, policy: Artifact) -> Artifact:
        """GRPO from this round's SFT policy on restart prompts cut from this round's trees."""
        from data_store.problems import load_problems
        from data_store.rl_prompts import restart_prompts, write_rl_prompts
        from models.training import train_rl

        table = restart_prompts([node.require("nodes shard") for node in nodes],
                                load_problems(problems.require("round problems")), self.recipe.rl.prompts)
        prompts = write_rl_prompts(table, self.layout.table_path(self.run, round_number, "rl_prompts", stage="rl"))
        # The reward runs completions in the recipe's sandbox unless training.rl names its own limits.
        sandbox = {} if "sandbox" in self.recipe.training.rl else {"sandbox": asdict(self.recipe.sandbox)}
        checkpoint = train_rl([prompts], self.layout.checkpoint_dir(self.run, round_number, CHECKPOINT_OF["rl"]),
                              recipe=self.recipe.training, base_model=str(policy.require("SFT policy")),
                              overrides=sandbox, overwrite=True)
        log.info("round %d RL: %d restart prompts -> %s", round_number, table.num_rows, checkpoint)
        return Artifact.of(checkpoint)

    def train_ppm(
        self, round_number: int, tables: Sequence[Artifact], policy: Artifact, previous_ppm: Artifact | None = None
    ) -> Artifact | None:
        """The round's PPM, started from this round's policy (or, under `init_from: previous`, from the last
        round's PPM); None when no round has produced pairs."""
        import pyarrow.parquet as pq

        from models.training import train_ppm

        paths = [table.require("pairs table") for table in tables]
        with_pairs = [path for path in paths if pq.read_metadata(path).num_rows]
        if not with_pairs:
            log.info("round %d: no preference pairs yet, so no PPM is trained", round_number)
            return None
        checkpoint = train_ppm(
            with_pairs, self.layout.checkpoint_dir(self.run, round_number, CHECKPOINT_OF["ppm"]),
            recipe=self.recipe.training, base_model=str(policy.require("policy checkpoint")),
            previous_checkpoint=previous_ppm.require("previous PPM") if previous_ppm else None, overwrite=True,
        )
        _log_training("PPM", round_number, checkpoint)
        return Artifact.of(checkpoint)

    def external_files(self, stage: str) -> list[Path]:
        """The files outside the home that `stage` reads, by name in the recipe: its results are only
        reusable while they are unchanged (a corrected benchmark answer must not keep an old score).
        A `datasets` name is not among them: its cache is the hub's."""
        sources: list[str] = []
        if stage == "problems" and self.recipe.problems.source != CURRICULUM:
            from data_store.problems import problems_file

            sources = [str(problems_file(self.recipe.problems.source) or self.recipe.problems.source)]
        elif stage in ("bootstrap", "sft", "ppm") and self.recipe.model.base != TINY:
            sources = [self.recipe.model.base]
        elif stage == "evaluate":
            from models.evaluation import benchmark_file

            sources = [str(path) for path in map(benchmark_file, self.benchmark_specs()) if path is not None]
        return [Path(source) for source in sources if Path(source).exists()]

    # --- evaluation, gate, promotion ---------------------------------------------------------

    def benchmark_specs(self) -> list[str]:
        """The recipe's benchmarks, with `curriculum-test` pointing at this run's held-out split."""
        specs = []
        for spec in self.recipe.eval.benchmarks:
            if spec == CURRICULUM_TEST:
                spec = f"{CURRICULUM_TEST}={self.layout.problems_path(f'{self.run}-test')}"
            specs.append(spec)
        return specs

    def evaluate(
        self, round_number: int, policy: Artifact, ppm: Artifact | None,
        on_progress: Callable[[Any], None] | None = None, label: str = "eval",
    ) -> Evaluation:
        """Evaluate the policy (and PPM) on the recipe's benchmarks and modes; writes the `eval` table
        under the round's `label` stage (`eval-sft` holds the policy before RL when a recipe has RL)."""
        from models.evaluation import EvalConfig, evaluate, load_benchmark, write_eval

        settings = self.recipe.eval
        # Without a PPM yet (round 0) its modes wait; greedy stands in when nothing else is left, and the
        # gate passes a round whose gate mode needs the PPM it does not have.
        modes = [mode for mode in settings.modes if ppm is not None or not _needs_ppm(mode)] or ["greedy"]
        config = EvalConfig(
            **{**settings.config, "modes": modes, "seed": self.recipe.seed, "backend": self.recipe.backend,
               "sandbox": self.recipe.sandbox, "worked_examples": self.worked_examples_for(policy)}
        )
        benchmarks = [load_benchmark(spec, limit=settings.limit) for spec in self.benchmark_specs()]
        report = evaluate(
            _model_path(policy, "policy"), benchmarks, config,
            ppm=ppm.require("PPM checkpoint") if ppm else None,
            run=self.run, round_number=round_number, on_progress=on_progress,
        )
        out = write_eval(report, self.layout.stage_dir(self.run, round_number, label))
        for row in report.summary:
            log.info("round %d %s %s %s: %.3f (%d/%d), %d tokens, %.0f s", round_number, label, row.benchmark,
                     row.mode, row.accuracy, row.correct, row.n, row.tokens, row.wall_s)
        return Evaluation(Artifact.of(out), report.metrics(), [asdict(row) for row in report.summary])

    def promotion(self, round_number: int) -> Current | None:
        """The promoted state of one round, or None when that round was not promoted."""
        path = self.layout.round_dir(self.run, round_number) / PROMOTED_FILE
        if not path.exists():
            return None
        data = _read_record(path)
        recorded_home = data.get("home")  # absent in records of earlier releases
        if recorded_home is not None and Path(recorded_home).resolve() != self.layout.home.resolve():
            # Records and cached results name files by absolute path: a moved home would read them
            # from the old place (a copy: the original's checkpoints) or call them missing.
            raise RunStateError(
                f"{path} was written in the home {recorded_home}, and this home ({self.layout.home}) is a move "
                f"or copy of it; a home's records and cache keys name its files by absolute path: mount it at "
                f"{recorded_home}, or start a new home")
        try:
            return Current(
                round=data["round"], policy=Artifact(**data["policy"]),
                ppm=Artifact(**data["ppm"]) if data.get("ppm") else None, metrics=data.get("metrics", {}),
            )
        except (KeyError, TypeError) as err:
            raise RunStateError(f"{path} is not a promotion record ({type(err).__name__}: {err})") from None

    def current(self) -> Current | None:
        """The latest promoted round (the checkpoints in use), or None before round 0 is promoted."""
        run_dir = self.layout.run_dir(self.run)
        promoted = sorted(run_dir.glob(f"round-*/{PROMOTED_FILE}")) if run_dir.exists() else []
        return self.promotion(int(promoted[-1].parent.name.removeprefix("round-"))) if promoted else None

    def mark_stale(self, round_number: int, rerun: str, stale: Sequence[str]) -> None:
        """Record that `rerun` was re-run in a finished round, so `stale` stages (and its gate) must run
        again, and so must every later round: each was built on this round's old outputs."""
        write_json(self.layout.stale_marker(self.run, round_number), {"rerun": rerun, "stale": list(stale)})
        self._mark_later_rounds_stale(round_number, rerun)

    def mark_rerunning(self, round_number: int) -> None:
        """Before a promoted round runs again: its stages rewrite the checkpoints its promotion names, so
        until its gate judges them (`promote` clears this) no later round may start from it, even if
        the run dies half-way."""
        if self.promotion(round_number) is not None and self.stale_since(round_number) is None:
            write_json(self.layout.stale_marker(self.run, round_number),
                       {"rerun": RERUN_ROUND, "stale": ["all"], "in_round": round_number})

    def _mark_later_rounds_stale(self, round_number: int, rerun: str) -> None:
        later = round_number + 1
        while self.layout.round_dir(self.run, later).is_dir():
            write_json(self.layout.stale_marker(self.run, later),
                       {"rerun": rerun, "stale": ["all"], "in_round": round_number})
            later += 1

    def stale_since(self, round_number: int) -> str | None:
        """Why a round's promotion is out of date (a stage re-run since its gate, in it or in a round it
        builds on), or None when it is up to date."""
        path = self.layout.stale_marker(self.run, round_number)
        if not path.exists():
            return None
        record = _read_record(path)
        if record.get("in_round") == round_number:
            return "it was run again and has not reached its gate since"
        if record.get("in_round") is None:
            return f"its {record['rerun']} stage was re-run after its gate"
        if record["rerun"] == RERUN_ROUND:
            return f"round {record['in_round']}, which it builds on, was run again and its promotion changed"
        return f"the {record['rerun']} stage of round {record['in_round']}, which it builds on, was re-run"

    def starting_point(self, round_number: int) -> Current:
        """What round `round_number` (>= 1) starts from: round `round_number - 1`, promoted and up to date."""
        why = self.stale_since(round_number - 1)
        if why is not None:
            raise MissingInputError(
                f"round {round_number - 1} of run {self.run!r} is stale: {why}; run round {round_number - 1} "
                f"again (kaizen round) so its stages and gate see the new output"
            )
        start = self.promotion(round_number - 1)
        if start is None:
            current = self.current()
            state = "no round is promoted yet" if current is None else f"the latest promoted round is {current.round}"
            raise MissingInputError(
                f"round {round_number} of run {self.run!r} starts from round {round_number - 1}, which is not "
                f"promoted ({state}); run round {self.next_round()} first"
            )
        return start

    def next_round(self) -> int:
        """The round to run next: the earliest round up to the latest promoted one that is stale or not
        promoted (a re-run that failed its gate), else the one after the latest promoted round."""
        current = self.current()
        if current is None:
            return 0
        for number in range(current.round + 1):
            if self.stale_since(number) or self.promotion(number) is None:
                return number
        return current.round + 1

    def record_round(self, record: RoundRecord, started_at: datetime, *, replayed: bool = False) -> Artifact:
        """Write the round's row of the `rounds` table. A `replayed` round (every stage taken from the
        cache) keeps the start, finish and wall time of the row it replaces, if there is one."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = self.layout.table_path(self.run, record.round, "rounds")
        finished_at, stats = datetime.now(timezone.utc), record.stats
        if replayed and out.exists():
            earlier = pq.read_table(out).to_pylist()[0]
            started_at, finished_at = earlier["started_at"], earlier["finished_at"]
            stats = {**stats, "wall_s": json.loads(earlier["metrics"]).get("wall_s", stats.get("wall_s"))}
        row = {
            "run": self.run, "round": record.round, "started_at": started_at,
            "finished_at": finished_at, "policy_checkpoint": record.policy.path,
            "ppm_checkpoint": record.ppm.path if record.ppm else None,
            "metrics": json.dumps({"eval": record.metrics, **stats}, sort_keys=True),
            "gate_passed": record.gate_passed, "gate_reason": "; ".join(record.gate_reasons),
        }
        return Artifact.of(write_table(pa.Table.from_pylist([row]), out, table="rounds"))

    def promote(self, record: RoundRecord) -> Artifact | None:
        """After a passed gate, make the round's checkpoints current; after a failed one, withdraw them.
        Either way the round is judged on its current outputs, so it is no longer stale: the marker goes
        last, so a crash before the promotion is written or withdrawn leaves the round stale, never an old
        promotion pointing at checkpoints this run has overwritten."""
        path = self.layout.round_dir(self.run, record.round) / PROMOTED_FILE
        before = self.promotion(record.round)
        after = (record.policy, record.ppm) if record.gate_passed else None
        if (before and (before.policy, before.ppm)) != after:
            # Later rounds were built on the checkpoints this round had: a round run again (other
            # settings, another seed) that now promotes others, or none, leaves them out of date.
            self._mark_later_rounds_stale(record.round, RERUN_ROUND)
        promoted = None
        if record.gate_passed:
            promoted = Artifact.of(write_json(path, {
                "round": record.round, "home": str(self.layout.home), "policy": asdict(record.policy),
                "ppm": asdict(record.ppm) if record.ppm else None, "metrics": record.metrics,
                "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }, indent=2))
        else:
            path.unlink(missing_ok=True)  # a re-run that now fails its gate must not stay current
        self.layout.stale_marker(self.run, record.round).unlink(missing_ok=True)
        return promoted



def _log_training(kind: str, round_number: int, checkpoint: Path) -> None:
    """One line from the run's provenance: loss, tokens and speed (the full curves are in TensorBoard)."""
    from models.training import PROVENANCE_FILE

    metrics = json.loads((Path(checkpoint) / PROVENANCE_FILE).read_text(encoding="utf-8")).get("metrics", {})
    # A value may be null: no steady-state throughput in a run of a few steps.
    figure = {name: metrics.get(name) if metrics.get(name) is not None else float("nan")
              for name in ("train_loss", "num_input_tokens_seen", "train_runtime", "tokens_per_second")}
    log.info("round %d %s: train loss %.4f over %.0f tokens in %.0f s (%.0f tokens/s) -> %s", round_number, kind,
             figure["train_loss"], figure["num_input_tokens_seen"], figure["train_runtime"],
             figure["tokens_per_second"], checkpoint)


def _with_search_rollouts(table: Any, problem_ids: Collection[str], rollouts: int) -> Any:
    """The problems table with `rollouts` set as the search budget (models.rollout.SEARCH_ROLLOUTS in
    metadata) of the problems in `problem_ids`."""
    import pyarrow as pa

    from models.rollout import SEARCH_ROLLOUTS

    metadata = [
        json.dumps({**json.loads(text or "{}"), SEARCH_ROLLOUTS: rollouts}) if problem_id in problem_ids else text
        for problem_id, text in zip(table.column("problem_id").to_pylist(), table.column("metadata").to_pylist(),
                                    strict=True)
    ]
    return table.set_column(table.schema.get_field_index("metadata"), "metadata", pa.array(metadata, pa.string()))


class RunStateError(ValueError):
    """A run's bookkeeping file (a round's promoted.json or STALE marker) cannot be read."""


def _read_record(path: Path) -> dict[str, Any]:
    """A bookkeeping file's JSON object; RunStateError naming the file when it is unreadable or not one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunStateError(f"cannot read {path}: {err}") from None
    if not isinstance(record, dict):
        raise RunStateError(f"cannot read {path}: not a JSON object")
    return record


def solved_by_level(status: Any, problems: Any) -> dict[str, list[int]]:
    """{level: [solved, searched]} from mining's per-tree status; problems without a level count as 'all'."""
    levels = {}
    for problem_id, metadata in zip(problems.column("problem_id").to_pylist(), problems.column("metadata").to_pylist()):
        level = json.loads(metadata).get("level") if metadata else None
        levels[problem_id] = "all" if level is None else str(level)
    rates: dict[str, list[int]] = {}
    for problem_id, solved in zip(status.column("problem_id").to_pylist(), status.column("solved").to_pylist()):
        counts = rates.setdefault(levels.get(problem_id, "all"), [0, 0])
        counts[0] += int(bool(solved))
        counts[1] += 1
    return dict(sorted(rates.items()))


def _needs_ppm(mode: str) -> bool:
    return mode.startswith("ppm@") or mode == "mcts"


def _model_path(artifact: Artifact, what: str) -> str:
    """A local checkpoint must still exist; a hub name (no such path) is passed through."""
    path = Path(artifact.path)
    if artifact.digest == artifact.path:  # a hub name recorded as its own digest by `bootstrap`
        return artifact.path
    return str(artifact.require(what)) if path.is_absolute() or path.exists() else artifact.path

