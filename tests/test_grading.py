"""Tests of the answer grader: extraction, equivalence decisions, worker failures, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.grading import Grader, GradeResult, answers_equal, cli_grade, extract_answer

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("KAIZEN_SHARED_DATA") or REPO_ROOT / ".." / "shared" / "data")


def read_jsonl(name: str) -> list[dict]:
    with (shared_data_dir() / name).open(encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(workers=2) as shared:
        yield shared


# -- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("First $\\boxed{3}$, but on reflection $\\boxed{5}$.", "5"),
        ("So $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
        ("The roots are $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("the total is \\boxed 480.", "480"),
        ("Done: $\\boxed{4}$. Check: \\boxed{\\frac{1}{2", "4"),
        ("We conclude that the answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),
        ("The final answer is $\\$36$. I hope it is correct.", "\\$36"),
        ("Therefore, the answer is 42. Thanks!", "42"),
        ("The answer is 6, since 2 + 4 = 6", "6"),
        ("So the answer is 5. Checking again, the answer is 6.", "6"),
        ("She pays 3 * 4 = 12 dollars.\n#### 1,234", "1,234"),
        ("42", "42"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("10 square units", "10 square units"),
        ("-(ab + ac + bc)", "-(ab + ac + bc)"),
    ],
    ids=[
        "last-of-several-boxes",
        "nested-braces",
        "escaped-braces",
        "fbox",
        "boxed-without-braces",
        "truncated-last-box-skipped",
        "answer-is-inline-math",
        "minerva-final-answer",
        "escaped-dollar-inside-math",
        "answer-is-plain",
        "answer-is-then-a-reason",
        "last-of-several-answer-is",
        "gsm8k-hashes",
        "bare-number",
        "bare-latex",
        "bare-number-with-unit-words",
        "bare-expression-with-two-letter-products",
    ],
)
def test_extract_answer_finds_the_final_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Let x be the number of apples.\nThen 3x = 12, so we still need to",
        "",
        "so the result is \\boxed{\\frac{1}{2",
        "Each child gets 5 apples, not 6.",
    ],
    ids=["solution-without-marker", "empty", "only-box-truncated", "one-line-sentence"],
)
def test_extract_answer_is_none_without_an_answer(text: str) -> None:
    assert extract_answer(text) is None


# -- equivalence ----------------------------------------------------------------------------

EQUIVALENT = [
    ("\\dfrac12", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac12"),
    ("-\\frac{24}{25}", "\\frac{-24}{25}"),
    ("3.0", "3"),
    (".35625", "0.35625"),
    ("0.3333333", "\\frac{1}{3}"),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"),
    ("\\sqrt{20}", "2\\sqrt{5}"),
    ("\\frac95", "1\\frac{4}{5}"),
    ("275/2", "137 \\frac{1}{2}"),
    ("90", "90^\\circ"),
    ("15", "15\\mbox{ cm}^2"),
    ("5.4", "5.4 \\text{ cents}"),
    ("36 dollars", "\\$36"),
    ("\\text{(C) } 18", "\\text{(C)}"),
    ("\\textbf{(C) }18", "\\text{(C)}"),
    ("18.9", "\\$18.90"),
    ("10080", "10,\\!080"),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100"),
    ("1,000", "1000"),
    ("50", "50\\%"),
    ("5", "x = 5"),
    ("x=5", "5"),
    ("2x+3", "y = 2x + 3"),
    ("[-2,7]", "x \\in [-2,7]"),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(3,4]", "(3, 4]"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("1, -2", "-2,1"),
    ("\\{-2, 1\\}", "-2,1"),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"),
    ("\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}", "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("-q+p", "p - q"),
    ("-5i+6", "6 - 5i"),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x"),
    ("exp(16)", "e^{16}"),
    ("2pi", "2\\pi"),
    ("1e-5", "0.00001"),
    ("C", "\\text{(C)}"),
    ("(C)", "\\text{(C)}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("52", "52_8"),
    ("052_{8}", "52_8"),
    ("152a_{11}", "152A_{11}"),
]


@pytest.mark.parametrize(("pred", "gold"), EQUIVALENT, ids=[f"{p} == {g}" for p, g in EQUIVALENT])
def test_equivalent_answers_are_equal(pred: str, gold: str) -> None:
    assert answers_equal(pred, gold)


NOT_EQUIVALENT = [
    ("\\frac{1}{2006!}", "\\frac{1}{2004!}"),
    ("1/2006!", "1/2004!"),
    ("\\frac{1}{100001!}", "\\frac{1}{100000!}"),
    ("e^{-101}", "e^{-100}"),
    ("10^{50}+1", "10^{50}"),
    ("2^{200}+1", "2^{200}"),
    ("2021", "\\pm 2021"),
    ("\\pm 2021", "2021"),
    ("3+2\\sqrt2", "3 \\pm 2 \\sqrt{2}"),
    ("2.9999999", "3"),
    ("0.1000001", "0.1"),
    ("2.50000001", "2.5"),
    ("0.33", "\\frac{1}{3}"),
    ("1001", "1,000"),
    ("58, 500", "58500"),
    ("\\frac{3}{2}", "\\frac{2}{3}"),
    ("-1", "1"),
    ("6", "x = 5"),
    ("y = 5", "x = 5"),
    ("(3,4)", "(3,4]"),
    ("(6,-1,31)", "(6,31,-1)"),
    ("(2,\\infty)", "(3,\\infty)"),
    ("\\{1, 3\\}", "\\{1, 2\\}"),
    ("x^6 - x^4 + 1", "x^5 - x^4 + 1"),
    ("0.35625", "p - q"),
    ("2x+2", "2k+2"),
    ("25.13", "8\\pi"),
    ("5\\%", "50\\%"),
    ("\\text{(D)}", "\\text{(C)}"),
    ("D", "\\text{(C)}"),
    ("\\text{Navin}", "\\text{Evelyn}"),
    ("", "5"),
    ("6 \\text{ or more}", "6"),
    ("10 times larger", "10"),
    ("2 less than x", "2"),
    ("5 is wrong", "5"),
    ("52_9", "52_8"),
    ("52_{10}", "52_8"),
    ("42", "52_8"),
    ("x_2", "x_1"),
]


@pytest.mark.parametrize(("pred", "gold"), NOT_EQUIVALENT, ids=[f"{p} != {g}" for p, g in NOT_EQUIVALENT])
def test_different_answers_are_not_equal(pred: str, gold: str) -> None:
    assert not answers_equal(pred, gold)


def test_tiny_constants_are_compared_exactly_not_to_15_digits() -> None:
    # Plain math-verify accepts this pair: both sides round to 0 at its precision.
    assert not answers_equal("\\frac{1}{2004!}", "\\frac{1}{2006!}")


def test_answers_equal_works_outside_the_main_thread() -> None:
    verdicts: list[bool] = []
    pair = ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt2}")
    thread = threading.Thread(target=lambda: verdicts.append(answers_equal(*pair)))
    thread.start()
    thread.join()
    assert verdicts == [True]


# -- the Grader -----------------------------------------------------------------------------


def test_grade_returns_the_extracted_answer_and_verdict(grader: Grader) -> None:
    result = grader.grade("First $\\boxed{3}$; correcting: $\\boxed{\\dfrac{1}{2}}$.", "0.5")
    assert result == GradeResult(equal=True, pred_answer="\\dfrac{1}{2}", status="ok")


def test_solution_without_answer_is_no_answer(grader: Grader) -> None:
    assert grader.grade("Let x be the width.\nThen", "5") == GradeResult(False, None, "no_answer")


def test_grade_many_returns_results_in_input_order(grader: Grader) -> None:
    items = [(f"so the answer is $\\boxed{{{n}}}$", str(n if n % 3 else n + 1)) for n in range(60)]
    assert [result.equal for result in grader.grade_many(items)] == [n % 3 != 0 for n in range(60)]


def test_grader_can_be_used_from_a_thread(grader: Grader) -> None:
    results: list[GradeResult] = []
    thread = threading.Thread(target=lambda: results.append(grader.grade("\\boxed{\\sqrt{8}}", "2\\sqrt2")))
    thread.start()
    thread.join()
    assert results[0].equal


def test_checker_failure_is_checker_error_not_a_verdict(grader: Grader) -> None:
    # math-verify raises on an undefined reference (1/0) instead of comparing.
    assert grader.grade("5", "\\frac{1}{0}").status == "checker_error"


def test_overlong_answer_is_refused_as_checker_error(grader: Grader) -> None:
    assert grader.grade("\\boxed{" + "1+" * 5000 + "1}", "10001").status == "checker_error"


def test_checker_past_its_timeout_reports_timeout() -> None:
    with Grader(workers=1, timeout_s=1e-4) as impatient:
        # Needs math-verify's LaTeX parser, which takes milliseconds.
        assert impatient.grade("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}").status == "timeout"


def test_hung_worker_reports_timeout() -> None:
    with Grader(workers=1, timeout_s=0.5) as hanging:
        os.kill(hanging.worker_pids[0], signal.SIGSTOP)  # a hang no signal inside can end
        assert hanging.grade("5", "5").status == "timeout"


def test_hung_worker_is_replaced() -> None:
    with Grader(workers=1, timeout_s=0.5) as hanging:
        os.kill(hanging.worker_pids[0], signal.SIGSTOP)
        hanging.grade("5", "5")
        assert hanging.grade("5", "5") == GradeResult(True, "5", "ok")


def test_pathological_answer_times_out() -> None:
    with Grader(workers=1, timeout_s=1.0) as grader_:
        # Evaluating 9^(9^(9^9)) runs in C, deaf to the worker's timer: the parent kills it.
        assert grader_.grade("9^{9^{9^{9}}}", "1").status == "timeout"


def test_killed_worker_costs_only_its_current_item() -> None:
    with Grader(workers=1, timeout_s=60) as crashing:
        pid = crashing.worker_pids[0]
        os.kill(pid, signal.SIGSTOP)  # holds the first item in flight until the kill
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        results = crashing.grade_many([("5", "5"), ("6", "6"), ("7", "8")])
    assert [(result.status, result.equal) for result in results] == [
        ("checker_error", False),
        ("ok", True),
        ("ok", False),
    ]


def test_closed_grader_refuses_work() -> None:
    closed = Grader(workers=1)
    closed.close()
    with pytest.raises(RuntimeError):
        closed.grade("5", "5")


# -- real data ------------------------------------------------------------------------------


def test_every_math500_reference_solution_grades_equal_to_its_answer(grader: Grader) -> None:
    rows = read_jsonl("math500_test.jsonl")
    results = grader.grade_many([(row["solution"], row["answer"]) for row in rows])
    failures = [(row["id"], row["answer"], result) for row, result in zip(rows, results) if not result.equal]
    assert len(rows) == 500 and failures == []


def test_every_gsm8k_reference_solution_grades_equal_to_its_answer(grader: Grader) -> None:
    rows = read_jsonl("gsm8k_test.jsonl")
    results = grader.grade_many([(row["solution"], row["answer"]) for row in rows])
    failures = [(row["id"], row["answer"], result) for row, result in zip(rows, results) if not result.equal]
    assert rows and failures == []


# -- CLI ------------------------------------------------------------------------------------


def test_cli_grades_pred_and_gold_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_grade(["The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict == {"equal": True, "pred_answer": "\\frac{1}{2}", "status": "ok"}


def test_cli_jsonl_prints_one_verdict_per_line_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [
        {"pred": "\\boxed{4}", "gold": "4"},
        {"pred": "no answer here\nat all", "gold": "4"},
        {"pred": "#### 18", "gold": 18},
        {"pred": "\\boxed{(1,2)}", "gold": "(2,1)"},
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    assert cli_grade(["--jsonl", str(source)]) == 0
    verdicts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(v["status"], v["equal"], v["pred_answer"]) for v in verdicts] == [
        ("ok", True, "4"),
        ("no_answer", False, None),
        ("ok", True, "18"),
        ("ok", False, "(1,2)"),
    ]


@pytest.mark.parametrize(
    "bad_line",
    [
        b"{not json",
        b'["pred", "gold"]',
        b'{"pred": "1"}',
        b'{"pred": null, "gold": "1"}',
        b'{"pred": "\xff", "gold": "1"}',
    ],
    ids=["invalid-json", "not-an-object", "missing-gold", "null-pred", "not-utf8"],
)
def test_cli_malformed_jsonl_line_is_one_error_naming_the_line(
    bad_line: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(b'{"pred": "1", "gold": "1"}\n\n' + bad_line + b"\n")
    exit_code = cli_grade(["--jsonl", str(source)])
    captured = capsys.readouterr()
    assert (exit_code != 0, captured.out, len(captured.err.splitlines())) == (True, "", 1)
    assert captured.err.startswith("kaizen grade: error:") and "line 3" in captured.err


def test_cli_missing_file_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = cli_grade(["--jsonl", str(tmp_path / "absent.jsonl")])
    assert (exit_code, len(capsys.readouterr().err.splitlines())) == (1, 1)


@pytest.mark.parametrize(
    "argv", [[], ["only-pred"], ["1", "1", "--jsonl", "x.jsonl"], ["1", "1", "--workers", "0"]]
)
def test_cli_usage_error_exits_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = cli_grade(argv)
    assert (exit_code, len(capsys.readouterr().err.splitlines())) == (2, 1)


def test_kaizen_grade_console_command_is_wired() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "grade", "\\boxed{2}", "2.0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(completed.stdout) == {"equal": True, "pred_answer": "2", "status": "ok"}


def test_empty_last_box_falls_back_to_the_previous_box() -> None:
    assert extract_answer("So $\\boxed{5}$, and then $\\boxed{}$.") == "5"


def test_last_of_several_gsm8k_answer_lines_is_the_answer() -> None:
    assert extract_answer("First try:\n#### 3\nOn second thought:\n#### 5") == "5"


def test_tuples_of_different_lengths_are_not_equal() -> None:
    assert not answers_equal("(1,2)", "(1,2,3)")


def test_tuple_with_a_decimal_near_the_reference_element_is_not_equal() -> None:
    assert not answers_equal("(0.1000001, 2)", "(0.1, 2)")


def test_same_value_in_a_different_base_is_not_equal() -> None:
    assert not answers_equal("52_8", "42_{10}")


def test_irrational_constants_differing_beyond_15_digits_are_not_equal() -> None:
    assert not answers_equal("\\sqrt2+10^{-20}", "\\sqrt2")
