"""Synthetic curriculum: seeded math word problems with exact integer answers at graded difficulty.

The embedded CPU demo evolves a tiny model that starts from nothing, so it needs problems whose
difficulty can be turned like a dial, a held-out split, and a teacher that solves them in the
project's code-augmented step format (rStar-Math's large bootstrap model, here a program).

Problems. A problem follows one quantity through a short story: a start sentence sets it, each
event sentence changes it by one operation (add, subtract, multiply, exact division, or add or
subtract a product such as "3 bags with 4 marbles in each"), and the question asks for its final
value. Themes (collections, shopping, travel, ages, baking, water tanks) are data: sentence
templates per operation, distractor sentences, questions, and slots (items, units) drawn per
problem along with names and pronouns. In the ages theme every event introduces a new person, an
intermediate quantity with a variable of its own. Values stay between 1 and a small cap,
divisions are exact, and every number the steps use is written with one digit (see
MAX_WRITTEN_NUMBER); the code does the arithmetic, so a model only has to copy numbers and pick
operations.

Levels (`LEVELS`). A level fixes how many sentences compute (a start like "3 bags with 4 marbles
in each" computes, "12 marbles" does not) and how many distractors there are: sentences whose
numbers play no part in the answer ("Ben has 7 marbles." when the question is about Mia), from
level 3 on. Level L has L or L + 1 computing sentences, except level 1, the bootstrap level: one
or two, plus a thin tail (1 in 5) of chains up to the longest. A tiny model trained on 1-2
operations only never writes a further step (measured: it printed the answer at the step after
its longest training chain in 112 of 112 samples), so no search could solve anything longer; with
the tail it continues, and distractors, long chains and accuracy on them are what the rounds'
search has to find.

Solutions (`solve`). One step per start or event sentence, `# Step k: <the sentence>, so <the
operation>` then one assignment; then a step printing the answer, its output and a `\\boxed{}`
answer, rendered with `search.steps`. Quoting the sentence makes every step the same move (copy
the next sentence, translate it), whatever the theme. The generator keeps the structured form of
each problem, so the teacher never parses text; the output is the value the generator computed.

Split. Whether a problem is held out is a function of its story alone (`is_held_out`, a SHA-256
bucket of the text before the question), so the same story, however it is asked, can never be on
both sides, whatever the seed or the counts; texts are deduplicated. Each level draws from its own seeded stream and fills both sides from it, so the
test set depends on (seed, n_test, levels) and not on n_train.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from search.coat import continue_steps, render_coat_solution
from search.steps import (
    ANSWER_START,
    END_OF_ANSWER,
    END_OF_CODE,
    END_OF_STEP,
    SolutionStep,
    render_prompt,
    render_solution,
    render_trajectory,
)

ID_PREFIX = "syn"
TEST_BUCKETS = 25
"""Held-out problems: those whose content hash falls in the first TEST_BUCKETS of 100 buckets."""

MAX_VALUE = 500
"""No quantity (start, intermediate or answer) exceeds this; all stay >= 1."""

MAX_WRITTEN_NUMBER = 9
"""Every number written in a problem has one digit (intermediate values and answers may be larger),
except the distractors of a long problem whose steps use every digit (SPARE_DISTRACTOR_NUMBERS).

The tokenizer splits numbers into digits. Measured on a 2M-parameter model bootstrapped for 500
steps: from the prompt it copied the first digit of a two-digit number 47 times in 47, the second
only 6 times in 47, so problems with two-digit numbers tested digit copying, not reasoning steps."""

DISTRACTOR_NUMBERS = range(2, MAX_WRITTEN_NUMBER + 1)
SPARE_DISTRACTOR_NUMBERS = range(10, 31)
PROBLEM_COLUMNS = ("id", "problem", "answer", "level")


@dataclass(frozen=True)
class LevelSpec:
    """What makes a level hard: how many sentences compute, and how many only distract."""

    operations: Mapping[int, int] = field(
        metadata={"help": "how many sentences compute (one solution step each): count -> relative weight"}
    )
    distractors: int = field(default=0, metadata={"help": "sentences with numbers irrelevant to the answer"})


# Level 1 has a thin tail of long chains (see the module docstring): a tiny model never writes
# more steps than it was trained on, so the bootstrap data must show every length now and then.
LEVELS: dict[int, LevelSpec] = {
    1: LevelSpec(operations={1: 8, 2: 8, 3: 1, 4: 1, 5: 1, 6: 1}),
    2: LevelSpec(operations={2: 1, 3: 1}),
    3: LevelSpec(operations={3: 1, 4: 1}, distractors=1),
    4: LevelSpec(operations={4: 1, 5: 1}, distractors=1),
    5: LevelSpec(operations={5: 1, 6: 1}, distractors=2),
}
EASIEST_LEVEL = min(LEVELS)


# --- operations --------------------------------------------------------------------------------


class Op(Enum):
    """The operation a sentence performs on the tracked quantity (SET*: the start sentence)."""

    SET = "set"
    SET_PRODUCT = "set_product"
    ADD = "add"
    SUBTRACT = "subtract"
    MULTIPLY = "multiply"
    DIVIDE = "divide"
    ADD_PRODUCT = "add_product"
    SUBTRACT_PRODUCT = "subtract_product"


def _exact_division(value: int, n: int) -> int | None:
    return value // n if value % n == 0 else None


@dataclass(frozen=True)
class OpRule:
    """How an operation is computed, written in code and named in a step's reasoning."""

    expression: str  # Python, over {prev} (the quantity before) and the operand names
    phrase: str  # what the step's comment adds after quoting the sentence ("" for none)
    operands: Mapping[str, Sequence[int]]  # the default draws
    apply: Callable[..., int | None]  # (value before, **operands) -> value after, None if not exact


_PRODUCT_OPERANDS = {"a": range(2, 7), "b": range(2, MAX_WRITTEN_NUMBER + 1)}
_STEP_SIZES = {"n": range(2, MAX_WRITTEN_NUMBER + 1)}

OP_RULES: dict[Op, OpRule] = {
    Op.SET: OpRule("{n}", "", {"n": range(3, MAX_WRITTEN_NUMBER + 1)}, lambda _, n: n),
    Op.SET_PRODUCT: OpRule("{a} * {b}", "that is {a} times {b}", _PRODUCT_OPERANDS, lambda _, a, b: a * b),
    Op.ADD: OpRule("{prev} + {n}", "add {n}", _STEP_SIZES, lambda v, n: v + n),
    Op.SUBTRACT: OpRule("{prev} - {n}", "subtract {n}", _STEP_SIZES, lambda v, n: v - n),
    Op.MULTIPLY: OpRule("{prev} * {n}", "multiply by {n}", {"n": range(2, 5)}, lambda v, n: v * n),
    Op.DIVIDE: OpRule("{prev} // {n}", "divide by {n}", {"n": range(2, 6)}, _exact_division),
    Op.ADD_PRODUCT: OpRule(
        "{prev} + {a} * {b}", "add {a} times {b}", _PRODUCT_OPERANDS, lambda v, a, b: v + a * b
    ),
    Op.SUBTRACT_PRODUCT: OpRule(
        "{prev} - {a} * {b}", "subtract {a} times {b}", _PRODUCT_OPERANDS, lambda v, a, b: v - a * b
    ),
}


# --- themes (templates as data) ----------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A sentence that sets or changes the quantity.

    Placeholders: {name}, {friend}, {other} (distractors), pronouns {He} {he} {him} {his} {His},
    the theme's slots, the operands ({n} or {a} {b}), and in chain themes {subject} and {prev}.
    """

    op: Op
    sentence: str
    operands: Mapping[str, Sequence[int]] | None = None  # overrides the operation's default draws


@dataclass(frozen=True)
class Theme:
    name: str
    variable: str  # Python name of the quantity; may use slots, and {key} in chain themes
    starts: tuple[Template, ...]
    events: tuple[Template, ...]
    questions: tuple[str, ...]
    distractors: tuple[str, ...]  # sentences with a number {d} that the answer does not use
    slots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # one value drawn per problem
    chain: tuple[str, ...] = ()  # when set, each event is about the next of these (a new quantity)
    max_value: int = MAX_VALUE


def _t(op: Op, sentence: str, **operands: Sequence[int]) -> Template:
    return Template(op, sentence, operands or None)


_HALF = {"n": (2,)}
_THIRD = {"n": (3,)}

THEMES: tuple[Theme, ...] = (
    Theme(
        name="collection",
        variable="{things}",
        slots={
            "things": ("marbles", "stickers", "stamps", "shells", "cards", "pencils", "buttons", "coins"),
            "containers": ("bags", "boxes", "jars", "packs"),
        },
        starts=(
            _t(Op.SET, "{name} has {n} {things}."),
            _t(Op.SET, "{name} collects {n} {things}."),
            _t(Op.SET_PRODUCT, "{name} has {a} {containers} with {b} {things} in each."),
        ),
        events=(
            _t(Op.ADD, "{He} buys {n} more {things}."),
            _t(Op.ADD, "{friend} gives {him} {n} {things}."),
            _t(Op.SUBTRACT, "{He} gives {n} {things} to {friend}."),
            _t(Op.SUBTRACT, "{He} loses {n} {things}."),
            _t(Op.MULTIPLY, "After a trade {he} has {n} times as many {things} as before."),
            _t(Op.DIVIDE, "{He} splits {his} {things} into {n} equal piles and keeps one pile."),
            _t(Op.ADD_PRODUCT, "{He} buys {a} {containers} with {b} {things} in each."),
            _t(Op.SUBTRACT_PRODUCT, "{He} gives {b} {things} to each of {a} friends."),
        ),
        questions=("How many {things} does {name} have now?", "How many {things} does {name} have in the end?"),
        distractors=(
            "{other} has {d} {things}.",
            "{name} is {d} years old.",
            "{other} keeps {d} {containers} on a shelf.",
            "{His} school is {d} km from home.",
        ),
    ),
    Theme(
        name="shopping",
        variable="money",
        slots={
            "purchase": ("book", "lamp", "hat", "ball", "game", "kite", "scarf"),
            "goods": ("pens", "cups", "toys", "plants", "shirts", "mugs"),
        },
        starts=(
            _t(Op.SET, "{name} has {n} dollars."),
            _t(Op.SET, "{name} has saved {n} dollars."),
            _t(Op.SET_PRODUCT, "{name} saves {b} dollars a week for {a} weeks."),
        ),
        events=(
            _t(Op.ADD, "{He} earns {n} dollars washing cars."),
            _t(Op.ADD, "{His} aunt gives {him} {n} dollars."),
            _t(Op.SUBTRACT, "{He} spends {n} dollars on a {purchase}."),
            _t(Op.SUBTRACT, "{He} pays {n} dollars for lunch."),
            _t(Op.MULTIPLY, "Then {his} money grows to {n} times as much."),
            _t(Op.DIVIDE, "{He} spends half of {his} money on a {purchase}.", **_HALF),
            _t(Op.DIVIDE, "{He} keeps a third of {his} money and gives the rest to charity.", **_THIRD),
            _t(Op.ADD_PRODUCT, "{He} sells {a} {goods} for {b} dollars each."),
            _t(Op.SUBTRACT_PRODUCT, "{He} buys {a} {goods} that cost {b} dollars each."),
        ),
        questions=("How many dollars does {name} have now?", "How many dollars does {name} have at the end?"),
        distractors=(
            "{other} has {d} dollars.",
            "The shop is {d} km from {his} house.",
            "{name} has {d} cousins.",
            "The shop opened {d} years ago.",
        ),
    ),
    Theme(
        name="travel",
        variable="distance",
        slots={"moves": ("cycles", "drives", "walks", "rides")},
        starts=(
            _t(Op.SET, "{name} {moves} {n} km away from home."),
            _t(Op.SET, "{name} starts a trip and {moves} {n} km away from home."),
            _t(Op.SET_PRODUCT, "{name} {moves} away from home for {a} hours at {b} km per hour."),
        ),
        events=(
            _t(Op.ADD, "Then {he} {moves} {n} km further away."),
            _t(Op.SUBTRACT, "Then {he} {moves} {n} km back toward home."),
            _t(Op.MULTIPLY, "Then {he} keeps going until {he} is {n} times as far from home."),
            _t(Op.DIVIDE, "Then {he} turns back until {he} is half as far from home.", **_HALF),
            _t(Op.ADD_PRODUCT, "Then {he} {moves} further away for {a} hours at {b} km per hour."),
            _t(Op.SUBTRACT_PRODUCT, "Then {he} {moves} back toward home for {a} hours at {b} km per hour."),
        ),
        questions=("How many km from home is {name} now?", "How far from home, in km, is {name} at the end?"),
        distractors=(
            "{His} bike has {d} gears.",
            "{other} lives {d} km from the park.",
            "It is {d} degrees outside.",
            "{other} {moves} {d} km on the same day.",
        ),
    ),
    Theme(
        name="ages",
        variable="{key}_age",
        # People whose age may be anything next to a child's: a parent younger than the child reads wrong.
        chain=("sister", "brother", "cousin", "friend", "neighbor", "aunt", "uncle"),
        starts=(
            _t(Op.SET, "{name} is {n} years old.", n=range(4, MAX_WRITTEN_NUMBER + 1)),
            _t(Op.SET, "{name} turned {n} this year.", n=range(4, MAX_WRITTEN_NUMBER + 1)),
        ),
        events=(
            _t(Op.ADD, "{subject} is {n} years older than {prev}."),
            _t(Op.SUBTRACT, "{subject} is {n} years younger than {prev}."),
            _t(Op.MULTIPLY, "{subject} is {n} times as old as {prev}."),
            _t(Op.DIVIDE, "{subject} is half as old as {prev}.", **_HALF),
        ),
        questions=("How old is {subject}?", "How many years old is {subject}?"),
        distractors=(
            "{name} has {d} classmates.",
            "{other} is {d} years old.",
            "{name}'s family has {d} chickens.",
            "{name} lives {d} km from school.",
        ),
        max_value=99,
    ),
    Theme(
        name="baking",
        variable="{treats}",
        slots={"treats": ("cookies", "muffins", "cupcakes", "pancakes", "rolls")},
        starts=(
            _t(Op.SET, "{name} bakes {n} {treats}."),
            _t(Op.SET, "{name} buys {n} {treats} for a party."),
            _t(Op.SET_PRODUCT, "{name} bakes {a} trays of {treats} with {b} {treats} on each tray."),
        ),
        events=(
            _t(Op.ADD, "{He} bakes {n} more {treats}."),
            _t(Op.SUBTRACT, "{He} eats {n} of the {treats}."),
            _t(Op.SUBTRACT, "{friend} takes {n} {treats} home."),
            _t(Op.DIVIDE, "{He} packs the {treats} equally into {n} boxes and keeps one box."),
            _t(Op.ADD_PRODUCT, "{He} bakes {a} trays with {b} {treats} on each tray."),
            _t(Op.SUBTRACT_PRODUCT, "{He} gives {b} {treats} to each of {a} neighbors."),
        ),
        questions=("How many {treats} does {name} have now?", "How many {treats} does {name} have left at the end?"),
        # No distractor counts the tracked quantity: "Max bakes 4 cookies" would make the question ambiguous.
        distractors=(
            "{other} bakes {d} pies.",
            "Each tray is {d} inches wide.",
            "{name} has {d} friends at school.",
            "The party starts in {d} minutes.",
        ),
    ),
    Theme(
        name="tank",
        variable="water",
        starts=(
            _t(Op.SET, "A tank holds {n} liters of water."),
            _t(Op.SET, "{name} fills a tank with {n} liters of water."),
            _t(Op.SET_PRODUCT, "{name} pours {a} buckets of {b} liters each into an empty tank."),
        ),
        events=(
            _t(Op.ADD, "{name} pours in {n} more liters."),
            _t(Op.SUBTRACT, "Then {n} liters leak out."),
            _t(Op.DIVIDE, "Then half of the water is drained.", **_HALF),
            _t(Op.ADD_PRODUCT, "A pipe adds {b} liters per minute for {a} minutes."),
            _t(Op.SUBTRACT_PRODUCT, "A pump removes {b} liters per minute for {a} minutes."),
        ),
        questions=("How many liters of water are in the tank now?", "How many liters are in the tank at the end?"),
        distractors=(
            "The tank is {d} years old.",
            "{name} has {d} buckets.",
            "A pump in the shed weighs {d} kg.",
            "{other} has a pool that is {d} meters long.",
        ),
    ),
)

NAMES: dict[str, tuple[str, ...]] = {
    "she": ("Mia", "Ava", "Emma", "Lily", "Zoe", "Nora", "Ruth", "Sara"),
    "he": ("Tom", "Ben", "Sam", "Leo", "Max", "Omar", "Ravi", "Hugo"),
}
PRONOUNS: dict[str, dict[str, str]] = {
    "she": {"He": "She", "he": "she", "him": "her", "his": "her", "His": "Her"},
    "he": {"He": "He", "he": "he", "him": "him", "his": "his", "His": "His"},
}


# --- problems ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeStep:
    """One step of the teacher's solution: `variable = expression`, worth `value`."""

    op: Op
    reason: str
    variable: str
    expression: str
    value: int

    @property
    def code(self) -> str:
        return f"{self.variable} = {self.expression}"


@dataclass(frozen=True)
class SyntheticProblem:
    """A generated problem with the structured form its teacher solution is written from."""

    id: str
    level: int
    theme: str
    problem: str
    answer: str
    steps: tuple[ComputeStep, ...]
    distractors: tuple[str, ...]  # the sentences of `problem` the answer does not depend on

    def row(self) -> dict[str, str | int]:
        """The problem as the loaders read it (columns `PROBLEM_COLUMNS`)."""
        return {"id": self.id, "problem": self.problem, "answer": self.answer, "level": self.level}


def content_digest(problem_text: str) -> str:
    return hashlib.sha256(problem_text.encode("utf-8")).hexdigest()


def is_held_out(problem_text: str) -> bool:
    """Whether a problem belongs to the test split; depends on its story only (the text before the
    question), so one story asked in two ways never falls on both sides."""
    story = problem_text[: problem_text.rfind(". ") + 1] or problem_text
    return int(content_digest(story)[-8:], 16) % 100 < TEST_BUCKETS


def problem_id(problem_text: str, level: int) -> str:
    return f"{ID_PREFIX}-L{level}-{content_digest(problem_text)[:10]}"


def _draw_slots(rng: random.Random, theme: Theme) -> dict[str, str]:
    pronoun, other_pronoun = rng.sample(sorted(NAMES), 2)
    # The friend (in events) and the other person (in distractors) take the other pronoun, so
    # "She ..." after a sentence about them can only mean the main character.
    friend, other = rng.sample(NAMES[other_pronoun], 2)
    slots = {"name": rng.choice(NAMES[pronoun]), "friend": friend, "other": other, **PRONOUNS[pronoun]}
    slots.update({slot: rng.choice(values) for slot, values in theme.slots.items()})
    return slots


def _operand_choices(template: Template, value: int | None, max_value: int) -> list[dict[str, int]]:
    """Every operand assignment of `template` that keeps the quantity whole and within 1..max_value."""
    rule = OP_RULES[template.op]
    draws = template.operands or rule.operands
    choices = []
    for combination in itertools.product(*draws.values()):
        operands = dict(zip(draws, combination, strict=True))
        result = rule.apply(value, **operands)
        if result is not None and 1 <= result <= max_value:
            choices.append(operands)
    return choices


@dataclass
class _Story:
    """A problem being written: sentences and the teacher's steps, in order."""

    theme: Theme
    slots: dict[str, str]
    sentences: list[str] = field(default_factory=list)
    steps: list[ComputeStep] = field(default_factory=list)
    subject: str = ""

    def tell(self, template: Template, operands: Mapping[str, int], key: str, subject: str) -> None:
        rule = OP_RULES[template.op]
        before = self.steps[-1] if self.steps else None
        fill = {**self.slots, **operands, "key": key, "subject": subject, "prev": self.subject}
        sentence = template.sentence.format_map(fill)
        # The reasoning quotes the sentence and names the operation: the same move at every step.
        reason = ", so ".join(filter(None, [sentence.rstrip("."), rule.phrase.format(**operands)]))
        self.sentences.append(sentence)
        self.steps.append(
            ComputeStep(
                op=template.op,
                reason=reason,
                variable=self.theme.variable.format_map(fill),
                expression=rule.expression.format(prev=before.variable if before else "", **operands),
                value=rule.apply(before.value if before else None, **operands),
            )
        )
        self.subject = subject


def _pick(
    rng: random.Random, templates: Sequence[Template], value: int, max_value: int
) -> tuple[Template, dict[str, int]]:
    """A template that can follow `value`, uniformly, then uniform operands for it."""
    # Never empty: every theme can add to a small value and subtract from a large one.
    feasible = [(t, choices) for t in templates if (choices := _operand_choices(t, value, max_value))]
    template, choices = rng.choice(feasible)
    return template, rng.choice(choices)


def generate_problem(rng: random.Random, level: int) -> SyntheticProblem:
    """One problem of `level` (a key of LEVELS), drawn from `rng`."""
    spec = LEVELS[level]
    theme = rng.choice(THEMES)
    slots = _draw_slots(rng, theme)
    story = _Story(theme, slots)
    start = rng.choice(theme.starts)
    start_operands = rng.choice(_operand_choices(start, None, theme.max_value))
    story.tell(start, start_operands, key=slots["name"].lower(), subject=slots["name"])
    relatives = rng.sample(theme.chain, len(theme.chain))
    operations = rng.choices(list(spec.operations), weights=list(spec.operations.values()))[0]
    events = operations - (start.op is Op.SET_PRODUCT)
    for index in range(events):
        template, operands = _pick(rng, theme.events, story.steps[-1].value, theme.max_value)
        if theme.chain:
            story.tell(template, operands, key=relatives[index], subject=f"{slots['name']}'s {relatives[index]}")
        else:
            story.tell(template, operands, key="", subject=story.subject)
    used_numbers = {number for step in story.steps for number in re.findall(r"\d+", step.expression)}
    used_numbers.add(str(story.steps[-1].value))
    # A distractor never repeats a number the steps use, nor the answer (a policy copying it would
    # pass as right); a long problem may use every digit, and then (only then) its distractors get
    # two-digit numbers.
    distractor_numbers = [d for d in DISTRACTOR_NUMBERS if str(d) not in used_numbers] or list(SPARE_DISTRACTOR_NUMBERS)
    distractors = tuple(
        template.format_map({**slots, "d": rng.choice(distractor_numbers)})
        for template in rng.sample(theme.distractors, spec.distractors)
    )
    sentences = list(story.sentences)
    for distractor in distractors:  # anywhere after the start sentence, before the question
        sentences.insert(rng.randint(1, len(sentences)), distractor)
    question = rng.choice(theme.questions).format_map({**slots, "subject": story.subject})
    text = " ".join([*sentences, question])
    return SyntheticProblem(
        id=problem_id(text, level),
        level=level,
        theme=theme.name,
        problem=text,
        answer=str(story.steps[-1].value),
        steps=tuple(story.steps),
        distractors=distractors,
    )


def _level_stream(seed: int, level: int, purpose: str = "curriculum") -> Iterator[SyntheticProblem]:
    """Distinct problems of one level, in a fixed order for a given seed."""
    rng = random.Random(f"kaizen-{purpose}:{seed}:{level}")
    seen: set[str] = set()
    while True:
        problem = generate_problem(rng, level)
        if problem.problem not in seen:
            seen.add(problem.problem)
            yield problem


def _per_level(total: int, levels: Sequence[int]) -> dict[int, int]:
    """`total` spread evenly over `levels`, the remainder going to the easiest."""
    base, extra = divmod(total, len(levels))
    return {level: base + (rank < extra) for rank, level in enumerate(sorted(levels))}


def make_curriculum(
    n_train: int, n_test: int, *, seed: int = 0, levels: Sequence[int] = tuple(LEVELS), max_draws_per_problem: int = 50
) -> tuple[list[SyntheticProblem], list[SyntheticProblem]]:
    """Train and held-out test problems, evenly spread over `levels`, deterministic in `seed`.

    Raises ValueError for an unknown level, or when a level cannot yield that many distinct problems
    within `max_draws_per_problem` draws per problem asked for.
    """
    levels = sorted(set(levels))
    if not levels or not set(levels) <= set(LEVELS):
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {levels}")
    train_counts, test_counts = _per_level(n_train, levels), _per_level(n_test, levels)
    train: list[SyntheticProblem] = []
    test: list[SyntheticProblem] = []
    for level in levels:
        wanted = {False: train_counts[level], True: test_counts[level]}  # keyed by "held out"
        found: dict[bool, list[SyntheticProblem]] = {False: [], True: []}
        budget = max_draws_per_problem * (sum(wanted.values()) + 1)
        for problem in itertools.islice(_level_stream(seed, level), budget):
            held_out = is_held_out(problem.problem)
            if len(found[held_out]) < wanted[held_out]:
                found[held_out].append(problem)
            if all(len(found[side]) == wanted[side] for side in wanted):
                break
        else:
            raise ValueError(f"level {level}: fewer distinct problems than asked for in {budget} draws")
        train.extend(found[False])
        test.extend(found[True])
    return train, test


# --- the teacher -------------------------------------------------------------------------------

FINAL_STEP_COMMENT = "# Now print the final answer"


def solve(problem: SyntheticProblem) -> list[SolutionStep]:
    """The teacher's solution: one code step per computing sentence, the print step, the answer."""
    steps = [
        SolutionStep(f"# Step {number}: {step.reason}\n{step.code}\n{END_OF_STEP}")
        for number, step in enumerate(problem.steps, start=1)
    ]
    final_code = f"{FINAL_STEP_COMMENT}\nprint({problem.steps[-1].variable})\n{END_OF_CODE}"
    steps.append(SolutionStep(final_code, output=problem.answer))
    steps.append(SolutionStep(f"{ANSWER_START}The answer is \\boxed{{{problem.answer}}}{END_OF_ANSWER}"))
    return steps


def solution_text(problem: SyntheticProblem, step_format: str = "rstar") -> str:
    """The teacher's solution rendered as a completion (what SFT trains on); in the coat format every
    step continues the solution (the teacher never errs, so it never reflects)."""
    if step_format == "coat":
        return render_coat_solution(continue_steps(solve(problem)))
    return render_solution(solve(problem))


def bootstrap_sft_rows(problems: Iterable[SyntheticProblem], step_format: str = "rstar") -> list[dict[str, str]]:
    """Round-0 SFT rows (TRL prompt/completion): teacher solutions of the easiest-level problems only."""
    return [
        {"prompt": render_prompt(problem.problem), "completion": solution_text(problem, step_format),
         "problem_id": problem.id}
        for problem in problems
        if problem.level == EASIEST_LEVEL
    ]


# --- files -------------------------------------------------------------------------------------


def write_problems(problems: Iterable[SyntheticProblem], path: str | Path) -> Path:
    """Write problems atomically as JSONL or Parquet (by suffix) with columns `PROBLEM_COLUMNS`."""
    from data_store.parquet import atomic_path, write_table

    path = Path(path)
    rows = [problem.row() for problem in problems]
    if path.suffix == ".jsonl":
        with atomic_path(path) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path
    if path.suffix == ".parquet":
        import pyarrow as pa

        schema = pa.schema(
            [("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()), ("level", pa.int64())]
        )
        return write_table(pa.Table.from_pylist(rows, schema=schema), path)
    raise ValueError(f"{path}: expected a .jsonl or .parquet file name")


# --- tokenizer corpus --------------------------------------------------------------------------


def curriculum_lexicon() -> list[str]:
    """Every word a problem or a teacher solution can contain: templates and every slot value."""
    texts = [
        *(t.sentence for theme in THEMES for t in theme.starts + theme.events),
        *(text for theme in THEMES for text in theme.questions + theme.distractors),
        *(value for theme in THEMES for values in (*theme.slots.values(), theme.chain) for value in values),
        *(name for names in NAMES.values() for name in names),
        *(word for forms in PRONOUNS.values() for word in forms.values()),
        *(rule.phrase for rule in OP_RULES.values()),
        FINAL_STEP_COMMENT,
        "The answer is, so",
    ]
    without_placeholders = (re.sub(r"\{\w+\}", " ", text) for text in texts)
    return sorted({word for text in without_placeholders for word in re.findall(r"[A-Za-z]+", text)})


def curriculum_corpus(
    *, seed: int = 0, problems_per_level: int = 200, levels: Sequence[int] = tuple(LEVELS)
) -> Iterator[str]:
    """Texts for training the tiny tokenizer: the lexicon, then teacher trajectories of all levels.

    Only training-side problems are used (never a held-out text), drawn from a stream separate from
    `make_curriculum`'s. Pass it as `models.tiny.build_tiny_model(out_dir, corpus=...)`. That
    tokenizer splits numbers into single digits (the space before a number is a token of its own),
    so every number the curriculum can produce is tokenized the same way whatever its value.
    """
    yield " ".join(curriculum_lexicon())
    for level in levels:
        stream = (p for p in _level_stream(seed, level, purpose="corpus") if not is_held_out(p.problem))
        for problem in itertools.islice(stream, problems_per_level):
            yield render_trajectory(problem.problem, solve(problem))
