"""The synthetic curriculum: seeded problems, a held-out split, the teacher's solutions, the corpus."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from statistics import mean

import pyarrow.parquet as pq
import pytest

from data_store.curriculum import (
    EASIEST_LEVEL,
    LEVELS,
    MAX_VALUE,
    MAX_WRITTEN_NUMBER,
    Op,
    PROBLEM_COLUMNS,
    THEMES,
    SyntheticProblem,
    bootstrap_sft_rows,
    curriculum_corpus,
    curriculum_lexicon,
    is_held_out,
    make_curriculum,
    problem_id,
    solution_text,
    solve,
    write_problems,
)
from search.grading import answers_equal, extract_answer
from search.steps import StepKind, parse_solution, parse_step, parse_trajectory, path_program, render_prompt

N_TRAIN, N_TEST = 400, 100


@pytest.fixture(scope="module")
def curriculum() -> tuple[list[SyntheticProblem], list[SyntheticProblem]]:
    return make_curriculum(N_TRAIN, N_TEST, seed=0)


@pytest.fixture(scope="module")
def problems(curriculum: tuple[list[SyntheticProblem], list[SyntheticProblem]]) -> list[SyntheticProblem]:
    train, test = curriculum
    return train + test


def texts(problems: list[SyntheticProblem]) -> set[str]:
    return {problem.problem for problem in problems}


def run_program(problem: SyntheticProblem) -> str:
    """Stdout of the teacher's code steps run as one program, as the search would run them."""
    codes = [parse_step(step.text).code for step in solve(problem)[:-1]]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(path_program(codes), {})  # noqa: S102 - our own generated code
    return stdout.getvalue().strip()


# --- generation and split ----------------------------------------------------------------------


def test_same_seed_gives_the_same_curriculum(curriculum) -> None:
    assert make_curriculum(N_TRAIN, N_TEST, seed=0) == curriculum


def test_another_seed_gives_other_problems(curriculum) -> None:
    train, test = make_curriculum(N_TRAIN, N_TEST, seed=1)
    assert len(texts(train + test) & texts(curriculum[0] + curriculum[1])) < N_TRAIN // 10


def test_test_split_does_not_depend_on_the_number_of_training_problems(curriculum) -> None:
    _, test = make_curriculum(N_TRAIN // 4, N_TEST, seed=0)
    assert test == curriculum[1]


def test_train_and_test_share_no_problem(curriculum) -> None:
    train, test = curriculum
    assert not texts(train) & texts(test)
    assert not {p.id for p in train} & {p.id for p in test}


def test_a_problems_side_of_the_split_depends_on_its_text_only(curriculum) -> None:
    other_train, other_test = make_curriculum(N_TRAIN, N_TEST, seed=7)
    assert all(is_held_out(p.problem) for p in curriculum[1] + other_test)
    assert not any(is_held_out(p.problem) for p in curriculum[0] + other_train)


def test_one_story_asked_another_way_stays_on_its_side(curriculum) -> None:
    """The teacher's rows and the held-out split must not share a story under another question."""
    for problem in curriculum[1][:20]:
        story = problem.problem[: problem.problem.rfind(". ") + 1]
        assert is_held_out(f"{story} What is the final count?")


def test_problems_are_distinct(problems) -> None:
    assert len(texts(problems)) == len(problems)


def test_levels_are_spread_evenly_with_the_remainder_on_the_easiest() -> None:
    train, test = make_curriculum(13, 5, seed=0)
    assert Counter(p.level for p in train) == {1: 3, 2: 3, 3: 3, 4: 2, 5: 2}
    assert Counter(p.level for p in test) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def test_only_the_requested_levels_are_generated() -> None:
    train, test = make_curriculum(20, 4, seed=0, levels=(2, 4))
    assert {p.level for p in train + test} == {2, 4}


def test_unknown_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="levels"):
        make_curriculum(10, 2, levels=(1, 9))


def test_ids_name_the_level_and_hash_the_text(problems) -> None:
    for problem in problems:
        assert re.fullmatch(rf"syn-L{problem.level}-[0-9a-f]{{10}}", problem.id)
        assert problem.id == problem_id(problem.problem, problem.level)


def test_every_theme_is_used(problems) -> None:
    assert {p.theme for p in problems} == {theme.name for theme in THEMES}


def test_the_easiest_level_uses_every_operation_of_every_theme() -> None:
    train, _ = make_curriculum(600, 0, seed=0, levels=(EASIEST_LEVEL,))
    used = {(p.theme, step.op) for p in train for step in p.steps}
    assert used >= {(theme.name, template.op) for theme in THEMES for template in theme.starts + theme.events}


def test_the_level_sets_the_number_of_computing_steps(problems) -> None:
    for problem in problems:
        computing = [step for step in problem.steps if step.op is not Op.SET]  # "has 12 marbles" computes nothing
        assert len(computing) in LEVELS[problem.level].operations


def test_solutions_get_longer_level_by_level(problems) -> None:
    mean_steps = [mean(len(p.steps) for p in problems if p.level == level) for level in sorted(LEVELS)]
    assert mean_steps == sorted(mean_steps) and len(set(mean_steps)) == len(mean_steps)


def test_the_bootstrap_level_shows_every_solution_length(problems) -> None:
    lengths = {len(p.steps) for p in problems}
    assert {len(p.steps) for p in problems if p.level == EASIEST_LEVEL} == lengths


def test_quantities_stay_whole_positive_and_small(problems) -> None:
    for problem in problems:
        assert all(isinstance(step.value, int) and 1 <= step.value <= MAX_VALUE for step in problem.steps)


def test_distractors_appear_from_level_three(problems) -> None:
    for problem in problems:
        assert len(problem.distractors) == LEVELS[problem.level].distractors
    assert any(problem.distractors for problem in problems if problem.level >= 3)
    assert not any(problem.distractors for problem in problems if problem.level <= 2)


def test_distractor_numbers_are_in_the_text_but_not_in_the_solution(problems) -> None:
    for problem in (p for p in problems if p.distractors):
        code_numbers = {number for step in problem.steps for number in re.findall(r"\d+", step.code)}
        for sentence in problem.distractors:
            assert sentence in problem.problem
            assert set(re.findall(r"\d+", sentence)) - code_numbers


def test_no_distractor_number_is_the_answer(problems) -> None:
    """A policy copying it would pass as right: a false positive the search would train on."""
    assert not any(problem.answer in re.findall(r"\d+", sentence)
                   for problem in problems for sentence in problem.distractors)


def test_numbers_the_steps_use_have_one_digit(problems) -> None:
    for problem in problems:
        for step in problem.steps:
            assert all(int(number) <= MAX_WRITTEN_NUMBER for number in re.findall(r"\d+", step.expression))


# --- the teacher -------------------------------------------------------------------------------


def test_teacher_code_prints_the_reference_answer(problems) -> None:
    for problem in problems:
        assert run_program(problem) == problem.answer


def test_teacher_output_block_is_the_programs_stdout(problems) -> None:
    for problem in problems[::10]:
        assert solve(problem)[-2].output == run_program(problem)


def test_teacher_answer_grades_as_correct(problems) -> None:
    for problem in problems[::10]:
        assert answers_equal(extract_answer(solve(problem)[-1].text), problem.answer)


def test_solution_parses_back_into_the_teachers_steps(problems) -> None:
    for problem in problems:
        assert parse_solution(solution_text(problem)) == solve(problem)


def test_solution_is_one_code_step_per_computation_then_print_then_answer(problems) -> None:
    for problem in problems:
        kinds = [parse_step(step.text).kind for step in parse_solution(solution_text(problem))]
        assert kinds == [StepKind.CODE] * len(problem.steps) + [StepKind.FINAL_CODE, StepKind.ANSWER]


def test_bootstrap_rows_cover_exactly_the_easiest_level(curriculum) -> None:
    train, _ = curriculum
    rows = bootstrap_sft_rows(train)
    assert {row["problem_id"] for row in rows} == {p.id for p in train if p.level == EASIEST_LEVEL}


def test_bootstrap_rows_are_prompt_and_teacher_completion(curriculum) -> None:
    by_id = {p.id: p for p in curriculum[0]}
    for row in bootstrap_sft_rows(curriculum[0]):
        problem = by_id[row["problem_id"]]
        assert row["prompt"] == render_prompt(problem.problem)
        assert row["completion"] == solution_text(problem)


# --- files -------------------------------------------------------------------------------------


def test_jsonl_file_holds_one_row_per_problem(curriculum, tmp_path) -> None:
    path = write_problems(curriculum[1], tmp_path / "test.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [problem.row() for problem in curriculum[1]]
    assert tuple(rows[0]) == PROBLEM_COLUMNS


def test_parquet_file_holds_one_row_per_problem(curriculum, tmp_path) -> None:
    path = write_problems(curriculum[1], tmp_path / "test.parquet")
    assert pq.read_table(path).to_pylist() == [problem.row() for problem in curriculum[1]]


def test_unknown_file_type_is_refused(curriculum, tmp_path) -> None:
    with pytest.raises(ValueError, match="jsonl or .parquet"):
        write_problems(curriculum[1], tmp_path / "test.csv")


# --- tokenizer corpus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from models.tiny import train_tokenizer

    return train_tokenizer(curriculum_corpus(problems_per_level=50), vocab_size=4096, model_max_length=1024)


def test_corpus_never_contains_a_held_out_problem() -> None:
    trajectories = list(curriculum_corpus(problems_per_level=50))[1:]  # the first text is the lexicon
    assert len(trajectories) == 50 * len(LEVELS)
    assert not any(is_held_out(parse_trajectory(text)[0]) for text in trajectories)


def test_tokenizer_trained_on_the_corpus_has_every_word_as_one_token(tokenizer) -> None:
    assert [word for word in curriculum_lexicon() if len(tokenizer.tokenize(" " + word)) != 1] == []


def test_tokenizer_trained_on_the_corpus_splits_numbers_into_digits(tokenizer) -> None:
    assert tokenizer.tokenize(" has 125 marbles") == ["Ġhas", "Ġ", "1", "2", "5", "Ġmarbles"]
