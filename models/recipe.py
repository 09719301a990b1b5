"""Recipes: one YAML file per experiment, read into typed sections and checked before anything runs.

A recipe names everything a self-evolution run needs: the base model, the problem pool, the
bootstrap round, the search, generation engine, sandbox, mining, training, evaluation, gate,
schedule and execution settings. Each section is a dataclass whose fields carry help strings;
the sections that configure an existing component are that component's own config class
(`MCTSConfig`, `BackendConfig`, `SandboxConfig`, `MiningConfig`, the TRL-derived training
configs, `GateRule`), so a recipe key is exactly a field name there. Unknown keys, wrong types
and impossible values are rejected with the dotted name of the field (`search.mcts.widht:
unknown key (did you mean 'width'?)`), the same at deploy time and at run time.

One top-level switch, `step_format` (rstar, or Satori's chain-of-action-thought `coat`), is carried
into every section that has a step format of its own (the search, mining's SFT format, the SFT, PPM
and RL training configs, the RL prompts, evaluation) when the recipe is loaded; a section that
names another format is rejected, so every stage of a loaded recipe writes and reads one format.

Each stage's cache key includes the digest of the sections it reads (`Recipe.digest`), so editing
the gate re-runs the gate and nothing upstream of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_store.mining import MiningConfig
from data_store.rl_prompts import RestartConfig
from models.backends import BackendConfig
from models.gate import GateRule
from models.rl import RLSettingsError, check_rl_settings
from models.tiny import TinyModelConfig
from models.training import KINDS, TrainingError, TrainingSettings, load_training_config
from search.arguments import OneLineParser
from search.evaluation import parse_mode
from search.mcts import MCTSConfig, SearchMode
from search.sandbox import SandboxConfig
from search.steps import StepFormat, check_worked_examples

RECIPES_DIR = Path(__file__).resolve().parents[1] / "deployments" / "recipes"
CURRICULUM = "curriculum"
TINY = "tiny"
CURRICULUM_TEST = "curriculum-test"


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the file and the field."""


@dataclass
class ModelSettings:
    """The policy the run starts from."""

    base: str = field(
        default="",
        metadata={"help": "base model: a Hugging Face directory, a hub name, or 'tiny' (built locally from "
                  "the problem pool's text, for CPU runs and tests)", "required": True},
    )
    tiny: TinyModelConfig = field(
        default_factory=TinyModelConfig,
        metadata={"help": "with base 'tiny': models.tiny.TinyModelConfig fields (its seed is the recipe's)"},
    )


@dataclass
class CurriculumSettings:
    """The synthetic curriculum (data_store.curriculum) as a problem pool."""

    train: int = field(default=120, metadata={"help": "training problems (all levels)"})
    test: int = field(default=60, metadata={"help": "held-out problems: evaluated as benchmark 'curriculum-test', never trained on"})
    levels: list[int] | None = field(default=None, metadata={"help": "difficulty levels drawn; None: all"})


@dataclass
class ProblemSettings:
    """Where the training problems come from and how many each round searches."""

    source: str = field(
        default="",
        metadata={"help": "'curriculum', a JSONL/Parquet file with id, problem, answer, or 'hf:DATASET[:CONFIG]' "
                  "(a datasets name)", "required": True},
    )
    split: str = field(default="train", metadata={"help": "with an hf: source, the datasets split"})
    fields: dict[str, str] = field(
        default_factory=dict, metadata={"help": "column mapping for files and datasets, e.g. {problem: question}"}
    )
    limit: int | None = field(default=None, metadata={"help": "use only the first N problems of the source"})
    per_round: int | None = field(
        default=None,
        metadata={"help": "problems searched per round: a seeded sample, never-solved ones first; None: every problem every round"},
    )
    curriculum: CurriculumSettings = field(
        default_factory=CurriculumSettings, metadata={"help": "with source 'curriculum': its sizes"}
    )


@dataclass
class BootstrapSettings:
    """Round 0: what the policy is before any search (rStar-Math: a large teacher's solutions)."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "'curriculum': fine-tune the base model on the curriculum's programmatic solutions of "
                  "its easiest level; None: round 0's policy is the base model as is"},
    )
    problems: int = field(default=300, metadata={"help": "teacher solutions written for round 0"})
    training: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "training.sft fields that differ in round 0 (a random tiny model needs more epochs)"},
    )
    worked_examples: int = field(
        default=0,
        metadata={"help": "under teacher: null, worked examples in the step format (search.steps.WORKED_EXAMPLES) "
                  "shown before every prompt while round 0's policy, the base model as is, generates: its "
                  "evaluation and the searches it runs (rStar-Math prompted its round-1 teacher few-shot)"},
    )


@dataclass
class SFTDataSettings:
    """What each search round's policy SFT reads: rStar-Math's rule is every verified trajectory so far."""

    teacher_rows: int | None = field(
        default=None,
        metadata={"help": "round 0's (the teacher's) rows in each later round's SFT set, a fresh seeded sample "
                  "per round so later rounds still rehearse them; None: every row every round"},
    )
    verified_copies: int = field(
        default=1,
        metadata={"help": "times each search-verified trajectory appears in a round's SFT set: above 1 weights "
                  "the policy's own verified solutions against a large teacher set"},
    )

    def __post_init__(self) -> None:
        if self.teacher_rows is not None and self.teacher_rows < 0:
            raise ValueError(f"teacher_rows must be >= 0 or null, got {self.teacher_rows}")
        if self.verified_copies < 1:
            raise ValueError(f"verified_copies must be >= 1, got {self.verified_copies}")

    @property
    def mixes(self) -> bool:
        """Whether the SFT set differs from the plain union of every round's table."""
        return self.teacher_rows is not None or self.verified_copies > 1


@dataclass
class SearchSettings:
    """The rollout stage: MCTS settings, when the PPM joins, and how the work is split."""

    mcts: MCTSConfig = field(
        default_factory=MCTSConfig, metadata={"help": "search.mcts.MCTSConfig fields (mode and seed are set per round)"}
    )
    ppm_from_round: int | None = field(
        default=3, metadata={"help": "first round whose search is PPM-augmented (rStar-Math: 3); None: never"}
    )
    round_overrides: dict[int, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "MCTSConfig fields for specific rounds, e.g. {1: {rollouts: 8, width: 5}}"},
    )
    unsolved_rollouts: dict[int, int] = field(
        default_factory=dict,
        metadata={"help": "rollouts per problem, by round, for the round's problems that no earlier round solved, "
                  "e.g. {4: 64} (rStar-Math: 64 or 128 in round 4); the others keep the round's count"},
    )
    shards: int = field(default=1, metadata={"help": "rollout shards per round (each its own task; Ray can spread them)"})
    pipeline_groups: int = field(
        default=2, metadata={"help": "tree groups that take turns so code execution overlaps generation"}
    )
    grader_workers: int = field(default=2, metadata={"help": "grader worker processes"})
    chunk_problems: int | None = field(
        default=None,
        metadata={"help": "problems a shard searches together and saves as one chunk; a shard that dies resumes "
                  "after its last saved chunk (models.rollout). None: the whole shard at once"},
    )

    def mcts_for_round(self, round_number: int, seed: int) -> MCTSConfig:
        """The MCTS settings of one round: overrides applied, mode from ppm_from_round, a per-round seed."""
        values = {f.name: getattr(self.mcts, f.name) for f in dataclasses.fields(MCTSConfig)}
        values.update(self.round_overrides.get(round_number, {}))
        uses_ppm = self.ppm_from_round is not None and round_number >= self.ppm_from_round
        values["mode"] = SearchMode.PPM if uses_ppm else SearchMode.TERMINAL
        values["seed"] = seed + round_number
        return MCTSConfig(**values)


@dataclass
class RLSettings:
    """The optional RL stage (ASTRO, Satori): GRPO on verifiable rewards after SFT, before the PPM."""

    enabled: bool = field(default=False, metadata={"help": "run the rl stage each search round (training.rl configures GRPO)"})
    prompts: RestartConfig = field(
        default_factory=RestartConfig,
        metadata={"help": "data_store.rl_prompts.RestartConfig: restart-and-explore prompts from the round's trees"},
    )


@dataclass
class EvalSettings:
    """The evaluation that ends every round (and `kaizen evaluate`)."""

    benchmarks: list[str] = field(
        default_factory=lambda: ["math500"],
        metadata={"help": "benchmark specs: a known name (math500, gsm8k, aime24, amc23, curriculum-test), "
                  "NAME=PATH, or NAME=hf:DATASET[:SPLIT]"},
    )
    modes: list[str] = field(default_factory=lambda: ["greedy"], metadata={"help": "greedy, maj@K, ppm@K, mcts"})
    limit: int | None = field(default=None, metadata={"help": "first N problems of each benchmark (quick runs)"})
    config: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "models.evaluation.EvalConfig fields (temperature, max_step_tokens, ...)"}
    )


@dataclass
class ScheduleSettings:
    """When the nightly deployment starts the next round."""

    cron: str | None = field(
        default=None,
        metadata={"help": "cron expression in UTC, e.g. '0 2 * * *' (deployments/prefect.yaml reads it); None: no schedule"},
    )


@dataclass
class ExecutionSettings:
    """Where the tasks run."""

    task_runner: str = field(
        default="thread",
        metadata={"help": "'thread' (one machine) or 'ray' (rollout shards as Ray tasks via prefect-ray)",
                  "choices": ["thread", "ray"]},
    )
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address; None: start a local Ray"})
    ray_gpus_per_shard: float = field(
        default=0.0,
        metadata={"help": "GPUs Ray reserves for each rollout shard, whose vLLM server and PPM then see only "
                  "those; 0: none reserved, and every shard sees (and its server starts on) the first GPU"},
    )

    def __post_init__(self) -> None:
        if self.ray_gpus_per_shard < 0:
            raise ValueError(f"ray_gpus_per_shard must be >= 0, got {self.ray_gpus_per_shard}")


@dataclass
class Recipe:
    """A whole experiment. `run` names its directory under the data home."""

    run: str = field(default="", metadata={"help": "run name (a directory under {home}/runs)", "required": True})
    seed: int = field(default=0, metadata={"help": "seed of the problem pool, the tiny model and every round's search"})
    step_format: StepFormat = field(
        default=StepFormat.RSTAR,
        metadata={"help": "rstar (code-augmented steps) or coat (Satori's chain-of-action-thought: every step opens "
                  "with <|continue|>, <|reflect|> or <|explore|>); set here once, it reaches the bootstrap, search, "
                  "mining (sft_format coat), training and evaluation, whose own format fields may only repeat it"},
    )
    model: ModelSettings = field(default_factory=ModelSettings, metadata={"help": "the starting policy"})
    problems: ProblemSettings = field(default_factory=ProblemSettings, metadata={"help": "training problems"})
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings, metadata={"help": "round 0"})
    sft_data: SFTDataSettings = field(default_factory=SFTDataSettings, metadata={"help": "each round's policy SFT set"})
    search: SearchSettings = field(default_factory=SearchSettings, metadata={"help": "rollouts"})
    backend: BackendConfig = field(default_factory=BackendConfig, metadata={"help": "generation engine"})
    sandbox: SandboxConfig = field(default_factory=SandboxConfig, metadata={"help": "code sandbox limits"})
    mining: MiningConfig = field(default_factory=MiningConfig, metadata={"help": "pairs and SFT mining"})
    training: TrainingSettings = field(default_factory=TrainingSettings, metadata={"help": "SFT, PPM and RL training"})
    rl: RLSettings = field(default_factory=RLSettings, metadata={"help": "the optional RL stage"})
    eval: EvalSettings = field(default_factory=EvalSettings, metadata={"help": "end-of-round evaluation"})
    gate: GateRule | None = field(
        default=None, metadata={"help": "what evaluation must show to promote a round", "required": True}
    )
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings, metadata={"help": "nightly rounds"})
    execution: ExecutionSettings = field(default_factory=ExecutionSettings, metadata={"help": "task runner"})
    source: str = field(default="", metadata={"help": "the file this recipe was read from (set by load_recipe)"})

    def digest(self, *sections: str, leave_out: Sequence[str] = ()) -> str:
        """SHA-256 of the named sections' values (all sections when none are named), for cache keys;
        `leave_out` names dotted fields inside them that do not count."""
        names = sections or tuple(f.name for f in dataclasses.fields(self) if f.name != "source")
        payload = {name: _plain(self._section(name)) for name in names}
        for dotted in leave_out:
            for name in names:
                if not dotted.startswith(f"{name}."):
                    continue
                *parents, last = dotted[len(name) + 1:].split(".")
                holder: Any = payload[name]
                for part in parents:
                    holder = holder.get(part) if isinstance(holder, dict) else None
                if isinstance(holder, dict):
                    holder.pop(last, None)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def _section(self, dotted: str) -> Any:
        """A section (`training`) or a part of one (`training.sft`)."""
        value: Any = self
        for part in dotted.split("."):
            value = value[part] if isinstance(value, Mapping) else getattr(value, part)
        return value

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "source"}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --- reading -----------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar(where: str, hint: Any, value: Any) -> Any:
    """Check or coerce one YAML value against a field's type (YAML reads 7e-6 as a string)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _scalar(where, option, value)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{where}: {value!r} is not allowed")
    if hint is Any:
        return value
    if origin in (list, Sequence):
        (item_hint,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_scalar(f"{where}[{index}]", item_hint, item) for index, item in enumerate(value)]
    if origin in (dict, Mapping):
        key_hint, item_hint = typing.get_args(hint) or (Any, Any)
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {_scalar(f"{where} key", key_hint, key): _scalar(f"{where}.{key}", item_hint, item)
                for key, item in value.items()}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise RecipeError(f"{where}: {value!r} is not one of {', '.join(m.value for m in hint)}") from None
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise RecipeError(f"{where}: expected an integer, got {value!r}")  # int() would truncate it
        if isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                raise RecipeError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected {'an integer' if hint is int else 'a number'}, got {value!r}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _unwrap_optional(hint: Any) -> Any:
    """`X | None` as X when X is a dataclass (a section that has no defaults of its own)."""
    options = [o for o in typing.get_args(hint) if o is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
        if dataclasses.is_dataclass(options[0]):
            return options[0]
    return hint


def build_section(cls: type, values: Any, where: str) -> Any:
    """An instance of the dataclass `cls` from a YAML mapping; RecipeError names any bad field."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {values!r}")
    spec = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in values if key not in spec]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(spec), n=1)
        raise RecipeError(f"{where}.{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
    hints = _type_hints(cls)
    arguments = {}
    for name, config_field in spec.items():
        if name not in values:
            if config_field.metadata.get("required"):
                raise RecipeError(f"{where}.{name}: required ({config_field.metadata.get('help', '')})")
            continue
        hint, value = _unwrap_optional(hints[name]), values[name]
        if dataclasses.is_dataclass(hint):
            arguments[name] = build_section(hint, value, f"{where}.{name}")
            continue
        value = _scalar(f"{where}.{name}", hint, value)
        choices = config_field.metadata.get("choices")
        if choices and value not in choices:
            raise RecipeError(f"{where}.{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        arguments[name] = value
    try:
        return cls(**arguments)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from None


# Sections built by their owners' loaders rather than field by field.
_SPECIAL_SECTIONS = {"training", "source"}
_FIXED_PER_ROUND = ("mode", "seed")


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """A checked Recipe from a parsed YAML document."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections")
    plain = {key: value for key, value in data.items() if key not in _SPECIAL_SECTIONS}
    if "source" in data:
        raise RecipeError(f"{source}: 'source' is set by the loader, not the recipe")
    try:
        training = load_training_config({"training": data.get("training") or {}})
    except TrainingError as err:
        raise RecipeError(f"{source}: {err}") from None
    try:
        recipe = build_section(Recipe, plain, "recipe")
    except RecipeError as err:
        raise RecipeError(f"{source}: {str(err).removeprefix('recipe.')}") from None
    recipe.training = training
    recipe.source = source
    _check(recipe, data, source)
    _thread_step_format(recipe, data, source)
    return recipe


def _check(recipe: Recipe, data: Mapping[str, Any], source: str) -> None:
    """Rules that span fields or need another component's knowledge."""
    from data_store.home import HomeError, check_name
    from data_store.problems import ProblemsError, check_field_mapping

    def fail(where: str, message: str) -> None:
        raise RecipeError(f"{source}: {where}: {message}")

    try:
        check_name(recipe.run, "run")
    except HomeError as err:
        fail("run", str(err))
    mcts = (data.get("search") or {}).get("mcts") or {}
    for key in _FIXED_PER_ROUND:
        if key in mcts:
            fail(f"search.mcts.{key}", "set per round (mode from search.ppm_from_round, seed from the recipe seed)")
    for round_number, overrides in recipe.search.round_overrides.items():
        where = f"search.round_overrides.{round_number}"
        if any(key in overrides for key in _FIXED_PER_ROUND):
            fail(where, "mode and seed are set per round")
        try:
            built = build_section(MCTSConfig, dict(overrides), where)
        except RecipeError as err:
            fail(where, str(err).removeprefix(f"{where}: ").removeprefix(f"{where}."))
        # The checked values, converted as the section's were ("1e-1" read as text becomes 0.1).
        recipe.search.round_overrides[round_number] = {name: getattr(built, name) for name in overrides}
    for round_number, rollouts in recipe.search.unsolved_rollouts.items():
        if round_number < 1:
            fail("search.unsolved_rollouts", f"rounds are numbers from 1 (round 0 does not search), got {round_number!r}")
        if rollouts < 1:
            fail(f"search.unsolved_rollouts.{round_number}", f"must be >= 1, got {rollouts}")
    for where, count in (("search.shards", recipe.search.shards), ("search.chunk_problems", recipe.search.chunk_problems),
                         ("problems.per_round", recipe.problems.per_round),
                         ("problems.limit", recipe.problems.limit), ("eval.limit", recipe.eval.limit),
                         *((f"problems.curriculum.{name}", getattr(recipe.problems.curriculum, name))
                           for name in ("train", "test") if recipe.problems.source == CURRICULUM),
                         *((("bootstrap.problems", recipe.bootstrap.problems),) if recipe.bootstrap.teacher else ())):
        if count is not None and count < 1:
            fail(where, f"must be >= 1, got {count}")
    try:
        check_field_mapping(recipe.problems.fields)
    except ProblemsError as err:
        fail("problems.fields", str(err))
    if recipe.problems.source == "" or recipe.model.base == "":
        fail("problems.source" if not recipe.problems.source else "model.base", "required")
    if recipe.bootstrap.teacher not in (None, CURRICULUM):
        fail("bootstrap.teacher", f"{recipe.bootstrap.teacher!r} is not a known teacher (only 'curriculum')")
    if recipe.bootstrap.teacher == CURRICULUM and recipe.problems.source != CURRICULUM:
        fail("bootstrap.teacher", "the curriculum teacher needs problems.source: curriculum")
    if recipe.bootstrap.worked_examples:
        if recipe.bootstrap.teacher is not None:
            fail("bootstrap.worked_examples", "only for a base model used as is (teacher: null); a teacher's "
                 "fine-tuning teaches the format")
        try:
            check_worked_examples(recipe.bootstrap.worked_examples, recipe.step_format.value)
        except ValueError as err:
            fail("bootstrap.worked_examples", str(err))
    # Training fields the pipeline sets itself: in a recipe they would be silently replaced.
    set_by_pipeline = {"base_model": "model.base (the PPM and RL start from the round's policy)",
                       "train_tables": "the round's mined tables", "output_dir": "the round's checkpoint directory"}
    for where, config in [*((f"training.{kind}", recipe.training.for_kind(kind)) for kind in KINDS),
                          ("bootstrap.training", recipe.bootstrap.training)]:
        for name, origin in set_by_pipeline.items():
            if name in config:
                fail(f"{where}.{name}", f"the pipeline sets it from {origin}; leave it out")
    if recipe.training.for_kind("rl").get("init_from", "base") != "base":
        fail("training.rl.init_from", "the rl stage always starts from the round's SFT policy; leave it out")
    if recipe.bootstrap.training:
        try:
            load_training_config({"training": {"sft": recipe.bootstrap.training}})
        except TrainingError as err:
            fail("bootstrap.training", str(err))
    if "seed" in ((data.get("model") or {}).get("tiny") or {}):
        fail("model.tiny.seed", "the tiny model's seed is the recipe's seed")
    # EvalConfig fields a round's evaluation takes from elsewhere in the recipe: set here they would be ignored.
    for name, where in (("seed", "the recipe's seed"), ("backend", "the backend section"),
                        ("sandbox", "the sandbox section"), ("modes", "eval.modes"),
                        ("worked_examples", "bootstrap.worked_examples (shown to round 0's base model only)")):
        if name in recipe.eval.config:
            fail(f"eval.config.{name}", f"a round's evaluation takes it from {where}; set it there")
    from models.evaluation import check_eval_settings

    try:
        check_eval_settings(recipe.eval.benchmarks, recipe.eval.modes, recipe.eval.config,
                            extra_names={CURRICULUM_TEST})
    except ValueError as err:
        fail("eval", str(err))
    if recipe.gate.benchmark not in _benchmark_names(recipe.eval.benchmarks):
        fail("gate.benchmark", f"{recipe.gate.benchmark!r} is not among eval.benchmarks")
    if recipe.gate.mode not in {parse_mode(mode).name for mode in recipe.eval.modes}:
        fail("gate.mode", f"{recipe.gate.mode!r} is not among eval.modes")
    if recipe.schedule.cron is not None:
        _check_cron(recipe.schedule, fail)
    if recipe.rl.enabled:
        try:
            check_rl_settings(recipe.training.rl, [])
        except RLSettingsError as err:
            fail("training.rl", str(err))


_UNSET = object()


def _given(data: Any, *keys: Any) -> Any:
    """The value a recipe file sets at a dotted place, or _UNSET when it leaves it to the defaults."""
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return _UNSET
        data = data[key]
    return data


def _thread_step_format(recipe: Recipe, data: Mapping[str, Any], source: str) -> None:
    """Carry the recipe's step format into every section with one; a section naming another one fails."""
    step_format = recipe.step_format.value
    given = {
        "search.mcts.step_format": _given(data, "search", "mcts", "step_format"),
        "rl.prompts.step_format": _given(data, "rl", "prompts", "step_format"),
        "eval.config.step_format": recipe.eval.config.get("step_format", _UNSET),
        "bootstrap.training.step_format": recipe.bootstrap.training.get("step_format", _UNSET),
        **{f"training.{kind}.step_format": recipe.training.for_kind(kind).get("step_format", _UNSET) for kind in KINDS},
        **{f"search.round_overrides.{number}.step_format": overrides.get("step_format", _UNSET)
           for number, overrides in recipe.search.round_overrides.items()},
    }
    for where, value in given.items():
        if value is not _UNSET and str(value) != step_format:
            raise RecipeError(f"{source}: {where}: {str(value)!r} contradicts the recipe's step_format {step_format!r} "
                              "(leave it out: the top-level step_format sets it)")
    sft_format = _given(data, "mining", "sft_format")
    if sft_format is not _UNSET and (sft_format == StepFormat.COAT) != (step_format == StepFormat.COAT):
        raise RecipeError(f"{source}: mining.sft_format: {sft_format!r} contradicts the recipe's step_format "
                          f"{step_format!r} (coat recipes, and only they, mine coat format-tuning rows)")
    recipe.search.mcts.step_format = recipe.step_format
    if step_format == StepFormat.COAT:
        recipe.mining = dataclasses.replace(recipe.mining, sft_format=step_format)
    recipe.rl.prompts = dataclasses.replace(recipe.rl.prompts, step_format=step_format)
    recipe.eval.config = {**recipe.eval.config, "step_format": step_format}
    recipe.training = TrainingSettings(
        **{kind: {**recipe.training.for_kind(kind), "step_format": step_format} for kind in KINDS}
    )


def _benchmark_names(specs: Sequence[str]) -> list[str]:
    return [spec.split("=", 1)[0] for spec in specs]


# minute, hour, day of month, month, day of week (0 and 7 are Sunday); names as cron accepts them.
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_NAMES = (
    (), (), (), ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    ("sun", "mon", "tue", "wed", "thu", "fri", "sat"),
)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CRON_ITEM = re.compile(r"(?P<range>\*|(?P<low>\w+)(?:-(?P<high>\w+))?)(?:/(?P<step>\d+))?")
# The shorthands Prefect's cron schedules (croniter) accept for a whole expression.
CRON_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def cron_problem(expression: str) -> str | None:
    """Why a five-field cron expression (or a shorthand such as @daily) is invalid; None when valid."""
    parts = CRON_MACROS.get(expression.strip().lower(), expression).split()
    if len(parts) != 5:
        return (
            f"{expression!r} has {len(parts)} fields; cron needs 5 (minute hour day month weekday) "
            "or a shorthand such as @daily"
        )
    values: list[set[int]] = []
    for part, (low, high), names in zip(parts, _CRON_RANGES, _CRON_NAMES):
        values.append(set())
        for item in part.split(","):
            match = _CRON_ITEM.fullmatch(item)
            if not match or match["step"] == "0":
                return f"{item!r} in {expression!r} is not a cron field"
            bounds = []
            for value in filter(None, (match["low"], match["high"])):
                number = names.index(value.lower()) + (1 if len(names) == 12 else 0) if value.lower() in names else (
                    int(value) if value.isdigit() else None)
                if number is None or not low <= number <= high:
                    return f"{value!r} in {expression!r} is outside {low}-{high}"
                bounds.append(number)
            if not bounds:  # "*", "*/n"
                first, last = low, high
            elif match["high"] or not match["step"]:  # "a-b", "a-b/n", "a"
                first, last = bounds[0], bounds[-1]
            else:  # "a/n": from a to the end of the range
                first, last = bounds[0], high
            values[-1].update(range(first, last + 1, int(match["step"] or 1)))
    days, months, weekdays = values[2], values[3], parts[4]
    # With the weekday unrestricted, only the day of the month decides; Feb 29 fires in leap years.
    if weekdays == "*" and not any(day <= _DAYS_IN_MONTH[month - 1] for day in days for month in months):
        return f"{expression!r} never fires: no month of {sorted(months)} has day {sorted(days)}"
    return None


def _check_cron(schedule: ScheduleSettings, fail: Any) -> None:
    problem = cron_problem(schedule.cron)
    if problem:
        fail("schedule.cron", problem)


def resolve_recipe_path(name: str | Path) -> Path:
    """A recipe file: a path as given, else `deployments/recipes/{name}.yaml`."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe {str(name)!r} not found (a YAML path, or one of: {', '.join(known)})")


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a parsed recipe with dotted keys set, e.g. {"seed": 1, "search.mcts.rollouts": 8}."""
    import copy

    result = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = result
        for key in parents:
            child = node.setdefault(_existing_key(node, key), {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {dotted}: {key} is not a section")
            node = child
        node[_existing_key(node, last)] = value
    return result


def _existing_key(section: Mapping[Any, Any], key: str) -> Any:
    """The key of `section` that a dotted name's part means: YAML reads `round_overrides: {1: ...}` with
    an int key, which `search.round_overrides.1` must reach rather than add a second "1" beside it."""
    return next((existing for existing in section if str(existing) == key), key)


def read_recipe_yaml(path: Path) -> Any:
    """A recipe file's YAML; RecipeError in one line, with the line and column of a syntax error."""
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"cannot read recipe {path}: {problem}{where}") from None


def load_recipe(name: str | Path, overrides: Mapping[str, Any] | None = None) -> Recipe:
    """Read and check a recipe file (a path or the name of a bundled recipe), with dotted overrides."""
    path = resolve_recipe_path(name)
    data = read_recipe_yaml(path)
    if not overrides:
        return parse_recipe(data, source=str(path))
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections")
    try:
        return parse_recipe(apply_overrides(data, overrides), source=str(path))
    except RecipeError as err:
        # The override's fault when the recipe is fine without it: the file does not hold the bad value.
        for key, value in overrides.items():
            try:
                parse_recipe(apply_overrides(data, {k: v for k, v in overrides.items() if k != key}), source=str(path))
            except RecipeError:
                continue
            raise RecipeError(f"override {key}={value}: {str(err).removeprefix(f'{path}: ')}") from None
        raise


def cli_check_recipe(argv: list[str]) -> int:

    parser = OneLineParser(prog="kaizen check-recipe", description="Check recipes; exit 1 naming the first bad field.")
    parser.add_argument("recipes", nargs="+", help="recipe names (deployments/recipes) or YAML paths")
    parser.add_argument("--print-cron", action="store_true",
                        help="print the (single) recipe's schedule.cron, for deployments/prefect.yaml")
    args = parser.parse_args(argv)
    if args.print_cron and len(args.recipes) != 1:
        parser.error("--print-cron takes exactly one recipe")
    for name in args.recipes:
        recipe = load_recipe(name)
        if args.print_cron:
            if recipe.schedule.cron is None:
                raise RecipeError(f"{recipe.source}: schedule.cron: not set, and the nightly deployment needs it")
            print(recipe.schedule.cron)
        else:
            print(f"{recipe.source}: ok")
    return 0
