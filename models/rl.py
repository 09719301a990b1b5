"""RL with verifiable rewards: the reward functions of the `rl` training kind and its GRPO trainer.

`models.training.train_rl` runs TRL's `GRPOTrainer` in a subprocess like SFT and PPM training;
this module supplies what is particular to RL. Rewards are plain TRL reward functions
(`f(prompts, completions, **columns) -> list[float | None]`), summed with GRPO's `reward_weights`
(a None leaves that reward out for that completion):

- `outcome`: prompt + completion is parsed in the run's step format (rStar's code-augmented steps
  or Satori's chain-of-action-thought), the program of the solution runs in the sandbox, and the
  grader compares the final answer with the row's reference: `outcome_correct` when it matches,
  the program ran and what it printed backs the answer (`SolutionJudge`), `outcome_wrong` otherwise
  (malformed, program failed, no or wrong answer), None where the grader timed out or failed.
- `format`: 1 for a completion that is a well-formed solution ending in an answer, else 0.
- `ppm`: the PPM's values of the solution's step prefixes, aggregated (min, mean or last).
- `reflection` (Satori): `reflection_bonus` for a restart from a wrong state (`prefix_kind` is
  `wrong`) that ends correct.
- `module:function`: any importable TRL reward function.

Generation stops at `<end_of_answer>` (it joins the EOS ids; with vLLM it is a stop token). The
policy writes a whole solution in one pass, so an `<output>` block in a completion is the model's
own guess; correctness is decided by actually running the program.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from search.coat import (
    CoatFormatError,
    final_answer,
    live_path,
    missing_coat_tokens,
    parse_coat_trajectory,
    plain_coat_steps,
    render_coat_solution,
    solution_program,
)
from search.grading import is_single_value
from search.rollout import finite_scores, last_printed_line, printed_error, printed_result, verified
from search.steps import (
    END_OF_ANSWER,
    SolutionStep,
    StepFormat,
    StepKind,
    parse_step,
    parse_trajectory,
    render_prompt,
    render_solution,
    split_prompt,
)

if TYPE_CHECKING:
    from search.rollout import AnswerChecker, Executor

STEP_FORMATS = tuple(StepFormat)
BUILTIN_REWARDS = ("outcome", "format", "ppm", "reflection")
PPM_AGGREGATES = ("min", "mean", "last")
PREFIX_KINDS = ("none", "correct", "wrong")
OPTIONAL_COLUMNS = ("prefix_kind",)
"""Prompt-table columns the rewards read when present (the reflection bonus needs `prefix_kind`)."""


class RLSettingsError(ValueError):
    """RL settings that cannot work (no reward, an unknown reward, a missing PPM); one line."""


@dataclass
class RewardFields:
    """The reward settings of an RL run, mixed into `models.training.RLTrainingConfig`."""

    rewards: list[str] = field(
        default_factory=lambda: ["outcome"],
        metadata={"help": f"reward functions, summed with reward_weights: {', '.join(BUILTIN_REWARDS)}, or "
                  "module:function (a TRL reward function)"},
    )
    outcome_correct: float = field(default=1.0, metadata={"help": "outcome reward of a correct final answer"})
    outcome_wrong: float = field(
        default=-1.0, metadata={"help": "outcome reward otherwise (rStar: -1; set 0 for 0/1 rewards)"}
    )
    reflection_bonus: float = field(
        default=0.5, metadata={"help": "reflection reward of a restart from a wrong prefix that ends correct"}
    )
    ppm_model: str | None = field(default=None, metadata={"help": "PPM checkpoint of the ppm reward"})
    ppm_aggregate: str = field(
        default="min",
        metadata={"help": "how the ppm reward combines the values of the step prefixes", "choices": list(PPM_AGGREGATES)},
    )
    sandbox: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "search.sandbox.SandboxConfig fields for running completions"}
    )
    grader_workers: int = field(default=2, metadata={"help": "grader worker processes"})
    grader_timeout_s: float = field(default=5.0, metadata={"help": "grading time limit per answer (s)"})


def reward_settings(values: Mapping[str, Any]) -> RewardFields:
    """The reward fields among `values` (an RL config as a dict), defaults for the rest."""
    names = {spec.name for spec in fields(RewardFields)}
    return RewardFields(**{key: value for key, value in values.items() if key in names})


def check_rl_settings(values: Mapping[str, Any], table_columns: Sequence[Sequence[str]]) -> None:
    """Raise RLSettingsError for settings that would fail only after training started."""
    settings = reward_settings(values)
    if not settings.rewards:
        raise RLSettingsError(
            f"an RL stage needs at least one reward function: set rewards ({', '.join(BUILTIN_REWARDS)} "
            "or module:function)"
        )
    for name in settings.rewards:
        if name not in BUILTIN_REWARDS:
            load_custom_reward(name)
    weights = values.get("reward_weights")
    if weights is not None and len(weights) != len(settings.rewards):
        raise RLSettingsError(f"reward_weights has {len(weights)} value(s) for {len(settings.rewards)} reward(s)")
    if "ppm" in settings.rewards and not settings.ppm_model:
        raise RLSettingsError("the ppm reward needs ppm_model (a PPM checkpoint)")
    if "reflection" in settings.rewards and any("prefix_kind" not in columns for columns in table_columns):
        raise RLSettingsError(
            "the reflection reward needs a prefix_kind column in every prompt table (see data_store.rl_prompts)"
        )
    if values.get("step_format", "rstar") not in STEP_FORMATS:
        raise RLSettingsError(f"step_format must be one of {', '.join(STEP_FORMATS)}")


def load_custom_reward(spec: str) -> Callable[..., list[float]]:
    """The function named by `module:function`; RLSettingsError when there is none."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RLSettingsError(
            f"unknown reward {spec!r}: expected one of {', '.join(BUILTIN_REWARDS)} or module:function"
        )
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise RLSettingsError(f"cannot load reward {spec!r}: {err}") from None
    if not callable(function):
        raise RLSettingsError(f"reward {spec!r} is not callable")
    return function


def require_coat_tokens(tokenizer: Any, model_name: str) -> None:
    """RLSettingsError when a COAT run's tokenizer lacks the meta-action tokens (RL cannot learn new tokens)."""
    missing = missing_coat_tokens(tokenizer.get_added_vocab())
    if missing:
        raise RLSettingsError(
            f"model {model_name!r} lacks the chain-of-action-thought token(s) {', '.join(missing)}: format-tune it "
            "first (SFT with step_format: coat adds them)"
        )


# --- judging solutions ------------------------------------------------------------------------


def solution_steps(text: str, step_format: str) -> list[SolutionStep]:
    """The steps in force of a trajectory (prompt + solution); ValueError when it is not well-formed."""
    if step_format == "coat":
        _, coat_steps = parse_coat_trajectory(text)
        return live_path(coat_steps)
    return live_path(plain_coat_steps(parse_trajectory(text)[1]))  # an ASTRO trace's abandoned branch is out


def step_prefixes(text: str, step_format: str) -> list[str]:
    """The trajectory cut after each of its steps, as written (what the PPM scores); ValueError if malformed."""
    if step_format == "coat":
        question, coat_steps = parse_coat_trajectory(text)
        return [render_prompt(question) + render_coat_solution(coat_steps[:end]) for end in range(1, len(coat_steps) + 1)]
    question, steps = parse_trajectory(text)
    return [render_prompt(question) + render_solution(steps[:end]) for end in range(1, len(steps) + 1)]


@dataclass(frozen=True)
class Verdict:
    """What running and grading one completion found."""

    well_formed: bool  # parses in the step format and ends in an answer step right after a final code step
    correct: bool | None  # well-formed, its program ran and printed the reference, and its answer equals it;
    # None: the grader could not tell (it timed out or failed), so no reward should say either way
    answer: str | None = None
    reason: str | None = None  # why it is not correct


def _parse_for_judging(text: str, step_format: str) -> tuple[list[SolutionStep] | None, str | None]:
    try:
        steps = solution_steps(text, step_format)
    except (ValueError, CoatFormatError) as err:
        return None, f"malformed: {err}"
    if not steps or parse_step(steps[-1].text).kind is not StepKind.ANSWER:
        return None, "malformed: the solution does not end in an answer step"
    # The search and evaluation accept an answer only after a final code step (whose output they show).
    if len(steps) < 2 or parse_step(steps[-2].text).kind is not StepKind.FINAL_CODE:
        return None, "malformed: the answer step does not follow a final code step"
    return steps, None


class SolutionJudge:
    """Runs and grades completions in batches: one sandbox call and one grader call per batch.

    A completion is written in one go, its `<output>` included, so the output it shows is the
    policy's guess; evaluation instead runs the code and shows the real output before the answer.
    A completion is correct only when its answer equals the reference and rests on the real output:
    what the program printed equals the reference too (`_held_printed`, for a reference of one
    value), so the program is right and the answer does not rest on a guessed output.

    The verdicts of the latest batch are kept, so rewards that read the same batch (outcome and
    reflection) run each program once.
    """

    def __init__(self, executor: Executor, checker: AnswerChecker, step_format: str = "rstar") -> None:
        if step_format not in STEP_FORMATS:
            raise ValueError(f"step_format must be one of {', '.join(STEP_FORMATS)}, not {step_format!r}")
        self.executor, self.checker, self.step_format = executor, checker, step_format
        self._latest: tuple[tuple[tuple[str, str, str], ...], list[Verdict]] | None = None

    def judge(self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        key = tuple(zip(prompts, completions, answers, strict=True))
        if self._latest is not None and self._latest[0] == key:
            return self._latest[1]
        verdicts: list[Verdict | None] = [None] * len(key)
        runnable: list[tuple[int, str | None, str]] = []  # index, program, answer text
        for index, (prompt, completion, _) in enumerate(key):
            steps, reason = _parse_for_judging(prompt + completion, self.step_format)
            if steps is None:
                verdicts[index] = Verdict(False, False, reason=reason)
            else:
                runnable.append((index, solution_program(steps), final_answer(steps) or ""))
        programs = [(index, program) for index, program, _ in runnable if program is not None]
        results = dict(zip([index for index, _ in programs],
                           self.executor.run_many([program for _, program in programs]) if programs else [],
                           strict=True))
        # index, answer text, the program's printed result as the reference holds it (None: not held)
        to_grade: list[tuple[int, str, str | None]] = []
        for index, _, answer_text in runnable:
            result = results[index]  # well-formed solutions end in a final code step, so they have a program
            failure = result.error if not result.ok else printed_error(result.stdout)
            if failure is not None:  # it raised, or caught its error and printed it: it computed nothing
                verdicts[index] = Verdict(True, False, reason=f"program failed: {failure}")
            else:
                prompt, completion, reference = key[index]
                question = split_prompt(prompt + completion)[0]  # it parsed as a trajectory above
                last = last_printed_line(result.stdout)
                to_grade.append((index, answer_text, _held_printed(last, reference, question)))
        pairs = [(text, key[index][2]) for index, answer_text, printed in to_grade
                 for text in (answer_text, printed) if text is not None]
        grades = iter(self.checker.grade_many(pairs) if pairs else [])
        for index, _, printed in to_grade:
            answer_grade = next(grades)
            output_grade = next(grades) if printed is not None else None
            correct = verified(answer_grade, output_grade)
            if correct is None:
                reason = "the grader could not tell"
            elif not answer_grade.equal:
                reason = "wrong answer"
            else:
                reason = None if correct else "the answer does not match what the program printed"
            verdicts[index] = Verdict(True, correct, answer_grade.pred_answer, reason)
        self._latest = (key, verdicts)  # type: ignore[assignment]  # every slot is filled by now
        return verdicts  # type: ignore[return-value]


def _held_printed(last: str, reference: str, question: str) -> str | None:
    """What the program's last printed line must equal as the reference does (boxed), or None.

    Stricter than the search (`search.rollout.printed_answer`, plain numbers only): a reference of
    one value holds whatever was printed last, or a policy could print words and guess. A plain
    number is rounded as `printed_result` rounds it; other lines are read out of Python's notation
    first (`python_notation_as_latex`), so a right program is not failed for printing `6 - 5*I`.
    """
    plain = printed_result(last, reference, question)
    if plain is not None or not is_single_value(reference):
        return plain
    return f"\\boxed{{{python_notation_as_latex(last)}}}"


_MATRIX = re.compile(r"Matrix\(\[(\[.*\])\]\)")
_EQUATION = re.compile(r"Eq\((.*),(.*)\)")


def python_notation_as_latex(line: str) -> str:
    """A printed result in the notation the grader reads, where Python's or SymPy's differs: a Matrix
    as a pmatrix, Eq(a, b) as a = b, the imaginary unit I (or a complex literal's j) as i, oo as
    \\infty, asin/acos/atan as \\arcsin/\\arccos/\\arctan. Anything else is left as printed."""
    text = line.strip()
    if matrix := _MATRIX.fullmatch(text):
        rows = [row.strip().strip("[]") for row in re.split(r"\]\s*,\s*\[", matrix.group(1))]
        entries = [" & ".join(entry.strip() for entry in row.split(",")) for row in rows]
        text = r"\begin{pmatrix} " + r" \\ ".join(entries) + r" \end{pmatrix}"
    if equation := _EQUATION.fullmatch(text):
        text = f"{equation.group(1).strip()} = {equation.group(2).strip()}"
    if re.fullmatch(r"\(.*j\)", text):  # Python prints a complex number in parentheses: (6-5j)
        text = text[1:-1]
    text = re.sub(r"(\d(?:\.\d+)?)j\b", r"\1 i", text)
    text = re.sub(r"\s*\*\s*I\b", " i", text)  # the grader reads "5 i" as 5i, but "5*i" as a product with a symbol
    text = re.sub(r"\bI\b", "i", text)
    text = re.sub(r"\boo\b", r"\\infty", text)
    return re.sub(r"\ba(sin|cos|tan)\(", r"\\arc\1(", text)


# --- reward functions -------------------------------------------------------------------------


class OutcomeReward:
    """`outcome_correct` for a completion whose program runs and whose answer is right, else `outcome_wrong`;
    None where the grader could not tell (TRL then leaves this reward out for that completion)."""

    __name__ = "outcome"

    def __init__(self, judge: SolutionJudge, correct: float = 1.0, wrong: float = -1.0) -> None:
        self.judge, self.correct, self.wrong = judge, correct, wrong

    def __call__(self, prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float | None]:
        verdicts = self.judge.judge(prompts, completions, answer)
        return [None if v.correct is None else self.correct if v.correct else self.wrong for v in verdicts]


class FormatReward:
    """1 for a well-formed solution in the step format that ends in an answer, else 0 (runs nothing)."""

    __name__ = "format"

    def __init__(self, step_format: str = "rstar") -> None:
        self.step_format = step_format

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [float(_parse_for_judging(p + c, self.step_format)[0] is not None) for p, c in zip(prompts, completions)]


class ReflectionBonus:
    """Satori's bonus: a restart from a wrong intermediate state (`prefix_kind` wrong) that ends correct."""

    __name__ = "reflection"

    def __init__(self, judge: SolutionJudge, bonus: float = 0.5) -> None:
        self.judge, self.bonus = judge, bonus

    def __call__(
        self, prompts: list[str], completions: list[str], answer: list[str], prefix_kind: list[str], **_: Any
    ) -> list[float | None]:
        verdicts = self.judge.judge(prompts, completions, answer)
        return [(None if v.correct is None else self.bonus if v.correct else 0.0) if kind == "wrong" else 0.0
                for kind, v in zip(prefix_kind, verdicts)]


class ProcessReward:
    """The PPM's values of a completion's step prefixes (the prompt's own steps excluded), combined by
    min, mean or last; -1 when malformed or empty."""

    __name__ = "ppm"

    def __init__(self, scorer: Any, step_format: str = "rstar", aggregate: str = "min") -> None:
        if aggregate not in PPM_AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(PPM_AGGREGATES)}")
        self.scorer, self.step_format, self.aggregate = scorer, step_format, aggregate

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        prefixes: list[list[str]] = []
        for prompt, completion in zip(prompts, completions):
            try:
                # Only the completion's own steps: a restart prompt's steps are the same for the whole
                # group, and under `min` they would often decide every completion's reward alike.
                given = len(step_prefixes(prompt, self.step_format))
                prefixes.append(step_prefixes(prompt + completion, self.step_format)[given:])
            except ValueError:
                prefixes.append([])
        values = iter(finite_scores(self.scorer.score([text for texts in prefixes for text in texts])))
        rewards = []
        for texts in prefixes:
            scores = [next(values) for _ in texts]
            if not scores:
                rewards.append(-1.0)
            elif self.aggregate == "min":
                rewards.append(min(scores))
            elif self.aggregate == "mean":
                rewards.append(sum(scores) / len(scores))
            else:
                rewards.append(scores[-1])
        return rewards


# --- inside the training subprocess ---------------------------------------------------------------


def build_reward_functions(config: Any, resources: ExitStack) -> list[Callable[..., list[float]]]:
    """The configured reward functions; sandbox, grader and PPM are opened on `resources` only when needed."""
    step_format = getattr(config, "step_format", "rstar")
    judge: SolutionJudge | None = None
    functions: list[Callable[..., list[float]]] = []
    for name in config.rewards:
        if name in ("outcome", "reflection") and judge is None:
            from search.grading import Grader
            from search.sandbox import Sandbox, SandboxConfig

            sandbox = resources.enter_context(Sandbox(SandboxConfig(**config.sandbox)))
            grader = resources.enter_context(Grader(workers=config.grader_workers, timeout_s=config.grader_timeout_s))
            judge = SolutionJudge(sandbox, grader, step_format)
        if name == "outcome":
            functions.append(OutcomeReward(judge, config.outcome_correct, config.outcome_wrong))
        elif name == "reflection":
            functions.append(ReflectionBonus(judge, config.reflection_bonus))
        elif name == "format":
            functions.append(FormatReward(step_format))
        elif name == "ppm":
            from models.ppm import PPMScorer

            functions.append(ProcessReward(PPMScorer(config.ppm_model), step_format, config.ppm_aggregate))
        else:
            functions.append(load_custom_reward(name))
    return functions


def _stop_at_answer(config: Any, tokenizer: Any, model: Any) -> list[int] | int | None:
    """Make `<end_of_answer>` end a completion; returns the model's previous EOS setting."""
    end_of_answer = tokenizer.convert_tokens_to_ids(END_OF_ANSWER)
    previous = model.generation_config.eos_token_id
    declared = [] if previous is None else [previous] if isinstance(previous, int) else list(previous)
    # TRL cuts and masks completions at every EOS id the model's generation config declares.
    model.generation_config.eos_token_id = [*declared, end_of_answer]
    if config.use_vllm:
        config.generation_kwargs = {"stop_token_ids": [end_of_answer], **(config.generation_kwargs or {})}
    return previous


def build_grpo_trainer(config: Any, tokenizer: Any, model: Any, dataset: Any, callbacks: list[Any]) -> Any:
    """A GRPOTrainer with the configured rewards; sandbox and grader close when training ends."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    previous_eos = _stop_at_answer(config, tokenizer, model)
    resources = ExitStack()
    functions = build_reward_functions(config, resources)

    class _Release(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
            # The saved checkpoint keeps the EOS setting it was started with.
            model.generation_config.eos_token_id = previous_eos
            resources.close()

    return GRPOTrainer(
        model=model, reward_funcs=functions, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[*callbacks, _Release()],
    )
