"""Chain-of-action-thought: rendering and parsing, rollbacks, the sandbox and grader on COAT solutions,
and format-tuning rows built from a stored search tree."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_store.rl_prompts import coat_sft_rows
from models.rl import FormatReward, OutcomeReward, SolutionJudge
from search.coat import (
    COAT_TOKENS,
    CoatFormatError,
    CoatStep,
    MetaAction,
    as_coat_step,
    astro_backtrack,
    continue_steps,
    final_answer,
    live_path,
    meta_step,
    missing_coat_tokens,
    parse_coat_solution,
    parse_coat_trajectory,
    render_coat_solution,
    solution_program,
    step_program,
)
from search.grading import Grader
from search.sandbox import Sandbox, SandboxConfig
from search.steps import SolutionStep, StepKind, parse_step, render_prompt

QUESTION = "Twelve apples are shared by two children. How many does each get?"
APPLES = SolutionStep("# Step 1: Count the apples\napples = 3 * 4\n<end_of_step>")
BAD_SHARE = SolutionStep("# Step 2: Share them\nshare = apples / 0\n<end_of_step>")
SHARE = SolutionStep("# Step 2: Share them between two\nshare = apples // 2\n<end_of_step>")
PRINT = SolutionStep("# Now print the final answer\nprint(share)\n<end_of_code>", output="6")
ANSWER = SolutionStep("<answer>Each child gets \\boxed{6} apples.<end_of_answer>")
WRONG_PRINT = SolutionStep("# Now print the final answer\nprint(apples)\n<end_of_code>", output="12")
WRONG_ANSWER = SolutionStep("<answer>Each child gets \\boxed{12} apples.<end_of_answer>")


def reflective_solution() -> list[CoatStep]:
    """Fails, reflects back to step 1, reaches a wrong answer, explores back to step 2, ends correct."""
    return [
        *continue_steps([APPLES, BAD_SHARE]),
        meta_step(MetaAction.REFLECT, "running this code fails with ZeroDivisionError: division by zero", 1),
        *continue_steps([SHARE, WRONG_PRINT, WRONG_ANSWER]),
        meta_step(MetaAction.EXPLORE, "the answer 12 does not check out", 2),
        *continue_steps([PRINT, ANSWER]),
    ]


@pytest.fixture(scope="module")
def judge() -> SolutionJudge:
    with Sandbox(SandboxConfig(workers=1)) as sandbox, Grader(workers=1) as grader:
        yield SolutionJudge(sandbox, grader, step_format="coat")


def test_rendered_solution_parses_back_to_the_same_steps() -> None:
    steps = reflective_solution()
    assert parse_coat_solution(render_coat_solution(steps)) == steps


def test_every_step_starts_with_a_meta_action_token() -> None:
    rendered = render_coat_solution(reflective_solution())
    blocks = [block for block in rendered.split("\n") if block.startswith(tuple(COAT_TOKENS))]
    assert len(blocks) == len(reflective_solution())


def test_rollbacks_keep_the_steps_they_name() -> None:
    assert live_path(reflective_solution()) == [APPLES, SHARE, PRINT, ANSWER]


def test_a_meta_step_without_a_target_drops_only_the_latest_step() -> None:
    reflect = CoatStep(MetaAction.REFLECT, SolutionStep("# Reflect: that step is wrong.\n<end_of_step>"))
    assert live_path([*continue_steps([APPLES, BAD_SHARE]), reflect]) == [APPLES]


def test_a_meta_step_goes_back_to_the_last_step_it_names() -> None:
    # The reason comes first and may quote another target; the step's own target closes it.
    text = "<|reflect|># Reflect: the hint said back to step 3; that fails. Back to step 1.\n<end_of_step>"
    assert as_coat_step(text).back_to == 1


def test_a_meta_step_that_starts_over_runs_its_comment_alone() -> None:
    reflect = meta_step(MetaAction.REFLECT, "counting is wrong", 0)
    assert step_program([*continue_steps([APPLES]), reflect]) == "# Reflect: counting is wrong. Back to step 0.\n"


def test_program_and_answer_come_from_the_live_path() -> None:
    live = live_path(reflective_solution())
    assert "/ 0" not in solution_program(live) and "print(apples)" not in solution_program(live)
    assert final_answer(live) == "Each child gets \\boxed{6} apples."


def test_text_before_the_first_token_is_rejected() -> None:
    with pytest.raises(CoatFormatError, match="before the first meta-action token"):
        parse_coat_solution(APPLES.text + "\n" + render_coat_solution(continue_steps([ANSWER])))


def test_a_token_followed_by_two_steps_is_rejected() -> None:
    text = MetaAction.CONTINUE.value + APPLES.text + "\n" + SHARE.text + "\n"
    with pytest.raises(CoatFormatError, match="exactly one step"):
        parse_coat_solution(text)


def test_trajectory_parses_into_question_and_steps() -> None:
    question, steps = parse_coat_trajectory(render_prompt(QUESTION) + render_coat_solution(reflective_solution()))
    assert question == QUESTION and steps == reflective_solution()


def test_missing_tokens_are_named() -> None:
    assert missing_coat_tokens(["<|continue|>", "<|explore|>"]) == ["<|reflect|>"]


def test_coat_solution_runs_in_the_sandbox_and_grades_correct(judge: SolutionJudge) -> None:
    verdict = judge.judge([render_prompt(QUESTION)], [render_coat_solution(reflective_solution())], ["6"])[0]
    assert verdict.correct and verdict.answer == "6"


def test_coat_outcome_reward_sees_the_failed_step_only_when_not_rolled_back(judge: SolutionJudge) -> None:
    without_reflection = render_coat_solution(continue_steps([APPLES, BAD_SHARE, PRINT, ANSWER]))
    rewards = OutcomeReward(judge)([render_prompt(QUESTION)] * 2,
                                   [render_coat_solution(reflective_solution()), without_reflection], answer=["6", "6"])
    assert rewards == [1.0, -1.0]


def test_plain_steps_are_not_well_formed_coat() -> None:
    plain = APPLES.text + "\n" + ANSWER.text
    assert FormatReward("coat")([render_prompt(QUESTION)], [plain]) == [0.0]


# --- format tuning rows from a stored tree --------------------------------------------------------


def node(node_id: int, parent_id: int, depth: int, step: SolutionStep | None, kind: str = "step", q: float = 0.0,
         **extra: object) -> dict:
    return {"run": "r", "round": 1, "problem_id": "p1", "node_id": node_id, "parent_id": parent_id, "depth": depth,
            "step": step.text if step else "", "code": None, "output": step.output if step else None,
            "error": extra.get("error"), "kind": kind, "answer": extra.get("answer"), "correct": extra.get("correct"),
            "visits": 1, "q_value": q, "ppm_score": None}


@pytest.fixture(scope="module")
def tree_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root -> apples -> {bad share (sandbox error), share -> {print apples -> 12 (wrong), print share -> 6}}."""
    rows = [
        node(0, -1, 0, None, kind="root"),
        node(1, 0, 1, APPLES, q=0.5),
        node(2, 1, 2, BAD_SHARE, kind="error", q=-1.0, error="Traceback\nZeroDivisionError: division by zero"),
        node(3, 1, 2, SHARE, q=0.5),
        node(4, 3, 3, WRONG_PRINT, q=-1.0),
        node(5, 4, 4, WRONG_ANSWER, kind="answer", q=-1.0, answer="12", correct=False),
        node(6, 3, 3, PRINT, q=1.0),
        node(7, 6, 4, ANSWER, kind="answer", q=1.0, answer="6", correct=True),
    ]
    path = tmp_path_factory.mktemp("nodes") / "nodes.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def problems() -> pa.Table:
    return pa.table({"problem_id": ["p1"], "problem": [QUESTION], "answer": ["6"]})


def test_format_tuning_explores_after_the_deepest_wrong_branch(tree_file: Path) -> None:
    (row,) = coat_sft_rows([tree_file], problems()).to_pylist()
    actions = [step.action for step in parse_coat_solution(row["completion"])]
    assert actions == [MetaAction.CONTINUE] * 3 + [MetaAction.EXPLORE] + [MetaAction.CONTINUE] * 2


def test_format_tuning_explores_right_after_the_wrong_output_not_after_an_answer(tree_file: Path) -> None:
    # <end_of_answer> ends generation: a policy could never write anything after a wrong answer step.
    (row,) = coat_sft_rows([tree_file], problems()).to_pylist()
    steps = [step.step for step in parse_coat_solution(row["completion"])]
    assert steps[2] == WRONG_PRINT and sum(parse_step(step.text).kind is StepKind.ANSWER for step in steps) == 1


def test_format_tuning_of_a_path_that_went_back_in_the_plain_format_reflects_there(tmp_path: Path) -> None:
    spoil = SolutionStep("# Step 2: Add the neighbour's apples\napples = 100\n<end_of_step>")
    backtrack = astro_backtrack("the neighbour keeps those apples", 1)
    rows = [node(0, -1, 0, None, kind="root"), node(1, 0, 1, APPLES, q=0.5), node(2, 1, 2, spoil, q=0.5),
            node(3, 2, 3, backtrack, q=0.5), node(4, 3, 4, SHARE, q=0.5), node(5, 4, 5, PRINT, q=1.0),
            node(6, 5, 6, ANSWER, kind="answer", q=1.0, answer="6", correct=True)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nodes.parquet")
    (row,) = coat_sft_rows([tmp_path / "nodes.parquet"], problems()).to_pylist()
    steps = parse_coat_solution(row["completion"])
    assert steps[2].action is MetaAction.REFLECT and live_path(steps) == [APPLES, SHARE, PRINT, ANSWER]


def test_format_tuning_reflects_after_a_failed_step(tree_file: Path, tmp_path: Path) -> None:
    rows = [r for r in pq.read_table(tree_file).to_pylist() if r["node_id"] not in (4, 5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nodes.parquet")
    (row,) = coat_sft_rows([tmp_path / "nodes.parquet"], problems()).to_pylist()
    steps = parse_coat_solution(row["completion"])
    assert [s.action for s in steps][2] is MetaAction.REFLECT and "ZeroDivisionError" in steps[2].step.text


def test_format_tuning_rows_end_on_the_correct_path(tree_file: Path) -> None:
    (row,) = coat_sft_rows([tree_file], problems()).to_pylist()
    assert live_path(parse_coat_solution(row["completion"])) == [APPLES, SHARE, PRINT, ANSWER]


def test_format_tuning_rows_grade_correct(tree_file: Path, judge: SolutionJudge) -> None:
    (row,) = coat_sft_rows([tree_file], problems()).to_pylist()
    assert judge.judge([row["prompt"]], [row["completion"]], ["6"])[0].correct
