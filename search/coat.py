"""Satori's chain-of-action-thought (COAT) on top of the code-augmented step format.

Every step starts with a meta-action token saying what the step does:

    <|continue|># Step 1: Count the apples
    apples = 3 * 4
    <end_of_step>
    <|continue|># Step 2: Divide them among the children
    share = apples / 0
    <end_of_step>
    <|reflect|># Reflect: running this code fails with ZeroDivisionError. Back to step 1.
    <end_of_step>
    <|continue|># Step 2: Divide them among the two children
    share = apples // 2
    <end_of_step>
    <|continue|># Now print the final answer
    print(share)
    <end_of_code>
    <output>6<end_of_output>
    <|continue|><answer>Each child gets \\boxed{6} apples.<end_of_answer>

After the token comes an ordinary step of `search.steps` (so the step parser, the sandbox and the
grader work unchanged). `<|continue|>` extends the solution. `<|reflect|>` (after a step that
failed) and `<|explore|>` (after a branch that reached a wrong answer) are comment steps that roll
the solution back: "Back to step k." keeps the first k steps of the live path (0, or "start
over", starts over; without it, only the latest step is dropped). The live path holds continue
steps only, so step numbers count those; the program of a solution is the code of its live path (a
meta step's own code never runs), and its answer is the live path's last answer step.

The search generates COAT one step at a time (`parse_coat_step`, `step_program`): a meta step is a
comment, so running it means running the live path after its rollback, which changes nothing.

The plain step format has one rollback of its own, ASTRO's backtrack (`astro_backtrack`): a comment
step "# But wait, <why>. Let me go back to step k (or: start over) and try a different way." acts
as a reflect step (`plain_coat_steps`), so ASTRO traces run and search the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from search.steps import (
    END_OF_STEP,
    ParsedStep,
    Phase,
    SolutionStep,
    StepKind,
    parse_solution,
    parse_step,
    parse_trajectory,
    path_program,
    render_output,
)


class MetaAction(Enum):
    """What a COAT step does; the value is its token."""

    CONTINUE = "<|continue|>"
    REFLECT = "<|reflect|>"
    EXPLORE = "<|explore|>"


COAT_TOKENS: list[str] = [action.value for action in MetaAction]
"""The meta-action tokens; a COAT policy's tokenizer must hold each as one token."""

_BACK_TO = re.compile(r"[Bb]ack to step (\d+)|\b[Ss]tart over\b")
_ASTRO_BACKTRACK = re.compile(r"Let me (?:go back to step \d+|start over) and try a different way\.")
_ACTION_SPLIT = re.compile("(" + "|".join(re.escape(token) for token in COAT_TOKENS) + ")")


class CoatFormatError(ValueError):
    """Text that is not a chain-of-action-thought solution."""


@dataclass(frozen=True)
class CoatStep:
    """One COAT step: its meta action and the step-format step that follows the token."""

    action: MetaAction
    step: SolutionStep

    @property
    def back_to(self) -> int | None:
        """For reflect and explore steps: how many live steps the rollback keeps, if the step says so."""
        if self.action is MetaAction.CONTINUE:
            return None
        # The last mention: the step opens with a free-text reason (an error message, an answer).
        found = list(_BACK_TO.finditer(self.step.text))
        return (int(found[-1].group(1)) if found[-1].group(1) else 0) if found else None

    def parsed(self) -> ParsedStep:
        return parse_step(self.step.text)


def missing_coat_tokens(vocabulary: Iterable[str]) -> list[str]:
    """The meta-action tokens absent from a tokenizer's added tokens (`tokenizer.get_added_vocab()`): a token
    that is only a BPE merge can still be split in context."""
    known = set(vocabulary)
    return [token for token in COAT_TOKENS if token not in known]


def meta_step(action: MetaAction, reason: str, back_to: int) -> CoatStep:
    """A reflect or explore step: a comment that says what went wrong and where the solution resumes."""
    if action is MetaAction.CONTINUE:
        raise ValueError("a continue step is an ordinary step, not a meta step")
    label = "Reflect" if action is MetaAction.REFLECT else "Explore"
    tail = "." if action is MetaAction.REFLECT else " and try a different way."
    comment = " ".join(reason.split())
    return CoatStep(action, SolutionStep(f"# {label}: {comment}. Back to step {back_to}{tail}\n{END_OF_STEP}"))


def astro_backtrack(reason: str, back_to: int) -> SolutionStep:
    """ASTRO's admission of a failed branch in the plain step format: a comment step that keeps the
    first `back_to` steps in force (0: starts over), as a reflect step does in COAT."""
    target = f"go back to step {back_to}" if back_to > 0 else "start over"
    return SolutionStep(f"# But wait, {' '.join(reason.split())}. Let me {target} and try a different way.\n{END_OF_STEP}")


def is_astro_backtrack(text: str) -> bool:
    """Whether a plain-format step is an ASTRO backtrack (`astro_backtrack`): a comment-only step that says
    "Let me go back to step k" or "Let me start over"."""
    if not _ASTRO_BACKTRACK.search(text):
        return False
    parsed = parse_step(text)
    return parsed.kind is StepKind.CODE and _is_comment(parsed.code or "")


def plain_coat_steps(steps: Sequence[SolutionStep]) -> list[CoatStep]:
    """Plain-format steps as COAT steps: an ASTRO backtrack rolls back like a reflect step, so a failed
    branch's code stops running once the solution has gone back; every other step continues."""
    return [CoatStep(MetaAction.REFLECT if is_astro_backtrack(step.text) else MetaAction.CONTINUE, step)
            for step in steps]


def parse_plain_step(text: str, phase: Phase | None = None) -> ParsedStep:
    """`parse_step`, except that an ASTRO backtrack may come in either phase (right after a final
    output, when that output was wrong), as COAT's meta steps may."""
    return parse_step(text, None if is_astro_backtrack(text) else phase)


def continue_steps(steps: Sequence[SolutionStep]) -> list[CoatStep]:
    """Plain steps as COAT steps that each continue the solution."""
    return [CoatStep(MetaAction.CONTINUE, step) for step in steps]


def render_coat_solution(steps: Sequence[CoatStep]) -> str:
    """The completion text of a COAT solution: token, step, and (after a final code step) its output."""
    parts = []
    for coat_step in steps:
        parts.append(coat_step.action.value + coat_step.step.text.strip() + "\n")
        if coat_step.step.output is not None:
            parts.append(render_output(coat_step.step.output) + "\n")
    return "".join(parts)


def parse_coat_solution(solution: str) -> list[CoatStep]:
    """Split a COAT solution into steps (inverse of `render_coat_solution` up to whitespace).

    Raises CoatFormatError when text comes before the first token, or a token is not followed by
    exactly one closed step.
    """
    pieces = _ACTION_SPLIT.split(solution)
    if pieces[0].strip():
        raise CoatFormatError(f"text before the first meta-action token: {pieces[0].strip()[:80]!r}")
    steps = []
    for token, body in zip(pieces[1::2], pieces[2::2], strict=True):
        try:
            inner = parse_solution(body)
        except ValueError as err:
            raise CoatFormatError(f"{token} step: {err}") from None
        if len(inner) != 1:
            raise CoatFormatError(f"{token} must be followed by exactly one step, found {len(inner)}")
        steps.append(CoatStep(MetaAction(token), inner[0]))
    return steps


def parse_coat_trajectory(text: str) -> tuple[str, list[CoatStep]]:
    """Question and COAT steps of prompt + solution; CoatFormatError if it is not one."""
    prompt = _ACTION_SPLIT.split(text, maxsplit=1)[0]
    try:
        question, untagged = parse_trajectory(prompt)
    except ValueError as err:
        raise CoatFormatError(str(err)) from None
    if untagged:
        raise CoatFormatError("a step before the first meta-action token")
    return question, parse_coat_solution(text[len(prompt) :])


def split_action(text: str) -> tuple[MetaAction | None, str]:
    """The meta-action a generated step opens with and the text after its token; (None, text) without one."""
    stripped = text.lstrip()
    for action in MetaAction:
        if stripped.startswith(action.value):
            return action, stripped[len(action.value) :]
    return None, text


def as_coat_step(text: str) -> CoatStep:
    """A step's text, token first, as a CoatStep; CoatFormatError when it does not open with a token."""
    action, body = split_action(text)
    if action is None:
        raise CoatFormatError(f"a step without a meta-action token: {text.strip()[:80]!r}")
    return CoatStep(action, SolutionStep(body.strip()))


def _is_comment(code: str) -> bool:
    return all(line.lstrip().startswith("#") for line in code.splitlines() if line.strip())


def parse_coat_step(text: str, phase: Phase | None = None) -> tuple[MetaAction | None, ParsedStep]:
    """Classify one generated COAT step: its meta action and the step after the token.

    Malformed: no leading token, a second token inside, or a malformed step after the token. A
    continue step is checked against `phase` like a plain step. A reflect or explore step must be a
    comment closed by <end_of_step>, in either phase (it may come right after a final output).
    """
    action, body = split_action(text)
    if action is None or _ACTION_SPLIT.search(body):
        return action, ParsedStep(StepKind.MALFORMED)
    if action is MetaAction.CONTINUE:
        return action, parse_step(body, phase)
    parsed = parse_step(body)
    if parsed.kind is not StepKind.CODE or not _is_comment(parsed.code or ""):
        return action, ParsedStep(StepKind.MALFORMED)
    return action, parsed


def step_program(steps: Sequence[CoatStep]) -> str | None:
    """The program the last of `steps` runs: the code of the live path ending in it.

    A meta step's live path is the one after its rollback; its comment is appended so that the step
    runs like any other (and, being a comment, leaves the program's behaviour unchanged).
    """
    live = live_path(steps)
    if steps and steps[-1].action is not MetaAction.CONTINUE:
        live.append(steps[-1].step)
    return solution_program(live)


def live_path(steps: Sequence[CoatStep]) -> list[SolutionStep]:
    """The continue steps still in force after every rollback, in order (meta steps only roll back)."""
    live: list[SolutionStep] = []
    for coat_step in steps:
        if coat_step.action is MetaAction.CONTINUE:
            live.append(coat_step.step)
        else:
            keep = coat_step.back_to
            live = live[: len(live) - 1 if keep is None else max(0, min(keep, len(live)))]
    return live


def solution_program(steps: Sequence[SolutionStep]) -> str | None:
    """The program of a solution: the code of its code steps, or None when it has none."""
    codes = [parsed.code for parsed in map(parse_step, (step.text for step in steps)) if parsed.code is not None]
    return path_program(codes) if codes else None


def final_answer(steps: Sequence[SolutionStep]) -> str | None:
    """The answer text of the last answer step, or None without one."""
    for step in reversed(steps):
        parsed = parse_step(step.text)
        if parsed.kind is StepKind.ANSWER:
            return parsed.answer_text
    return None
