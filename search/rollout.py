"""The rollout driver: MCTS over many problems at once, batching every model and sandbox call.

Each pass, every unfinished tree selects the node it expands next; per group of trees (below), one
`generate` call samples the candidates of all those nodes, one `run_many` runs their path
programs, one `grade_many` grades their answers and one `score` call asks the PPM. Batching across
trees is where the throughput comes from: a tree alone has a single node to expand at a time.

Code execution, grading and PPM scoring overlap with generation: the trees are split into
`pipeline_groups` groups that take turns, so while one group's candidates are evaluated on a
thread pool (the sandbox and the grader work in their own processes, the PPM in native code, so
the threads do not hold the GIL), the next group's candidates are being generated. A group waits
for its own evaluation before selecting again, so each tree's search is exactly sequential MCTS,
and the order of calls does not depend on timing: with a deterministic generator a seed replays
exactly. As trees finish, the groups are formed anew from the unfinished ones whenever they fit in
fewer groups, so the last passes still send full-size calls.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import ROUND_HALF_UP, Decimal
from typing import Protocol

from search.grading import JUDGED_STATUSES, plain_number
from search.mcts import Candidate, MCTSConfig, Node, Tree
from search.policy import Generator, StepScorer
from search.steps import STOP_STRINGS, StepKind

# One stop set serves both phases, so one call serves every tree whatever its phase: a stop
# string of the other phase only ever ends a completion that is malformed in this phase anyway
# (see steps.parse_step), so classification is unchanged and such junk is cut short.
SEARCH_STOP: tuple[str, ...] = tuple(dict.fromkeys(s for stops in STOP_STRINGS.values() for s in stops))


class ProgramResult(Protocol):
    @property
    def ok(self) -> bool: ...

    @property
    def stdout(self) -> str: ...

    @property
    def error(self) -> str | None: ...


class Executor(Protocol):
    """Runs programs in isolation (search.sandbox.Sandbox implements it)."""

    def run_many(self, programs: Sequence[str]) -> Sequence[ProgramResult]: ...


class AnswerGrade(Protocol):
    """A verdict with the grader's status (search.grading.GradeResult implements it)."""

    @property
    def equal(self) -> bool: ...

    @property
    def pred_answer(self) -> str | None: ...

    @property
    def status(self) -> str: ...


class AnswerChecker(Protocol):
    """Grades (predicted answer text, reference) pairs (search.grading.Grader implements it)."""

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> Sequence[AnswerGrade]: ...


# A plain number as Python prints it: an int, a float (also in e-notation), a Fraction.
_PRINTED_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")
_PRINTED_FLOAT_RE = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][-+]?\d+)")
PRINTED_FLOAT_DIGITS = 12
"""Significant digits a printed float that shows binary rounding is held to: the noise sits in the
last of the 16-17 digits Python prints (3 * 0.7 prints 2.0999999999999996), and no written answer
carries it. A float printed with fewer digits is exact as printed and kept whole."""
_NOISY_FLOAT_DIGITS = 16


# A problem that asks for a rounded result ("to the nearest tenth", "to two decimal places", "round your
# answer"), whose program may print the value before rounding; not "a round table", "the nearest vertex".
_ASKS_TO_ROUND_RE = re.compile(
    r"\bto the nearest (?:whole|integer|percent|cent|dollar|degree|unit|ten|hundred|thousand|\w+th)\b"
    r"|\bdecimal places?\b|\bround(?:ed)? (?:off )?to\b|\bround your\b",
    re.IGNORECASE,
)


def printed_result(line: str, reference: str, question: str) -> str | None:
    """A program's printed result (its last line) boxed to grade like a written answer, when the
    reference is one plain number (`search.grading.plain_number`); None when it is not (words, an
    expression, infinity, several values or a choice letter), which no printed line is held to.

    Where the question asks for rounding, a printed decimal is rounded half up to the places the
    reference is written with: the program prints 7.0710678118654755, the answer 7.07.
    """
    number = plain_number(reference)
    if number is None:
        return None
    if number.places is not None and _PRINTED_FLOAT_RE.fullmatch(line) and _ASKS_TO_ROUND_RE.search(question):
        value = Decimal(line)
        if value.as_tuple().exponent < -number.places:
            line = format(value.quantize(Decimal(1).scaleb(-number.places), rounding=ROUND_HALF_UP), "f")
    return f"\\boxed{{{line}}}"


def printed_answer(stdout: str | None, reference: str, question: str) -> str | None:
    """The program's result as its answer is held to (`printed_result`), when it printed a plain number.

    A solution's answer step should restate what its program printed; a tiny or weak policy often
    writes some other number, and when that guess happens to be the reference the solution looks
    verified though its code computed something else. Only printed numbers are held to this: a
    symbolic result prints in Python's notation (`sqrt(2)/2`), which need not read as the same LaTeX.
    """
    last = last_printed_line(stdout)
    return printed_result(last, reference, question) if _PRINTED_NUMBER_RE.fullmatch(last) else None


# A program that catches its own exception and prints it (`except Exception as e: print("Error:", e)`)
# ran without raising but computed nothing: its step is dropped like one whose program raised.
_PRINTED_ERROR_RE = re.compile(
    r"^[ \t]*(?:Traceback \(most recent call last\):|(?:[A-Za-z_][\w.]*)?(?:Error|Exception)(?::|[ \t]*$))",
    re.MULTILINE,
)


def printed_error(stdout: str | None) -> str | None:
    """The first line of a program's output that reports an error (`Error: ...`, `ValueError: ...`, a
    traceback), stripped; None when it reports none."""
    match = _PRINTED_ERROR_RE.search(stdout or "")
    return stdout[match.start() :].splitlines()[0].strip() if match else None


def last_printed_line(stdout: str | None) -> str:
    """A program's result as solutions use it: the last line it printed, stripped; a whole float as an
    integer (12.0 -> 12), a float showing binary rounding rounded to PRINTED_FLOAT_DIGITS digits."""
    lines = (stdout or "").strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if not (_PRINTED_FLOAT_RE.fullmatch(last) and math.isfinite(value := float(last))):
        return last
    if value.is_integer() and abs(value) < 2**53:  # every such float is exactly its integer
        return str(int(value))
    shortest = repr(value)
    mantissa = shortest.lower().partition("e")[0].replace("-", "").replace(".", "").strip("0")
    return f"{value:.{PRINTED_FLOAT_DIGITS}g}" if len(mantissa) >= _NOISY_FLOAT_DIGITS else shortest


def verified(answer: AnswerGrade, printed: AnswerGrade | None) -> bool | None:
    """Whether a solution is verified correct: its answer equals the reference and so does the number its
    program printed (`printed` is None when nothing printed is held to the reference: `printed_answer`).
    None: the grader could not tell."""
    if answer.status not in JUDGED_STATUSES:
        return None
    if not answer.equal or printed is None:
        return bool(answer.equal)
    return bool(printed.equal) if printed.status in JUDGED_STATUSES else None


class PPMScoreError(ValueError):
    """The PPM scored a step NaN or infinite: the search cannot rank by it."""


def finite_scores(scores: Sequence[float]) -> list[float]:
    """The PPM's scores as floats; PPMScoreError, in one line, when any is NaN or infinite."""
    values = [float(score) for score in scores]
    broken = sum(not math.isfinite(value) for value in values)
    if broken:
        raise PPMScoreError(f"the PPM gave {broken} of {len(values)} texts a score that is not a finite number: "
                            "its checkpoint is broken (a diverged training run?); retrain it")
    return values


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    answer: str  # the reference; rollouts cannot label steps without one
    rollouts: int | None = None  # this problem's rollout budget, when not the search's (rStar-Math: more for hard ones)


@dataclass(frozen=True)
class RolloutProgress:
    """What the progress callback receives after every pass over the trees."""

    trees_done: int
    trees_total: int
    passes: int
    nodes: int
    tokens_generated: int


@dataclass
class RolloutStats:
    trees: int = 0
    trees_solved: int = field(default=0, metadata={"help": "trees with at least one correct answer node"})
    passes: int = field(default=0, metadata={"help": "rounds in which every group expanded its trees once"})
    generate_calls: int = 0
    expansions: int = field(default=0, metadata={"help": "prompts sent to the generator"})
    completions: int = 0
    tokens_generated: int = 0
    nodes: int = field(default=0, metadata={"help": "nodes in all trees, roots included"})
    programs_run: int = 0
    answers_graded: int = 0
    texts_scored: int = 0
    generate_seconds: float = field(default=0.0, metadata={"help": "wall time spent inside generate calls"})
    wall_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / self.wall_seconds if self.wall_seconds else 0.0


@dataclass
class RolloutResult:
    trees: list[Tree]
    stats: RolloutStats
    tokens_by_problem: dict[str, int] = field(default_factory=dict)  # tokens generated for each tree

    def node_rows(self, run: str, round: int) -> list[dict[str, object]]:
        return [row for tree in self.trees for row in tree.node_rows(run, round)]


@dataclass
class _Expansion:
    tree: Tree
    node: Node
    reference: str
    candidates: list[Candidate]


@dataclass
class _PendingBatch:
    expansions: list[_Expansion]
    evaluations: list[Future[None]]


def tree_rng(seed: int, problem_id: str) -> random.Random:
    """Each tree's own RNG, so a tree's search does not depend on which other problems run with it."""
    return random.Random(f"{seed}:{problem_id}")


def run_rollouts(
    problems: Sequence[Problem],
    config: MCTSConfig,
    *,
    generator: Generator,
    executor: Executor,
    checker: AnswerChecker,
    scorer: StepScorer | None = None,
    pipeline_groups: int = 2,
    on_progress: Callable[[RolloutProgress], None] | None = None,
) -> RolloutResult:
    """Run `config.rollouts` MCTS rollouts for every problem, all trees batched together.

    `pipeline_groups` = 1 evaluates each batch before generating the next (largest batches, no
    overlap); 2 overlaps one half's evaluation with the other half's generation. Answers are
    graded against the reference in every mode (the `correct` column); in test-time mode only
    the PPM's score of an answer is its reward.
    """
    _check_problems(problems)
    if config.uses_ppm and scorer is None:
        raise ValueError(f"{config.mode} search needs a PPM scorer")
    if pipeline_groups < 1:
        raise ValueError(f"pipeline_groups must be >= 1, got {pipeline_groups}")
    driver = _Driver(problems, config, generator, executor, checker, scorer, on_progress)
    return driver.run(pipeline_groups)


def _check_problems(problems: Sequence[Problem]) -> None:
    seen: set[str] = set()
    for problem in problems:
        if not problem.answer or not problem.answer.strip():
            raise ValueError(f"problem {problem.problem_id!r} has no reference answer")
        if problem.problem_id in seen:
            raise ValueError(f"problem id {problem.problem_id!r} appears twice")
        seen.add(problem.problem_id)


class _Driver:
    def __init__(
        self,
        problems: Sequence[Problem],
        config: MCTSConfig,
        generator: Generator,
        executor: Executor,
        checker: AnswerChecker,
        scorer: StepScorer | None,
        on_progress: Callable[[RolloutProgress], None] | None,
    ) -> None:
        self.config = config
        self.generator = generator
        self.executor = executor
        self.checker = checker
        self.scorer = scorer
        self.on_progress = on_progress
        self.trees = [
            Tree(p.problem_id, p.question, replace(config, rollouts=p.rollouts) if p.rollouts else config,
                 tree_rng(config.seed, p.problem_id))
            for p in problems
        ]
        self.references = {p.problem_id: p.answer for p in problems}
        self.stats = RolloutStats(trees=len(self.trees))
        self.tokens_by_problem = {tree.problem_id: 0 for tree in self.trees}

    def run(self, pipeline_groups: int) -> RolloutResult:
        started = time.perf_counter()
        group_count = max(1, min(pipeline_groups, len(self.trees)))
        group_size = math.ceil(len(self.trees) / group_count)
        groups = [self.trees[g::group_count] for g in range(group_count)]
        pending: list[_PendingBatch | None] = [None] * group_count
        with ThreadPoolExecutor(max_workers=2 * group_count, thread_name_prefix="kaizen-eval") as pool:
            while True:
                # As trees finish, calls shrink, and a small call generates far fewer tokens per
                # second than a full one. Once the unfinished trees fit in fewer groups of the
                # first size, every pending evaluation is applied and the groups are formed anew.
                unfinished = sum(not tree.finished for tree in self.trees)
                if len(groups) > 1 and math.ceil(unfinished / group_size) < len(groups):
                    for batch in pending:
                        if batch is not None:
                            self._apply(batch)
                    trees = [tree for tree in self.trees if not tree.finished]
                    group_count = max(1, math.ceil(len(trees) / group_size))
                    groups = [trees[g::group_count] for g in range(group_count)]
                    pending = [None] * group_count
                expanded_any = False
                for g, group in enumerate(groups):
                    batch = pending[g]
                    if batch is not None:
                        self._apply(batch)
                        pending[g] = None
                    expansions = self._generate(group)
                    if expansions:
                        expanded_any = True
                        pending[g] = self._submit_evaluation(pool, expansions)
                self.stats.passes += expanded_any
                self._report_progress()
                if not expanded_any:
                    break
        self.stats.nodes = sum(len(tree.nodes) for tree in self.trees)
        self.stats.trees_solved = sum(any(n.correct for n in tree.nodes) for tree in self.trees)
        self.stats.wall_seconds = time.perf_counter() - started
        return RolloutResult(self.trees, self.stats, self.tokens_by_problem)

    def _generate(self, trees: Sequence[Tree]) -> list[_Expansion]:
        """Select a node in every unfinished tree and sample all their candidates in one call."""
        selected = [(tree, node) for tree in trees if (node := tree.select()) is not None]
        if not selected:
            return []
        prompts = [tree.prompt(node) for tree, node in selected]
        started = time.perf_counter()
        outputs = self.generator.generate(
            prompts,
            n=self.config.width,
            stop=list(SEARCH_STOP),
            temperature=self.config.temperature,
            max_tokens=self.config.max_step_tokens,
        )
        self.stats.generate_seconds += time.perf_counter() - started
        if len(outputs) != len(prompts):
            raise RuntimeError(f"generator returned {len(outputs)} results for {len(prompts)} prompts")
        self.stats.generate_calls += 1
        self.stats.expansions += len(prompts)
        expansions = []
        for (tree, node), completions in zip(selected, outputs, strict=True):
            self.stats.completions += len(completions)
            tokens = sum(c.num_tokens for c in completions)
            self.stats.tokens_generated += tokens
            self.tokens_by_problem[tree.problem_id] += tokens
            candidates = tree.propose(node, [c.text for c in completions])
            expansions.append(_Expansion(tree, node, self.references[tree.problem_id], candidates))
        return expansions

    def _submit_evaluation(self, pool: ThreadPoolExecutor, expansions: list[_Expansion]) -> _PendingBatch:
        # The two jobs touch disjoint candidate fields; the main thread reads them only after both finish.
        return _PendingBatch(
            expansions,
            [pool.submit(self._run_programs_then_score, expansions), pool.submit(self._grade_answers, expansions)],
        )

    def _run_programs_then_score(self, expansions: Sequence[_Expansion]) -> None:
        runnable = [(c, c.program) for e in expansions for c in e.candidates if c.program is not None]
        if runnable:
            results = self.executor.run_many([program for _, program in runnable])
            for (candidate, _), result in zip(runnable, results, strict=True):
                reported = printed_error(result.stdout) if result.ok else None
                candidate.program_ok, candidate.output = result.ok and reported is None, result.stdout
                candidate.error = result.error if not result.ok else reported
        # Which candidates the PPM scores depends on their kind, known only once the programs ran.
        to_score = [(e, c) for e in expansions for c in e.candidates if e.tree.needs_ppm_score(c)]
        if to_score:
            assert self.scorer is not None
            # NaN would stall selection (no child is the best) or spread up the tree.
            scores = finite_scores(self.scorer.score([e.tree.scoring_text(e.node, c) for e, c in to_score]))
            for (_, candidate), score in zip(to_score, scores, strict=True):
                candidate.ppm_score = score

    def _grade_answers(self, expansions: Sequence[_Expansion]) -> None:
        answers = [(e, c) for e in expansions for c in e.candidates if c.parsed.kind is StepKind.ANSWER]
        if not answers:
            return
        # An answer follows the final code step being expanded, whose real output the policy was shown.
        printed = [printed_answer(e.node.output, e.reference, e.tree.question) for e, _ in answers]
        pairs = [(c.parsed.answer_text or "", e.reference) for e, c in answers]
        pairs += [(text, e.reference) for (e, _), text in zip(answers, printed, strict=True) if text is not None]
        grades = self.checker.grade_many(pairs)
        printed_grades = iter(grades[len(answers) :])
        for (_, candidate), grade, text in zip(answers, grades[: len(answers)], printed, strict=True):
            # A timeout or checker failure says nothing about the answer: no reward rather than -1.
            candidate.correct = verified(grade, next(printed_grades) if text is not None else None)
            candidate.answer = grade.pred_answer

    def _apply(self, batch: _PendingBatch) -> None:
        for evaluation in batch.evaluations:
            evaluation.result()
        for expansion in batch.expansions:
            expansion.tree.expand(expansion.node, expansion.candidates)
            for candidate in expansion.candidates:
                self.stats.programs_run += candidate.program is not None
                self.stats.answers_graded += candidate.parsed.kind is StepKind.ANSWER
                self.stats.texts_scored += candidate.ppm_score is not None

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        self.on_progress(
            RolloutProgress(
                trees_done=sum(tree.finished for tree in self.trees),
                trees_total=len(self.trees),
                passes=self.stats.passes,
                nodes=sum(len(tree.nodes) for tree in self.trees),
                tokens_generated=self.stats.tokens_generated,
            )
        )
