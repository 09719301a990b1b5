"""The rollout driver on a toy environment: a scripted policy, an in-process executor, a boxed-answer checker.

The toy problem is "2 + 3": step 1 picks a = 2 or a = 7, step 2 adds three, multiplies by three or
divides by zero, and the final step prints b. Exactly one path gives the reference answer 5.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from search.mcts import MCTSConfig, Node, NodeKind, SearchMode, Tree
from search.policy import Completion, StepScorer, with_worked_examples
from search.rollout import (
    AnswerChecker,
    Executor,
    PPMScoreError,
    Problem,
    RolloutProgress,
    RolloutResult,
    printed_answer,
    printed_error,
    run_rollouts,
    verified,
)
from search.steps import END_OF_STEP, WORKED_EXAMPLES, render_prompt, render_worked_examples

QUESTION = "What is 2 + 3?"
FIRST_STEPS = [
    "# Step 1: start from two\na = 2\n<end_of_step>",
    "# Step 1: start from seven\na = 7\n<end_of_step>",
]
SECOND_STEPS = [
    "# Step 2: add three\nb = a + 3\n<end_of_step>",
    "# Step 2: multiply by three\nb = a * 3\n<end_of_step>",
    "# Step 2: divide by nothing\nb = a / 0\n<end_of_step>",
]
FINAL_STEP = "# Now print the final answer\nprint(b)\n<end_of_code>"
ENDLESS_STEP = "# Step: keep going\nx = 1\n<end_of_step>"
TOY_MENUS = (FIRST_STEPS, SECOND_STEPS, [FINAL_STEP])


class ScriptedPolicy:
    """Offers a fixed menu of steps per depth (in a seeded order) and boxes whatever the program printed."""

    def __init__(self, menus: Sequence[Sequence[str]] = TOY_MENUS, seed: int = 0) -> None:
        self.menus = menus
        self.rng = random.Random(seed)
        self.calls: list[list[str]] = []
        self.tokens = 0

    def generate(
        self, prompts: Sequence[str], *, n: int, stop: Sequence[str], temperature: float, max_tokens: int
    ) -> list[list[Completion]]:
        self.calls.append(list(prompts))
        results = [[Completion(text, len(text.split())) for text in self._continue(p, n)] for p in prompts]
        self.tokens += sum(c.num_tokens for completions in results for c in completions)
        return results

    def _continue(self, prompt: str, n: int) -> list[str]:
        printed = re.search(r"<output>(.*)<end_of_output>\n$", prompt, re.S)
        if printed:
            return [f"<answer>The result is \\boxed{{{printed.group(1)}}}.<end_of_answer>"] * n
        menu = self.menus[min(prompt.count(END_OF_STEP), len(self.menus) - 1)]
        order = self.rng.sample(list(menu), len(menu))
        return [order[i % len(order)] for i in range(n)]


@dataclass(frozen=True)
class ToyResult:
    ok: bool
    stdout: str
    error: str | None = None


class InProcessExecutor:
    """Runs the scripted toy programs with exec: acceptable for these fixed test programs only."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run_many(self, programs: Sequence[str]) -> list[ToyResult]:
        self.calls.append(list(programs))
        return [self._run(program) for program in programs]

    @staticmethod
    def _run(program: str) -> ToyResult:
        printed: list[str] = []
        try:
            exec(program, {"print": lambda *values: printed.append(" ".join(map(str, values)) + "\n")})
        except Exception as error:
            return ToyResult(False, "".join(printed), f"{type(error).__name__}: {error}")
        return ToyResult(True, "".join(printed))


@dataclass(frozen=True)
class ToyGrade:
    equal: bool
    pred_answer: str | None
    status: str = "ok"


class BoxedChecker:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[ToyGrade]:
        self.calls.append(list(pairs))
        boxed = [re.search(r"\\boxed\{([^}]*)\}", text) for text, _ in pairs]
        answers = [match.group(1) if match else None for match in boxed]
        return [ToyGrade(answer == gold, answer) for answer, (_, gold) in zip(answers, pairs, strict=True)]


class TimingOutChecker:
    """A grader whose every check times out (its `equal` is False, as the real grader reports it)."""

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[ToyGrade]:
        return [ToyGrade(False, None, "timeout") for _ in pairs]


class StepPreferringScorer:
    """A stand-in PPM that likes steps starting from two."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        self.calls.append(list(texts))
        return [0.5 if "a = 2" in text else -0.5 for text in texts]


def toy_problems(count: int) -> list[Problem]:
    return [Problem(f"toy-{i}", f"{QUESTION} (copy {i})", "5") for i in range(count)]


def search(
    problems: Sequence[Problem],
    config: MCTSConfig,
    policy: ScriptedPolicy | None = None,
    *,
    executor: Executor | None = None,
    checker: AnswerChecker | None = None,
    scorer: StepScorer | None = None,
    pipeline_groups: int = 2,
    on_progress: Callable[[RolloutProgress], None] | None = None,
) -> RolloutResult:
    return run_rollouts(
        problems,
        config,
        generator=policy or ScriptedPolicy(),
        executor=executor or InProcessExecutor(),
        checker=checker or BoxedChecker(),
        scorer=scorer,
        pipeline_groups=pipeline_groups,
        on_progress=on_progress,
    )


def greedy_path(tree: Tree) -> list[Node]:
    node, path = tree.root, []
    while node.children:
        node = max(node.children, key=lambda child: child.q_value)
        path.append(node)
    return path


def expansions_per_tree(tree: Tree) -> int:
    return sum(bool(node.children) for node in tree.nodes)


# -- the search on the toy problem ------------------------------------------------------------------


def test_search_finds_the_known_best_path() -> None:
    [tree] = search(toy_problems(1), MCTSConfig(width=3, rollouts=16)).trees
    path = greedy_path(tree)
    assert [node.code.splitlines()[-1] for node in path[:-1]] == ["a = 2", "b = a + 3", "print(b)"]
    assert (path[-1].kind, path[-1].answer, path[-1].correct) == (NodeKind.ANSWER, "5", True)


def test_search_records_wrong_answers_and_failed_programs() -> None:
    [tree] = search(toy_problems(1), MCTSConfig(width=3, rollouts=16)).trees
    outcomes = Counter((node.kind, node.correct) for node in tree.nodes if node.is_terminal)
    assert outcomes == {(NodeKind.ANSWER, True): 1, (NodeKind.ANSWER, False): 3, (NodeKind.ERROR, None): 2}


def test_answers_the_grader_could_not_judge_are_neither_right_nor_wrong() -> None:
    [tree] = search(toy_problems(1), MCTSConfig(width=3, rollouts=4), checker=TimingOutChecker()).trees
    answers = [node for node in tree.nodes if node.kind is NodeKind.ANSWER]
    assert answers and {(node.correct, node.visits) for node in answers} == {(None, 0)}
    assert tree.root.visits == 0


def test_same_seeds_replay_exactly() -> None:
    def rows() -> list[dict[str, object]]:
        config = MCTSConfig(width=2, rollouts=3, seed=7)
        result = search(toy_problems(3), config, ScriptedPolicy(seed=1), pipeline_groups=2)
        return result.node_rows("run", 1)

    assert rows() == rows()


def test_endless_steps_stop_at_max_depth_as_depth_limit_nodes() -> None:
    [tree] = search(toy_problems(1), MCTSConfig(width=2, max_depth=3), ScriptedPolicy([[ENDLESS_STEP]])).trees
    assert max(node.depth for node in tree.nodes) == 3
    assert {node.kind for node in tree.nodes if node.depth == 3} == {NodeKind.DEPTH_LIMIT}
    assert tree.finished


def test_ppm_mode_initialises_new_steps_with_the_scorer() -> None:
    scorer = StepPreferringScorer()
    [tree] = search(toy_problems(1), MCTSConfig(width=3, rollouts=1, mode=SearchMode.PPM), scorer=scorer).trees
    first_steps = {node.code.splitlines()[-1]: node.ppm_score for node in tree.root.children}
    assert first_steps == {"a = 2": 0.5, "a = 7": -0.5}


def test_ppm_augmented_search_leaves_answers_to_the_reference_not_the_ppm() -> None:
    scorer = StepPreferringScorer()
    result = search(toy_problems(1), MCTSConfig(width=3, rollouts=4, mode=SearchMode.PPM), scorer=scorer)
    answers = [row for row in result.node_rows("run", 1) if row["kind"] == "answer"]
    assert answers and all(row["ppm_score"] is None for row in answers)
    assert not any(text.endswith("<end_of_answer>\n") for texts in scorer.calls for text in texts)


def test_a_ppm_score_that_is_not_a_number_stops_the_search_naming_the_ppm() -> None:
    class BrokenScorer:
        def score(self, texts: Sequence[str]) -> list[float]:
            return [float("nan")] * len(texts)

    with pytest.raises(PPMScoreError, match="not a finite number: its checkpoint is broken"):
        search(toy_problems(1), MCTSConfig(width=2, rollouts=1, mode=SearchMode.PPM), scorer=BrokenScorer())


def test_ppm_mode_without_a_scorer_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a PPM scorer"):
        search(toy_problems(1), MCTSConfig(mode=SearchMode.PPM))


def test_problem_without_reference_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'no-ref'"):
        search([Problem("no-ref", QUESTION, " ")], MCTSConfig())


def test_a_problem_id_given_twice_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'twice' appears twice"):
        search([Problem("twice", QUESTION, "5")] * 2, MCTSConfig())


def test_trees_solved_counts_only_trees_that_reached_a_correct_answer() -> None:
    # No path of the toy problem prints 4: the second tree reaches only wrong answers.
    result = search([Problem("solvable", QUESTION, "5"), Problem("unsolvable", QUESTION, "4")],
                    MCTSConfig(width=3, rollouts=16))
    assert any(node.correct is False for node in result.trees[1].nodes)
    assert result.stats.trees_solved == 1


# -- the nodes table --------------------------------------------------------------------------------


def own_value(row: dict[str, Any]) -> tuple[int, float]:
    """The visit and value a node holds on its own, not backed up through it: a PPM-initialised step's
    score, or the -1 of a node that cannot continue."""
    if row["kind"] == "step" and row["ppm_score"] is not None:
        return 1, row["ppm_score"]
    if row["kind"] in ("error", "depth_limit"):
        return 1, -1.0
    return 0, 0.0


def check_tree_invariants(rows: list[dict[str, Any]]) -> None:
    by_id = {row["node_id"]: row for row in rows}
    children: dict[int, list[dict[str, Any]]] = {node_id: [] for node_id in by_id}
    for row in rows:
        if row["parent_id"] != -1:
            children[row["parent_id"]].append(row)
    [root] = [row for row in rows if row["parent_id"] == -1]
    assert (root["node_id"], root["kind"], root["depth"]) == (0, "root", 0)
    for row in rows:
        if row["parent_id"] != -1:
            assert by_id[row["parent_id"]]["depth"] == row["depth"] - 1
        kids = children[row["node_id"]]
        if not kids:
            continue
        # Every back-propagated visit of a parent came through exactly one child.
        row_visits, row_value = own_value(row)
        kids_own_visits = sum(own_value(kid)[0] for kid in kids)
        kids_own_value = sum(own_value(kid)[1] for kid in kids)
        assert row["visits"] - row_visits == sum(kid["visits"] for kid in kids) - kids_own_visits
        value = row["q_value"] * row["visits"] - row_value
        kids_value = sum(kid["q_value"] * kid["visits"] for kid in kids) - kids_own_value
        assert value == pytest.approx(kids_value)


def test_terminal_guided_tree_rows_are_consistent() -> None:
    result = search(toy_problems(2), MCTSConfig(width=3, rollouts=4))
    for tree in result.trees:
        check_tree_invariants(tree.node_rows("run", 1))


def test_ppm_augmented_tree_rows_are_consistent() -> None:
    config = MCTSConfig(width=3, rollouts=4, mode=SearchMode.PPM)
    result = search(toy_problems(2), config, scorer=StepPreferringScorer())
    for tree in result.trees:
        check_tree_invariants(tree.node_rows("run", 1))


# -- batching across trees --------------------------------------------------------------------------


def test_one_generate_call_per_pass_serves_every_unfinished_tree() -> None:
    policy = ScriptedPolicy()
    result = search(toy_problems(5), MCTSConfig(width=2, rollouts=3), policy, pipeline_groups=1)
    expansions = [expansions_per_tree(tree) for tree in result.trees]
    assert [len(prompts) for prompts in policy.calls] == [
        sum(count > i for count in expansions) for i in range(max(expansions))
    ]


def test_each_pass_runs_all_programs_in_one_executor_call() -> None:
    executor = InProcessExecutor()
    policy = ScriptedPolicy()
    result = search(toy_problems(5), MCTSConfig(width=3, rollouts=3), policy, executor=executor, pipeline_groups=1)
    code_passes = sum(any(not p.endswith("<end_of_output>\n") for p in prompts) for prompts in policy.calls)
    assert len(executor.calls) == code_passes
    assert sum(map(len, executor.calls)) == result.stats.programs_run


def test_each_pass_grades_all_answers_in_one_checker_call() -> None:
    checker = BoxedChecker()
    policy = ScriptedPolicy()
    result = search(toy_problems(5), MCTSConfig(width=3, rollouts=3), policy, checker=checker, pipeline_groups=1)
    answer_passes = sum(any(p.endswith("<end_of_output>\n") for p in prompts) for prompts in policy.calls)
    assert len(checker.calls) == answer_passes
    # Each answer once, and the number its program printed (the scripted programs all print one).
    assert sum(map(len, checker.calls)) == 2 * result.stats.answers_graded


def test_trees_left_over_from_two_groups_share_one_call() -> None:
    class QuickToFailPolicy(ScriptedPolicy):
        """Problems marked quick get only a failing final step, so their trees end after one pass."""

        def _continue(self, prompt: str, n: int) -> list[str]:
            return [FINAL_STEP] * n if "(quick)" in prompt else super()._continue(prompt, n)

    problems = [Problem(f"quick-{i}", f"{QUESTION} (quick)", "5") for i in range(4)] + toy_problems(2)
    policy = QuickToFailPolicy()
    search(problems, MCTSConfig(width=2, rollouts=3), policy, pipeline_groups=2)
    # The two slow trees start in different groups (trees are dealt round-robin), so only
    # re-forming the groups once the quick ones are done puts them into one call.
    assert ["(copy 0)" in p for p in policy.calls[0]] == [False, False, True]
    assert any(len(prompts) == 2 and not any("(quick)" in p for p in prompts) for prompts in policy.calls)


def test_program_execution_overlaps_the_next_groups_generation() -> None:
    executing, executed, generated_meanwhile = threading.Event(), threading.Event(), threading.Event()

    class BlockingExecutor(InProcessExecutor):
        """Holds the first batch of programs until a generation starts (or a generous deadline)."""

        def run_many(self, programs: Sequence[str]) -> list[ToyResult]:
            executing.set()
            generated_meanwhile.wait(timeout=10)
            executed.set()
            return super().run_many(programs)

    class WatchingPolicy(ScriptedPolicy):
        overlapped = False

        def generate(
            self, prompts: Sequence[str], *, n: int, stop: Sequence[str], temperature: float, max_tokens: int
        ) -> list[list[Completion]]:
            if len(self.calls) == 1:  # the second group's first call, right after the first group's
                self.overlapped = executing.wait(timeout=10) and not executed.is_set()
                generated_meanwhile.set()
            return super().generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens)

    policy = WatchingPolicy()
    search(toy_problems(2), MCTSConfig(width=2, rollouts=1), policy, executor=BlockingExecutor(), pipeline_groups=2)
    assert policy.overlapped


def test_stats_count_every_generated_token() -> None:
    policy = ScriptedPolicy()
    result = search(toy_problems(3), MCTSConfig(width=3, rollouts=2), policy)
    assert result.stats.tokens_generated == policy.tokens > 0


def test_progress_callback_ends_with_every_tree_done() -> None:
    reports: list[RolloutProgress] = []
    result = search(toy_problems(3), MCTSConfig(width=2, rollouts=2), on_progress=reports.append)
    assert [r.trees_done for r in reports] == sorted(r.trees_done for r in reports)
    assert (reports[-1].trees_done, reports[-1].trees_total, reports[-1].nodes) == (3, 3, result.stats.nodes)


# -- the real sandbox and grader --------------------------------------------------------------------


@pytest.mark.slow
def test_real_sandbox_and_grader_find_the_toy_answer() -> None:
    sandbox = pytest.importorskip("search.sandbox")
    grading = pytest.importorskip("search.grading")
    try:
        executor = sandbox.Sandbox(sandbox.SandboxConfig(workers=1))
    except sandbox.SandboxUnavailable as unavailable:
        pytest.skip(f"no sandbox on this machine: {unavailable}")
    with executor, grading.Grader(workers=1, timeout_s=10) as checker:
        result = search(toy_problems(2), MCTSConfig(width=3, rollouts=16), executor=executor, checker=checker)
    assert result.stats.trees_solved == 2
    assert all(greedy_path(tree)[-1].correct for tree in result.trees)


def test_error_nodes_record_why_they_failed() -> None:
    """The sandbox's error text is kept on the node, so mining can say why a branch failed."""
    result = search(toy_problems(1), MCTSConfig(width=3, rollouts=16))
    errors = [row for row in result.node_rows("run", 1) if row["kind"] == "error"]
    assert errors and all(row["error"] for row in errors)


# --- verification: the answer must restate what the program printed ----------------------------


class GuessingPolicy(ScriptedPolicy):
    """Answers the reference whatever its program printed, as a tiny policy that learnt the answers' look does."""

    def _continue(self, prompt: str, n: int) -> list[str]:
        if prompt.endswith("<end_of_output>\n"):
            return ["<answer>The result is \\boxed{5}.<end_of_answer>"] * n
        return super()._continue(prompt, n)


def answers_with_printed(result: RolloutResult) -> list[tuple[bool | None, str]]:
    return [(node.correct, tree.nodes[node.parent_id].output or "")
            for tree in result.trees for node in tree.nodes if node.kind is NodeKind.ANSWER]


def test_a_right_answer_after_a_program_that_printed_another_number_is_not_verified() -> None:
    result = search(toy_problems(3), MCTSConfig(width=3, rollouts=6), GuessingPolicy())
    answers = answers_with_printed(result)
    assert any(printed.strip() != "5" for _, printed in answers)  # the search did reach wrong programs
    assert all(correct == (printed.strip() == "5") for correct, printed in answers)


def test_a_right_answer_whose_printed_number_the_grader_timed_out_on_has_no_verdict() -> None:
    assert verified(ToyGrade(True, "5"), ToyGrade(False, "5", "timeout")) is None


def test_a_program_that_printed_no_number_leaves_the_answer_to_decide() -> None:
    """Symbolic results print in Python's notation, which need not read as the reference's LaTeX."""
    menus = (["# Step 1: name it\nb = 'sqrt(25)'\n<end_of_step>"], [FINAL_STEP])
    result = search(toy_problems(1), MCTSConfig(width=1, rollouts=1), GuessingPolicy(menus))
    assert answers_with_printed(result) == [(True, "sqrt(25)\n")]


@pytest.mark.parametrize("printed", ["5", "-3", "2.5", "0.5", "1e-06", "7/2", "  12  \n"])
def test_printed_numbers_are_held_to_the_reference(printed: str) -> None:
    assert printed_answer(f"some line\n{printed}", "5", QUESTION) == f"\\boxed{{{printed.strip()}}}"


@pytest.mark.parametrize("printed", ["", "sqrt(2)/2", "x = 5", "(1, 2)", "5 apples", "[5]"])
def test_printed_non_numbers_are_not(printed: str) -> None:
    assert printed_answer(printed, "5", QUESTION) is None


@pytest.mark.parametrize("printed, shown", [("2.0999999999999996", "2.1"), ("56.99999999999999", "57"),
                                            ("0.30000000000000004", "0.3"), ("2.50", "2.5")])
def test_a_printed_float_is_held_to_twelve_significant_digits(printed: str, shown: str) -> None:
    assert printed_answer(printed, "5", QUESTION) == f"\\boxed{{{shown}}}"


@pytest.mark.parametrize("printed, shown", [("1234567890123.0", "1234567890123"), ("123456789012.5", "123456789012.5")])
def test_a_printed_float_without_binary_rounding_keeps_every_digit(printed: str, shown: str) -> None:
    assert printed_answer(printed, "5", QUESTION) == f"\\boxed{{{shown}}}"


@pytest.mark.parametrize("reference", ["2, 3", "\\text{(C)}", "(1, 2)", "\\{1, 2\\}"])
def test_a_reference_of_several_values_or_a_choice_is_not_held_to_one_printed_number(reference: str) -> None:
    assert printed_answer("2\n3", reference, QUESTION) is None


@pytest.mark.parametrize("reference", ["\\text{Evelyn}", "\\text{even}", "x^2+7x+10", "\\infty", "2\\sqrt{3}"])
def test_a_reference_that_is_not_a_plain_number_is_not_held_to_a_printed_number(reference: str) -> None:
    """A correct program for "which is even?" or "expand (x+2)(x+5)" need not print the answer's words."""
    assert printed_answer("10", reference, QUESTION) is None


@pytest.mark.parametrize("reference", ["\\frac{7}{2}", "x = 5", "\\$5", "10\\text{ inches}"])
def test_a_plain_number_written_with_a_fraction_unit_or_name_is_held(reference: str) -> None:
    assert printed_answer("5", reference, QUESTION) == "\\boxed{5}"


@pytest.mark.parametrize("printed, reference, shown", [("7.0710678118654755", "7.07", "7.07"), ("12.5", "13", "13"),
                                                       ("-2.25", "-2.3", "-2.3"), ("12", "13", "12")])
def test_where_the_question_asks_for_rounding_a_printed_decimal_is_rounded_to_the_reference(
    printed: str, reference: str, shown: str
) -> None:
    question = "What is the diagonal? Express your answer as a decimal to the nearest hundredth."
    assert printed_answer(printed, reference, question) == f"\\boxed{{{shown}}}"


@pytest.mark.parametrize("question", [QUESTION, "Seven people sit at a round table. How many seats?",
                                      "How far is the nearest vertex?", "Round trips cost 5 dollars each."])
def test_where_the_question_does_not_ask_for_rounding_a_printed_decimal_is_held_as_printed(question: str) -> None:
    assert printed_answer("12.5", "13", question) == "\\boxed{12.5}"


@pytest.mark.parametrize("question", ["Round your answer to the nearest whole number.", "Give it to two decimal places.",
                                      "The result, rounded to the nearest ten-thousandth.", "Express it to the nearest cent."])
def test_the_usual_ways_of_asking_for_rounding_are_recognised(question: str) -> None:
    assert printed_answer("12.5", "13", question) == "\\boxed{13}"


@pytest.mark.parametrize("stdout", ["Error: division by zero\n", "5\nZeroDivisionError: division by zero\n",
                                    "Traceback (most recent call last):\n  File x\n", "  ValueError\n",
                                    "numpy.linalg.LinAlgError: Singular matrix\n"])
def test_a_printed_error_is_reported(stdout: str) -> None:
    assert printed_error(stdout) == next(line.strip() for line in stdout.splitlines()
                                         if "Error" in line or "Traceback" in line)


@pytest.mark.parametrize("stdout", ["5\n", "Error rate: 0.05\n", "Errors: 3\n", "the error is 2\n", "", None])
def test_output_that_reports_no_error_is_not_taken_for_one(stdout: str | None) -> None:
    assert printed_error(stdout) is None


def test_a_step_whose_program_prints_an_error_is_dropped_like_one_that_raises() -> None:
    """rStar drops a step whose program prints an error: catching the exception computed nothing."""
    catching = "# Step 2: divide, carefully\ntry:\n    b = a / 0\nexcept Exception as e:\n    print('Error:', e)\n<end_of_step>"
    menus = ([FIRST_STEPS[0]], [catching], [FINAL_STEP])
    result = search(toy_problems(1), MCTSConfig(width=1, rollouts=2), ScriptedPolicy(menus))
    caught = [row for row in result.node_rows("run", 1) if row["step"].startswith("# Step 2")]
    assert [(row["kind"], row["error"]) for row in caught] == [("error", "Error: division by zero")]


def test_a_right_answer_after_a_float_printed_with_binary_rounding_is_verified() -> None:
    class WritesTwoPointOne(ScriptedPolicy):
        def _continue(self, prompt: str, n: int) -> list[str]:
            if prompt.endswith("<end_of_output>\n"):
                return ["<answer>The pens cost \\boxed{2.1}.<end_of_answer>"] * n
            return super()._continue(prompt, n)

    menus = (["# Step 1: price\nb = 3 * 0.7\n<end_of_step>"], [FINAL_STEP])
    result = search([Problem("p0", "3 pens at 0.70 each?", "2.1")], MCTSConfig(width=1, rollouts=1),
                    WritesTwoPointOne(menus))
    assert answers_with_printed(result) == [(True, "2.0999999999999996\n")]


# --- worked examples: shown to the policy, never stored -----------------------------------------


def test_a_policy_shown_worked_examples_reads_them_before_every_prompt() -> None:
    policy, [problem] = ScriptedPolicy(), toy_problems(1)
    search([problem], MCTSConfig(width=2, rollouts=2), with_worked_examples(policy, 2))
    assert policy.calls and all(prompt.startswith(render_worked_examples(2) + render_prompt(problem.question))
               for call in policy.calls for prompt in call)


def test_worked_examples_stay_out_of_the_trees_and_the_ppms_texts() -> None:
    scorer = StepPreferringScorer()
    result = search(toy_problems(1), MCTSConfig(width=2, rollouts=3, mode=SearchMode.PPM),
                    with_worked_examples(ScriptedPolicy(), 2), scorer=scorer)
    example_question = WORKED_EXAMPLES[0][0]
    assert not any(example_question in text for call in scorer.calls for text in call)
    assert not any(example_question in (row["step"] or "") for row in result.node_rows("run", 1))


def test_no_worked_examples_leaves_the_generator_as_it_is() -> None:
    policy = ScriptedPolicy()
    assert with_worked_examples(policy, 0) is policy


def test_a_problem_with_its_own_rollout_budget_is_searched_that_many_times() -> None:
    usual, [hard] = toy_problems(1), [Problem("hard", QUESTION, "5", rollouts=3)]
    result = search(usual + [hard], MCTSConfig(width=3, rollouts=1))
    assert [tree.rollouts_done for tree in result.trees] == [1, 3]
