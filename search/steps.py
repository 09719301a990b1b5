"""The code-augmented chain-of-thought format of rStar-Math: rendering prompts and parsing steps.

A solution is a Python program written one step at a time; the comments carry the reasoning:

    # Step 1: <reasoning in words>
    total = 2 * 20 * 12
    <end_of_step>
    # Now print the final answer
    print(total)
    <end_of_code>
    <output>480<end_of_output>
    <answer>The total is \\boxed{480}.<end_of_answer>

A step's own code is its text without the closing marker (the `# Step k:` line is a comment, so
the text is valid Python as it stands); the program of a step is the code of its whole path. Only
the final code step's output is shown to the model, right before it writes the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum

USER_TAG = "<|user|>"
ASSISTANT_TAG = "<|assistant|>"
END_OF_STEP = "<end_of_step>"
END_OF_CODE = "<end_of_code>"
OUTPUT_START = "<output>"
END_OF_OUTPUT = "<end_of_output>"
ANSWER_START = "<answer>"
END_OF_ANSWER = "<end_of_answer>"

STEP_SPECIAL_TOKENS: list[str] = [
    USER_TAG,
    ASSISTANT_TAG,
    END_OF_STEP,
    END_OF_CODE,
    OUTPUT_START,
    END_OF_OUTPUT,
    ANSWER_START,
    END_OF_ANSWER,
]
"""Every marker the format uses; tokenizers add them as special tokens so each is one token."""

PROMPT_TEMPLATE = (
    f"{USER_TAG}:\n{{question}}\n{ASSISTANT_TAG}: Let's think step by step and solve the problem with code.\n"
)


class StepFormat(StrEnum):
    """How a policy writes its steps: rStar's code-augmented steps, or the same steps each led by a
    chain-of-action-thought meta-action token (Satori, `search.coat`)."""

    RSTAR = "rstar"
    COAT = "coat"


class Phase(Enum):
    """What the policy writes next: a (possibly final) code step, or the answer after the output."""

    STEP = "step"
    ANSWER = "answer"


STOP_STRINGS: dict[Phase, tuple[str, ...]] = {
    Phase.STEP: (END_OF_STEP, END_OF_CODE),
    Phase.ANSWER: (END_OF_ANSWER,),
}


class StepKind(Enum):
    CODE = "code"  # an intermediate step, closed by <end_of_step>
    FINAL_CODE = "final_code"  # the last code step, closed by <end_of_code>; its output comes next
    ANSWER = "answer"  # <answer> ... <end_of_answer>
    MALFORMED = "malformed"  # no closing marker (cut at max tokens), stray markers, wrong phase


_PHASE_OF_KIND = {StepKind.CODE: Phase.STEP, StepKind.FINAL_CODE: Phase.STEP, StepKind.ANSWER: Phase.ANSWER}


@dataclass(frozen=True)
class ParsedStep:
    kind: StepKind
    code: str | None = None  # code steps: the text without its closing marker
    answer_text: str | None = None  # answer steps: the text between <answer> and <end_of_answer>


@dataclass(frozen=True)
class SolutionStep:
    """A step as it appears in a rendered solution; `output` is shown only after a final code step."""

    text: str
    output: str | None = None


def render_prompt(question: str) -> str:
    """The policy's prompt for a problem; a solution continues right after it."""
    return PROMPT_TEMPLATE.format(question=question.strip())


# The `<` opening a marker of the format (or any `<|name|>` token) in a program's output: a program
# can print `<end_of_output><answer>...`, which would otherwise end its output block and forge steps.
_MARKER_IN_OUTPUT = re.compile(
    "<(?=" + "|".join(re.escape(marker[1:]) for marker in STEP_SPECIAL_TOKENS) + r"|\|\w+\|>)"
)


def render_output(output: str) -> str:
    """A program's output as the model sees it; markers inside it have their `<` written `&lt;`."""
    return f"{OUTPUT_START}{_MARKER_IN_OUTPUT.sub('&lt;', output.strip())}{END_OF_OUTPUT}"


def render_solution(steps: Sequence[SolutionStep]) -> str:
    """The completion text of a solution (what SFT trains on): one step per block, each ending in a newline."""
    parts: list[str] = []
    for step in steps:
        parts.append(step.text.strip() + "\n")
        if step.output is not None:
            parts.append(render_output(step.output) + "\n")
    return "".join(parts)


def render_trajectory(question: str, steps: Sequence[SolutionStep]) -> str:
    """Prompt plus solution so far: the text the policy continues and the PPM scores."""
    return render_prompt(question) + render_solution(steps)


# Worked examples for a base model that never saw the format (rStar-Math prompted its round-1 teacher
# few-shot): complete solutions, each program printing the output it shows.
WORKED_EXAMPLES: tuple[tuple[str, tuple[SolutionStep, ...]], ...] = (
    (
        "A bakery sells muffins for 3 dollars each and cookies for 2 dollars each. Maya buys 4 muffins and "
        "5 cookies. How many dollars does she spend?",
        (
            SolutionStep("# Step 1: The muffins cost 4 times 3 dollars\nmuffins = 4 * 3\n<end_of_step>"),
            SolutionStep("# Step 2: The cookies cost 5 times 2 dollars\ncookies = 5 * 2\n<end_of_step>"),
            SolutionStep("# Step 3: She spends the sum of the two\ntotal = muffins + cookies\n<end_of_step>"),
            SolutionStep("# Now print the final answer\nprint(total)\n<end_of_code>", output="22"),
            SolutionStep("<answer>Maya spends 12 + 10 = \\boxed{22} dollars.<end_of_answer>"),
        ),
    ),
    (
        "What is the sum of all values of $x$ such that $x^2 - 5x + 6 = 0$?",
        (
            SolutionStep("# Step 1: Solve the quadratic equation for x\nfrom sympy import solve, symbols\n"
                         "x = symbols('x')\nroots = solve(x**2 - 5*x + 6, x)\n<end_of_step>"),
            SolutionStep("# Step 2: Add up the solutions\ntotal = sum(roots)\n<end_of_step>"),
            SolutionStep("# Now print the final answer\nprint(total)\n<end_of_code>", output="5"),
            SolutionStep("<answer>The solutions are 2 and 3, so their sum is \\boxed{5}.<end_of_answer>"),
        ),
    ),
)


def check_worked_examples(count: int, step_format: str = "rstar") -> None:
    """ValueError when `count` worked examples cannot be shown to a policy writing `step_format`."""
    if not 0 <= count <= len(WORKED_EXAMPLES):
        raise ValueError(f"worked examples: 0 to {len(WORKED_EXAMPLES)}, got {count}")
    if count and step_format != StepFormat.RSTAR:
        raise ValueError(f"the worked examples are written in the rstar step format, not {step_format}")


def render_worked_examples(count: int) -> str:
    """The first `count` worked examples as solved prompts, each followed by a blank line: shown before
    a prompt, they teach a model the format in context."""
    check_worked_examples(count)
    return "".join(render_trajectory(question, steps) + "\n" for question, steps in WORKED_EXAMPLES[:count])


def stop_strings(phase: Phase) -> list[str]:
    return list(STOP_STRINGS[phase])


def _strip_marker(text: str, marker: str) -> str | None:
    """`text` without a trailing `marker`, or None when it does not end with it."""
    return text[: -len(marker)] if text.endswith(marker) else None


def _has_marker(text: str) -> bool:
    return any(marker in text for marker in STEP_SPECIAL_TOKENS)


def parse_step(text: str, phase: Phase | None = None) -> ParsedStep:
    """Classify one generated step; with `phase`, a well-formed step of the other phase is malformed."""
    stripped = text.strip()
    parsed = _parse_unchecked(stripped)
    if phase is not None and parsed.kind is not StepKind.MALFORMED and _PHASE_OF_KIND[parsed.kind] is not phase:
        return ParsedStep(StepKind.MALFORMED)
    return parsed


def _parse_unchecked(stripped: str) -> ParsedStep:
    for marker, kind in ((END_OF_STEP, StepKind.CODE), (END_OF_CODE, StepKind.FINAL_CODE)):
        body = _strip_marker(stripped, marker)
        if body is not None:
            code = body.strip("\n").rstrip()
            if not code.strip() or _has_marker(code):
                return ParsedStep(StepKind.MALFORMED)
            return ParsedStep(kind, code=code)
    body = _strip_marker(stripped, END_OF_ANSWER)
    if body is not None and body.startswith(ANSWER_START):
        answer_text = body[len(ANSWER_START) :].strip()
        if answer_text and not _has_marker(answer_text):
            return ParsedStep(StepKind.ANSWER, answer_text=answer_text)
    return ParsedStep(StepKind.MALFORMED)


def path_program(codes: Sequence[str]) -> str:
    """The program of a step: the code of every step on its path, in order."""
    return "\n".join(codes) + "\n"


def parse_solution(solution: str) -> list[SolutionStep]:
    """Split a rendered solution back into steps (inverse of `render_solution` up to whitespace).

    Raises ValueError on text that is not a sequence of closed steps.
    """
    steps: list[SolutionStep] = []
    rest = solution.lstrip()
    while rest:
        end, marker = min(
            ((rest.find(m), m) for m in (END_OF_STEP, END_OF_CODE, END_OF_ANSWER) if m in rest),
            default=(-1, ""),
        )
        if end < 0:
            raise ValueError(f"unterminated step: {rest[:80]!r}")
        text, rest = rest[: end + len(marker)].strip(), rest[end + len(marker) :].lstrip()
        output = None
        if marker == END_OF_CODE and rest.startswith(OUTPUT_START):
            close = rest.find(END_OF_OUTPUT)
            if close < 0:
                raise ValueError("unterminated <output>")
            output = rest[len(OUTPUT_START) : close].strip()
            rest = rest[close + len(END_OF_OUTPUT) :].lstrip()
        steps.append(SolutionStep(text, output))
    return steps


def split_prompt(text: str) -> tuple[str, str]:
    """A text that starts with a rendered prompt, as its question and what follows the prompt;
    ValueError if it does not start with one."""
    head, _, tail = PROMPT_TEMPLATE.partition("{question}")
    if not text.startswith(head):
        raise ValueError("text does not start with the prompt template")
    question, found, solution = text[len(head) :].partition(tail)
    if not found:
        raise ValueError("text does not contain the assistant turn of the prompt template")
    return question, solution


def parse_trajectory(text: str) -> tuple[str, list[SolutionStep]]:
    """Split a rendered trajectory into its question and steps; ValueError if it is not one."""
    question, solution = split_prompt(text)
    return question, parse_solution(solution)
