"""RL with verifiable rewards: restart prompts from stored trees, the reward functions, bad input, and
GRPO raising the reward of a tiny model (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_coat import (  # noqa: F401
    ANSWER, APPLES, BAD_SHARE, PRINT, QUESTION, SHARE, WRONG_ANSWER, WRONG_PRINT, node, problems, tree_file,
)
from test_training import FAST_SFT, write_table

from data_store.rl_prompts import RestartConfig, prefix_lengths, restart_prompts, write_rl_prompts
from models.rl import (
    FormatReward, OutcomeReward, ProcessReward, ReflectionBonus, SolutionJudge, python_notation_as_latex,
)
from search.rollout import PPMScoreError
from models.tiny import build_tiny_model, default_corpus
from search.coat import astro_backtrack
from models.training import PROVENANCE_FILE, TrainingInputError, train_rl, train_sft
from search.coat import COAT_TOKENS
from search.grading import GradeResult, Grader
from search.sandbox import Sandbox, SandboxConfig
from search.steps import STEP_SPECIAL_TOKENS, SolutionStep, render_prompt, render_solution

PROMPT = render_prompt(QUESTION)
SOLVED = render_solution([APPLES, SHARE, PRINT, ANSWER])


@pytest.fixture(scope="module")
def judge() -> SolutionJudge:
    with Sandbox(SandboxConfig(workers=1)) as sandbox, Grader(workers=1) as grader:
        yield SolutionJudge(sandbox, grader)


@pytest.fixture(scope="module")
def prompts_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"prompt": PROMPT, "answer": "6", "prefix_kind": "none"}]
    return write_table(tmp_path_factory.mktemp("prompts") / "prompts.parquet", rows)


# --- restart-and-explore prompts ------------------------------------------------------------------


def test_restart_prompts_hold_the_question_and_prefixes_of_both_trajectories(tree_file: Path) -> None:  # noqa: F811
    rows = restart_prompts([tree_file], problems(), RestartConfig(prefixes_per_trajectory=1)).to_pylist()
    assert [(row["prefix_kind"], row["prefix_steps"]) for row in rows] == [("none", 0), ("correct", 2), ("wrong", 2)]


def test_an_answer_the_grader_could_not_judge_gives_no_restart_prefix(tmp_path: Path) -> None:
    rows = [node(0, -1, 0, None, kind="root"), node(1, 0, 1, APPLES, q=0.0), node(2, 1, 2, PRINT, q=0.0),
            node(3, 2, 3, ANSWER, kind="answer", q=0.0, answer="6", correct=None)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nodes.parquet")
    kinds = restart_prompts([tmp_path / "nodes.parquet"], problems()).column("prefix_kind").to_pylist()
    assert kinds == ["none"]


def test_restart_prefixes_are_the_trajectorys_first_steps(tree_file: Path) -> None:  # noqa: F811
    rows = restart_prompts([tree_file], problems(), RestartConfig(prefixes_per_trajectory=3)).to_pylist()
    wrong = [row["prompt"] for row in rows if row["prefix_kind"] == "wrong"]
    assert wrong == [PROMPT + render_solution([APPLES]), PROMPT + render_solution([APPLES, SHARE]),
                     PROMPT + render_solution([APPLES, SHARE, WRONG_PRINT])]


def test_restart_rows_carry_the_reference_answer(tree_file: Path) -> None:  # noqa: F811
    table = restart_prompts([tree_file], problems())
    assert set(table.column("answer").to_pylist()) == {"6"} and set(table.column("round").to_pylist()) == {1}


def test_coat_restart_prefixes_lead_each_step_with_continue(tree_file: Path) -> None:  # noqa: F811
    rows = restart_prompts([tree_file], problems(), RestartConfig(prefixes_per_trajectory=1, step_format="coat"))
    prefix = rows.to_pylist()[1]["prompt"].removeprefix(PROMPT)
    assert prefix.count(COAT_TOKENS[0]) == 2 and prefix.startswith(COAT_TOKENS[0])


def test_written_prompt_table_is_read_back(tree_file: Path, tmp_path: Path) -> None:  # noqa: F811
    table = restart_prompts([tree_file], problems())
    assert pq.read_table(write_rl_prompts(table, tmp_path / "rl_prompts.parquet")).equals(table)


def test_prefix_lengths_stay_strictly_inside_the_trajectory() -> None:
    assert prefix_lengths(4, 2) == [1, 3] and prefix_lengths(1, 2) == [] and prefix_lengths(6, 1) == [3]


# --- rewards -------------------------------------------------------------------------------------------


def test_outcome_reward_is_plus_one_only_for_a_correct_program_run(judge: SolutionJudge) -> None:
    completions = [
        SOLVED,
        render_solution([APPLES, WRONG_PRINT, WRONG_ANSWER]),  # runs, wrong answer
        render_solution([SolutionStep("# Step 1: oops\nshare = 1 / 0\n<end_of_step>"), PRINT, ANSWER]),  # raises
        SOLVED[:-20],  # cut off before the answer closes
    ]
    assert OutcomeReward(judge)([PROMPT] * 4, completions, answer=["6"] * 4) == [1.0, -1.0, -1.0, -1.0]



def test_a_solution_the_grader_could_not_grade_gets_no_outcome_reward() -> None:
    class TimingOutGrader:
        def grade_many(self, pairs: list[tuple[str, str]]) -> list[GradeResult]:
            return [GradeResult(False, "6", "timeout") for _ in pairs]

    with Sandbox(SandboxConfig(workers=1)) as sandbox:
        judge = SolutionJudge(sandbox, TimingOutGrader())
        assert OutcomeReward(judge)([PROMPT], [SOLVED], answer=["6"]) == [None]
        assert ReflectionBonus(judge)([PROMPT], [SOLVED], answer=["6"], prefix_kind=["wrong"]) == [None]

def test_an_astro_trace_is_judged_on_the_steps_after_its_backtrack(judge: SolutionJudge) -> None:
    backtrack = astro_backtrack("running this code fails with ZeroDivisionError: division by zero", 1)
    completion = render_solution([APPLES, BAD_SHARE, backtrack, SHARE, PRINT, ANSWER])
    assert judge.judge([PROMPT], [completion], ["6"])[0].correct


def test_an_answer_resting_on_a_guessed_output_is_wrong(judge: SolutionJudge) -> None:
    # The program prints 12; the completion claims it printed 6 and answers 6, as a policy writing
    # its own <output> can. Evaluation would show 12 before the answer.
    guessed = render_solution([APPLES, SolutionStep(WRONG_PRINT.text, output="6"), ANSWER])
    [verdict] = judge.judge([PROMPT], [guessed], ["6"])
    assert not verdict.correct and "printed" in verdict.reason


def test_a_float_printed_with_binary_rounding_backs_the_rounded_answer(judge: SolutionJudge) -> None:
    price = SolutionStep("# Step 1: three pens at 0.70\ncost = 3 * 0.7\n<end_of_step>")
    completion = render_solution([price, SolutionStep("print(cost)\n<end_of_code>"),
                                  SolutionStep("<answer>\\boxed{2.1}<end_of_answer>")])
    [verdict] = judge.judge([PROMPT], [completion], ["2.1"])
    assert verdict.correct


def test_a_choice_reference_is_not_held_to_the_printed_line(judge: SolutionJudge) -> None:
    completion = render_solution([APPLES, SHARE, PRINT, SolutionStep("<answer>\\boxed{\\text{(C)}}<end_of_answer>")])
    [verdict] = judge.judge([PROMPT], [completion], ["\\text{(C)}"])
    assert verdict.correct


def test_a_program_that_prints_the_error_it_caught_has_failed(judge: SolutionJudge) -> None:
    catching = SolutionStep("# Step 1: share, carefully\ntry:\n    share = 1 / 0\nexcept Exception as e:\n"
                            "    print('Error:', e)\n    share = 6\n<end_of_step>")
    completion = render_solution([catching, PRINT, ANSWER])
    [verdict] = judge.judge([PROMPT], [completion], ["6"])
    assert not verdict.correct and verdict.reason == "program failed: Error: division by zero"


EVEN = SolutionStep("<answer>\\boxed{\\text{even}}<end_of_answer>")


def test_a_reference_in_words_is_held_to_the_printed_line(judge: SolutionJudge) -> None:
    """Stricter than the search: the program printed 6, not the words the answer gives."""
    [verdict] = judge.judge([PROMPT], [render_solution([APPLES, SHARE, PRINT, EVEN])], ["\\text{even}"])
    assert not verdict.correct and "printed" in verdict.reason


def test_printing_words_and_showing_them_does_not_let_a_guess_through(judge: SolutionJudge) -> None:
    """A policy could print anything, show that output faithfully, and guess: the printed line is still held."""
    done = SolutionStep("# Now finish\nprint('done')\n<end_of_code>", output="done")
    guess = SolutionStep("<answer>\\boxed{\\frac{\\pi}{4}}<end_of_answer>")
    [verdict] = judge.judge([PROMPT], [render_solution([APPLES, done, guess])], ["\\frac{\\pi}{4}"])
    assert not verdict.correct and "printed" in verdict.reason


def test_a_reference_in_words_is_held_to_the_printed_line_when_nothing_is_printed(judge: SolutionJudge) -> None:
    silent = SolutionStep("# Now finish\nshare = share\n<end_of_code>", output="")
    [verdict] = judge.judge([PROMPT], [render_solution([APPLES, SHARE, silent, EVEN])], ["\\text{even}"])
    assert not verdict.correct and "printed" in verdict.reason


def test_a_complex_result_printed_in_sympy_notation_backs_the_answer(judge: SolutionJudge) -> None:
    """sympy prints 12 - 5*I, which the grader does not read as the reference 12 - 5i as printed."""
    code = SolutionStep("# Step 1: the product\nfrom sympy import I, expand\nz = expand((2 - 3*I) * (3 + 2*I))\n"
                        "<end_of_step>")
    shown = SolutionStep("# Now print the final answer\nprint(z)\n<end_of_code>", output="12 - 5*I")
    answer = SolutionStep("<answer>The product is \\boxed{12 - 5i}.<end_of_answer>")
    [verdict] = judge.judge([PROMPT], [render_solution([code, shown, answer])], ["12 - 5i"])
    assert verdict.correct


@pytest.mark.parametrize(("printed", "latex"), [
    ("6 - 5*I", "6 - 5 i"), ("(6-5j)", "6-5 i"), ("oo", "\\infty"), ("Eq(y, 2*x + 1)", "y = 2*x + 1"),
    ("asin(1/3)", "\\arcsin(1/3)"), ("Matrix([[-1, 0], [0, -1]])", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
    ("x**2 + 1", "x**2 + 1"), ("Tuesday", "Tuesday"),
])
def test_python_notation_is_read_as_the_grader_reads_latex(printed: str, latex: str) -> None:
    assert python_notation_as_latex(printed) == latex


def test_an_answer_without_a_final_code_step_is_malformed(judge: SolutionJudge) -> None:
    assert OutcomeReward(judge)([PROMPT] * 2, [render_solution([ANSWER]), render_solution([APPLES, ANSWER])],
                                answer=["6", "6"]) == [-1.0, -1.0]
    assert FormatReward()([PROMPT], [render_solution([ANSWER])]) == [0.0]


def test_outcome_reward_values_are_configurable(judge: SolutionJudge) -> None:
    reward = OutcomeReward(judge, correct=1.0, wrong=0.0)
    assert reward([PROMPT] * 2, [SOLVED, render_solution([APPLES, WRONG_PRINT, WRONG_ANSWER])], answer=["6", "6"]) == [1.0, 0.0]


def test_restart_completion_runs_with_the_prompts_prefix(judge: SolutionJudge) -> None:
    prompt = PROMPT + render_solution([APPLES])  # `apples` is defined only in the prompt
    assert OutcomeReward(judge)([prompt], [render_solution([SHARE, PRINT, ANSWER])], answer=["6"]) == [1.0]


def test_reflection_bonus_rewards_only_recoveries_from_wrong_prefixes(judge: SolutionJudge) -> None:
    bonus = ReflectionBonus(judge, bonus=0.5)
    assert bonus([PROMPT] * 3, [SOLVED] * 3, answer=["6"] * 3, prefix_kind=["wrong", "correct", "none"]) == [0.5, 0, 0]


class LengthScorer:
    """A stand-in PPM: the value of a prefix falls with its length; records what it scored."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score(self, texts: list[str]) -> list[float]:
        self.texts += texts
        return [-len(text) / 1000 for text in texts]


def test_process_reward_scores_only_the_completions_own_steps() -> None:
    scorer = LengthScorer()
    prompt = PROMPT + render_solution([APPLES])  # a restart prompt: its first step is given
    [reward] = ProcessReward(scorer, aggregate="min")([prompt], [render_solution([SHARE, PRINT, ANSWER])])
    assert len(scorer.texts) == 3 and all(text.startswith(prompt) and len(text) > len(prompt) for text in scorer.texts)
    assert reward == -len(scorer.texts[-1]) / 1000



def test_process_reward_refuses_a_ppm_that_scores_nan() -> None:
    class BrokenScorer:
        def score(self, texts: list[str]) -> list[float]:
            return [float("nan")] * len(texts)

    with pytest.raises(PPMScoreError, match="not a finite number"):
        ProcessReward(BrokenScorer())([PROMPT], [SOLVED])

def test_format_reward_needs_closed_steps_ending_in_an_answer() -> None:
    assert FormatReward()([PROMPT] * 2, [SOLVED, render_solution([APPLES, SHARE])]) == [1.0, 0.0]


# --- bad input ---------------------------------------------------------------------------------------


def test_rl_without_a_reward_function_fails_before_training(
    tmp_path: Path, tiny_model: Path, prompts_table: Path
) -> None:
    with pytest.raises(TrainingInputError, match="needs at least one reward function"):
        train_rl([prompts_table], tmp_path / "rl", base_model=str(tiny_model), rewards=[])
    assert not any(tmp_path.iterdir())


def test_rl_with_an_empty_prompt_set_fails_before_training(tmp_path: Path, tiny_model: Path) -> None:
    empty = write_table(tmp_path / "prompts.parquet", [], schema=pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    with pytest.raises(TrainingInputError, match="the rl tables are empty"):
        train_rl([empty], tmp_path / "rl", base_model=str(tiny_model))


def test_rl_with_an_unknown_reward_names_it(tmp_path: Path, tiny_model: Path, prompts_table: Path) -> None:
    with pytest.raises(TrainingInputError, match="unknown reward 'corect'"):
        train_rl([prompts_table], tmp_path / "rl", base_model=str(tiny_model), rewards=["corect"])


def test_reflection_reward_needs_prefix_kinds(tmp_path: Path, tiny_model: Path) -> None:
    table = write_table(tmp_path / "prompts.parquet", [{"prompt": PROMPT, "answer": "6"}])
    with pytest.raises(TrainingInputError, match="needs a prefix_kind column"):
        train_rl([table], tmp_path / "rl", base_model=str(tiny_model), rewards=["outcome", "reflection"])


def test_coat_rl_on_a_tokenizer_without_the_tokens_fails_before_training(
    tmp_path: Path, tiny_model: Path, prompts_table: Path
) -> None:
    with pytest.raises(TrainingInputError, match="lacks the chain-of-action-thought token"):
        train_rl([prompts_table], tmp_path / "rl", base_model=str(tiny_model), overrides={"step_format": "coat"})


def test_coat_rl_accepts_a_tokenizer_with_the_tokens(tmp_path: Path, prompts_table: Path) -> None:
    from models.training import prepare_run

    corpus = default_corpus(seed=0, synthetic_examples=50, include_shared=False)
    model = build_tiny_model(tmp_path / "coat", corpus=corpus, step_tokens=STEP_SPECIAL_TOKENS + COAT_TOKENS,
                             num_layers=1, vocab_size=512)
    request = prepare_run("rl", tables=[prompts_table], output_dir=tmp_path / "rl", base_model=str(model),
                          overrides={"step_format": "coat"})
    assert request.config["step_format"] == "coat"


# --- learning (slow) -----------------------------------------------------------------------------------

NAMES = ("Alice", "Ben", "Carla", "Dmitri")


def guess(digit: int) -> str:
    """A one-step solution that prints a digit: the digit is the only decision the policy makes."""
    return (f"# Now print the final answer\nprint({digit})\n<end_of_code>\n"
            f"<output>{digit}<end_of_output>\n<answer>\\boxed{{{digit}}}<end_of_answer>")


@pytest.mark.slow
def test_grpo_raises_the_outcome_reward(tmp_path: Path, tiny_model: Path) -> None:
    # SFT makes every digit equally likely for every question; the reference is always 7, so the
    # outcome reward (0/1, graded after running the program) starts near 0.1 and GRPO must raise it.
    sft_rows = [{"prompt": render_prompt(f"Pick a number, {name}."), "completion": guess(digit)}
                for name in NAMES for digit in range(10)]
    policy = train_sft([write_table(tmp_path / "sft.parquet", sft_rows)], tmp_path / "policy",
                       base_model=str(tiny_model), overrides={**FAST_SFT, "num_train_epochs": 8})
    prompts = write_table(tmp_path / "prompts.parquet",
                          [{"prompt": render_prompt(f"Pick a number, {name}."), "answer": "7"} for name in NAMES])
    checkpoint = train_rl(
        [prompts], tmp_path / "rl", base_model=str(policy), rewards=["outcome"],
        overrides={"outcome_wrong": 0.0, "learning_rate": 5e-4, "lr_scheduler_type": "constant",
                   "num_generations": 8, "per_device_train_batch_size": 16, "max_completion_length": 40,
                   "max_steps": 24, "logging_steps": 1, "sandbox": {"workers": 1}, "grader_workers": 1},
    )
    history = json.loads((checkpoint / PROVENANCE_FILE).read_text())["log_history"]
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.4, rewards
