"""Evaluation: the modes on a scripted policy, benchmark loading, the eval table, and `kaizen eval`.

The scripted policy answers a question's chains from a script: its i-th chain prints the script's
i-th value and boxes what was printed, so each test decides exactly which answers the K samples of
a problem reach.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_generation import model_dir  # noqa: F401 - the tiny-model fixture of the slow tests
from test_rollout_driver import InProcessExecutor

from data_store.schema import check_schema
from models.evaluation import (
    EVAL_FILE,
    SUMMARY_FILE,
    EvalConfig,
    EvalInputError,
    EvalReport,
    check_eval_settings,
    cli_eval,
    evaluate,
    load_benchmark,
    write_eval,
)
from search.evaluation import (
    EvalMode,
    EvalSearchConfig,
    ModeKind,
    ModeResult,
    best_scored,
    evaluate_modes,
    majority_vote,
    parse_mode,
)
from search.policy import Completion
from search.rollout import PPMScoreError, Problem
from search.steps import parse_trajectory

BROKEN = "broken"  # a script value whose program raises: the chain ends without an answer
SLOW = "slow"  # an answer the checker times out on
UNBOXED = "unboxed"  # a printed value whose answer step states no boxed answer


class ChainScript:
    """A policy whose i-th chain of a question prints `scripts[question][i]`, then boxes the output."""

    def __init__(self, scripts: dict[str, Sequence[str]]) -> None:
        self.scripts = scripts
        self.served: Counter[str] = Counter()
        self.calls: list[tuple[int, int, float]] = []  # (prompts, n, temperature)
        self.tokens = 0

    def generate(
        self, prompts: Sequence[str], *, n: int, stop: Sequence[str], temperature: float, max_tokens: int
    ) -> list[list[Completion]]:
        self.calls.append((len(prompts), n, temperature))
        results = [[self._completion(prompt) for _ in range(n)] for prompt in prompts]
        self.tokens += sum(c.num_tokens for completions in results for c in completions)
        return results

    def restart_seeds(self) -> None:  # as a seeded policy: each question's samples start over
        self.served.clear()

    def _completion(self, prompt: str) -> Completion:
        printed = re.search(r"<output>(.*)<end_of_output>\n$", prompt, re.S)
        if printed and printed.group(1) == UNBOXED:
            text = "<answer>The answer is not clear.<end_of_answer>"
        elif printed:
            text = f"<answer>The answer is \\boxed{{{printed.group(1)}}}.<end_of_answer>"
        else:
            question, _ = parse_trajectory(prompt)
            script = self.scripts[question]
            value = script[self.served[question] % len(script)]
            self.served[question] += 1
            code = "1 / 0" if value == BROKEN else f"print({value!r})"
            text = f"# Step 1: state the answer\n{code}\n<end_of_code>"
        return Completion(text, len(text.split()))


@dataclass(frozen=True)
class ToyGrade:
    equal: bool
    pred_answer: str | None
    status: str


class FractionChecker:
    """Boxed answers compared as fractions (so 1/2 equals 0.5); `slow` times out, no box is no_answer."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []

    def grade_many(self, pairs: Sequence[tuple[str, str]]) -> list[ToyGrade]:
        self.calls.append(list(pairs))
        return [self._grade(text, gold) for text, gold in pairs]

    @staticmethod
    def _grade(text: str, gold: str) -> ToyGrade:
        boxed = re.search(r"\\boxed\{([^}]*)\}", text)
        if boxed is None:
            return ToyGrade(False, None, "no_answer")
        answer = boxed.group(1)
        if answer == SLOW:
            return ToyGrade(False, answer, "timeout")
        try:
            return ToyGrade(Fraction(answer) == Fraction(gold), answer, "ok")
        except ValueError:
            return ToyGrade(answer == gold, answer, "ok")


class AnswerPreferringScorer:
    """A stand-in PPM that rates trajectories by the answer they box (0 for anything else)."""

    def __init__(self, ratings: dict[str, float]) -> None:
        self.ratings = ratings
        self.calls: list[list[str]] = []

    def score(self, texts: Sequence[str]) -> list[float]:
        self.calls.append(list(texts))
        return [self._rate(text) for text in texts]

    def _rate(self, text: str) -> float:
        boxed = re.search(r"\\boxed\{([^}]*)\}", text)
        return self.ratings.get(boxed.group(1), 0.0) if boxed else 0.0


def problem(index: int, answer: str = "5") -> Problem:
    return Problem(f"p{index}", f"Question number {index}?", answer)


def run_modes(
    problems: Sequence[Problem],
    modes: Sequence[str],
    scripts: dict[str, Sequence[str]],
    *,
    scorer: AnswerPreferringScorer | None = None,
    policy: ChainScript | None = None,
    config: EvalSearchConfig | None = None,
) -> list[ModeResult]:
    return evaluate_modes(
        problems,
        [parse_mode(mode) for mode in modes],
        config or EvalSearchConfig(pipeline_groups=1, max_depth=4),
        generator=policy or ChainScript(scripts),
        executor=InProcessExecutor(),
        checker=FractionChecker(),
        scorer=scorer,
    )


def only_record(results: list[ModeResult]):
    [result] = results
    [record] = result.records
    return record


# -- modes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "mode"), [
    ("greedy", EvalMode(ModeKind.GREEDY)),
    ("maj@8", EvalMode(ModeKind.MAJORITY, 8)),
    ("ppm@4", EvalMode(ModeKind.PPM, 4)),
    ("mcts", EvalMode(ModeKind.MCTS)),
])
def test_mode_names_parse_and_print_back(text: str, mode: EvalMode) -> None:
    assert (parse_mode(text), mode.name) == (mode, text)


@pytest.mark.parametrize("text", ["beam", "maj@0", "maj@", "ppm@x", "greedy@2", "mcts@4", "maj8"])
def test_unknown_modes_are_refused_naming_the_valid_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"greedy, maj@K, ppm@K or mcts"):
        parse_mode(text)


def test_majority_vote_uses_the_equivalence_not_string_equality() -> None:
    same_value = lambda a, b: Fraction(a) == Fraction(b)  # noqa: E731
    assert majority_vote(["3", "1/2", "0.5", "3", "0.50"], same_value) == 1


def test_majority_vote_tie_goes_to_the_cluster_voted_first() -> None:
    assert majority_vote(["7", "5", "5", "7"], str.__eq__) == 0


def test_majority_vote_ignores_samples_without_an_answer() -> None:
    assert majority_vote([None, None, "4"], str.__eq__) == 2
    assert majority_vote([None, None], str.__eq__) is None


def test_best_scored_takes_the_highest_and_the_earliest_on_ties() -> None:
    assert best_scored([0.1, None, 0.7, 0.7]) == 2
    assert best_scored([None, None]) is None


def test_greedy_is_one_chain_per_problem_at_temperature_zero() -> None:
    policy = ChainScript({problem(i).question: ["5"] for i in range(3)})
    run_modes([problem(i) for i in range(3)], ["greedy"], {}, policy=policy)
    assert {(prompts, n, temperature) for prompts, n, temperature in policy.calls} == {(3, 1, 0.0)}


def test_all_chains_of_all_problems_share_each_generate_call() -> None:
    policy = ChainScript({problem(i).question: ["5"] for i in range(3)})
    run_modes([problem(i) for i in range(3)], ["maj@4"], {}, policy=policy)
    # Pass 1: the code step of all 12 chains; pass 2: their answer steps.
    assert [(prompts, n) for prompts, n, _ in policy.calls] == [(12, 1), (12, 1)]


def test_majority_vote_picks_the_most_common_equivalent_answer() -> None:
    record = only_record(run_modes([problem(0, "1/2")], ["maj@5"], {problem(0).question: ["3", "1/2", "0.5", "3", "0.50"]}))
    assert (record.extracted_answer, record.correct) == ("1/2", True)


def test_majority_vote_with_the_real_grader_groups_equal_values_written_differently() -> None:
    from search.grading import Grader

    samples = ["3", "\\frac{1}{2}", "0.5", "3", "1/2"]
    with Grader(workers=1) as grader:
        [result] = evaluate_modes(
            [problem(0, "\\frac12")], [parse_mode("maj@5")], EvalSearchConfig(pipeline_groups=1, max_depth=4),
            generator=ChainScript({problem(0).question: samples}), executor=InProcessExecutor(), checker=grader,
        )
    [record] = result.records
    assert (record.extracted_answer, record.correct) == ("\\frac{1}{2}", True)


def test_majority_vote_can_be_wrong_when_most_samples_are() -> None:
    record = only_record(run_modes([problem(0, "5")], ["maj@3"], {problem(0).question: ["5", "7", "7"]}))
    assert (record.extracted_answer, record.correct) == ("7", False)


def test_ppm_best_of_k_picks_the_trajectory_the_ppm_rates_best() -> None:
    scorer = AnswerPreferringScorer({"5": 0.9, "7": -0.3})
    record = only_record(run_modes([problem(0, "5")], ["ppm@3"], {problem(0).question: ["7", "5", "7"]}, scorer=scorer))
    assert (record.extracted_answer, record.correct) == ("5", True)


def test_ppm_best_of_k_prefers_an_answer_it_can_grade() -> None:
    scorer = AnswerPreferringScorer({"5": -0.5})  # an unboxed answer step scores 0.0, higher
    record = only_record(run_modes([problem(0, "5")], ["ppm@2"], {problem(0).question: [UNBOXED, "5"]}, scorer=scorer))
    assert (record.extracted_answer, record.correct) == ("5", True)


class OneSidedPercentChecker(FractionChecker):
    """math-verify's one-sided leniency: a reference of "10%" accepts 10 and 0.1, not the other way."""

    @staticmethod
    def _grade(text: str, gold: str) -> ToyGrade:
        boxed = re.search(r"\\boxed\{([^}]*)\}", text)
        answer = boxed.group(1) if boxed else None
        if answer is not None and gold.endswith("%"):
            return ToyGrade(answer in (gold, gold[:-1], str(Fraction(gold[:-1]) / 100)), answer, "ok")
        return FractionChecker._grade(text, gold)


def test_majority_vote_joins_answers_only_when_equal_both_ways() -> None:
    # One-sided, "10%" would gather 0.1 and 10 (which differ) and outvote the two 7s.
    [result] = evaluate_modes(
        [problem(0, "7")], [parse_mode("maj@5")], EvalSearchConfig(pipeline_groups=1, max_depth=4),
        generator=ChainScript({problem(0).question: ["10%", "0.1", "10", "7", "7"]}),
        executor=InProcessExecutor(), checker=OneSidedPercentChecker(),
    )
    assert (result.records[0].extracted_answer, result.records[0].correct) == ("7", True)


def test_ppm_scores_whole_trajectories_through_the_answer_step() -> None:
    scorer = AnswerPreferringScorer({"5": 0.9})
    run_modes([problem(0, "5")], ["ppm@2"], {problem(0).question: ["7", "5"]}, scorer=scorer)
    [texts] = scorer.calls
    assert len(texts) == 2 and all(text.endswith("<end_of_answer>\n") for text in texts)


def test_maj_and_ppm_of_the_same_k_judge_the_same_samples() -> None:
    policy = ChainScript({problem(0).question: ["7", "5", "7"]})
    scorer = AnswerPreferringScorer({"5": 0.9})
    results = run_modes([problem(0, "5")], ["maj@3", "ppm@3"], {}, policy=policy, scorer=scorer)
    assert policy.served[problem(0).question] == 3
    assert [result.records[0].extracted_answer for result in results] == ["7", "5"]



def test_a_modes_samples_do_not_depend_on_the_modes_before_it() -> None:
    scripts = {problem(0).question: ["5", "5", "7", "7", "7"]}
    [alone] = run_modes([problem(0, "5")], ["maj@3"], scripts)
    after_another = run_modes([problem(0, "5")], ["maj@2", "maj@3"], scripts)[1]
    assert after_another.records[0].extracted_answer == alone.records[0].extracted_answer == "5"

def test_test_time_mcts_answers_what_the_ppm_prefers_not_the_reference() -> None:
    scorer = AnswerPreferringScorer({"7": 0.8, "5": -0.8})
    config = EvalSearchConfig(pipeline_groups=1, mcts_width=2, mcts_rollouts=2, max_depth=4)
    record = only_record(run_modes([problem(0, "5")], ["mcts"], {problem(0).question: ["5", "7"]}, scorer=scorer, config=config))
    assert (record.extracted_answer, record.correct) == ("7", False)


def test_test_time_mcts_prefers_an_answer_it_can_grade() -> None:
    scorer = AnswerPreferringScorer({"5": -0.5})  # an unboxed answer step scores 0.0, higher
    config = EvalSearchConfig(pipeline_groups=1, mcts_width=2, mcts_rollouts=2, max_depth=4)
    record = only_record(run_modes([problem(0, "5")], ["mcts"], {problem(0).question: [UNBOXED, "5"]}, scorer=scorer,
                                   config=config))
    assert (record.extracted_answer, record.correct) == ("5", True)


def test_a_ppm_score_that_is_not_a_number_stops_best_of_k() -> None:
    class BrokenScorer:
        def score(self, texts: Sequence[str]) -> list[float]:
            return [float("nan")] * len(texts)

    with pytest.raises(PPMScoreError, match="not a finite number"):
        run_modes([problem(0, "5")], ["ppm@2"], {problem(0).question: ["5", "7"]}, scorer=BrokenScorer())


def test_ppm_modes_without_a_scorer_are_refused() -> None:
    with pytest.raises(ValueError, match="ppm@2, mcts need a PPM scorer"):
        run_modes([problem(0)], ["greedy", "ppm@2", "mcts"], {problem(0).question: ["5"]})


def test_grader_statuses_are_counted_apart_from_wrong_answers() -> None:
    problems = [problem(0, "5"), problem(1, "5"), problem(2, "5"), problem(3, "5")]
    scripts = {problems[0].question: ["5"], problems[1].question: ["6"],
               problems[2].question: [BROKEN], problems[3].question: [SLOW]}
    [result] = run_modes(problems, ["greedy"], scripts)
    assert result.outcome_counts() == {"correct": 1, "wrong": 1, "no_answer": 1, "timeout": 1}
    assert result.accuracy == 0.25


def test_a_problem_whose_chains_all_fail_has_no_answer_but_a_prediction() -> None:
    record = only_record(run_modes([problem(0)], ["maj@2"], {problem(0).question: [BROKEN]}))
    assert (record.status, record.extracted_answer, record.correct) == ("no_answer", None, False)
    assert "1 / 0" in record.prediction


def test_prediction_is_the_chosen_solution_without_the_prompt() -> None:
    record = only_record(run_modes([problem(0)], ["greedy"], {problem(0).question: ["5"]}))
    assert record.prediction == (
        "# Step 1: state the answer\nprint('5')\n<end_of_code>\n<output>5<end_of_output>\n"
        "<answer>The answer is \\boxed{5}.<end_of_answer>\n"
    )


def test_tokens_of_a_problem_are_those_of_all_its_chains() -> None:
    policy = ChainScript({problem(0).question: ["5", "7"], problem(1).question: ["5"]})
    [result] = run_modes([problem(0), problem(1)], ["maj@2"], {}, policy=policy)
    assert result.tokens == policy.tokens and all(record.tokens > 0 for record in result.records)


# -- benchmarks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math500", "gsm8k", "aime24", "amc23"])
def test_known_benchmarks_load_from_the_shared_data(name: str) -> None:
    benchmark = load_benchmark(name, limit=5)
    assert benchmark.name == name and len(benchmark.problems) == 5
    assert all(p.answer and p.question for p in benchmark.problems)


def test_unknown_benchmark_name_lists_the_valid_forms() -> None:
    with pytest.raises(EvalInputError, match=r"unknown benchmark 'math5000'.*math500, gsm8k, aime24, amc23.*NAME=PATH"):
        load_benchmark("math5000")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_benchmark_file_with_a_missing_answer_names_the_problem(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": "b", "problem": "2+2?"}])
    with pytest.raises(EvalInputError, match=r"benchmark 'mine'.*problem b has no answer"):
        load_benchmark(f"mine={path}")


def test_parquet_benchmark_with_a_field_mapping(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"key": ["x"], "question": ["What is 6 * 7?"], "final": ["42"]}), path)
    benchmark = load_benchmark(f"mine={path}?problem=question&answer=final&id=key")
    assert benchmark.problems == [Problem("x", "What is 6 * 7?", "42")]


def test_dataset_benchmark_loads_through_datasets(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "test.jsonl", [{"question": "What is 2 + 2?", "answer": "Two and two.\n#### 4"}])
    benchmark = load_benchmark(f"local=hf:{tmp_path}?problem=question")
    assert [(p.question, p.answer) for p in benchmark.problems] == [("What is 2 + 2?", "4")]


def test_unknown_spec_option_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{"id": "a", "problem": "1+1?", "answer": "2"}])
    with pytest.raises(EvalInputError, match="bad option 'question=q'"):
        load_benchmark(f"mine={path}?question=q")


# -- the eval table ---------------------------------------------------------------------------------


def small_report() -> EvalReport:
    from models.evaluation import _rows, _summary

    [result] = run_modes([problem(0), problem(1, "6")], ["greedy"], {problem(0).question: ["5"], problem(1).question: ["5"]})
    return EvalReport(pa.Table.from_pylist(_rows(result, "toy", "run", 2)), [_summary(result, "toy")])


def test_write_eval_writes_the_table_and_the_summary(tmp_path: Path) -> None:
    table_path = write_eval(small_report(), tmp_path)
    rows = pq.read_table(table_path).to_pylist()
    assert [(row["problem_id"], row["mode"], row["correct"], row["grader_status"]) for row in rows] == [
        ("p0", "greedy", True, "ok"), ("p1", "greedy", False, "ok")]
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["metrics"] == {"toy/greedy": 0.5}


def test_an_interrupted_write_leaves_no_complete_looking_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_eval(small_report(), tmp_path)
    (tmp_path / EVAL_FILE).unlink()

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("data_store.parquet.write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        write_eval(small_report(), tmp_path)
    assert not (tmp_path / SUMMARY_FILE).exists() and not (tmp_path / EVAL_FILE).exists()


# -- kaizen eval: bad input -------------------------------------------------------------------------


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_unknown_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_eval(["--model", str(tmp_path), "--benchmark", "nope", "--out", str(tmp_path / "out")])
    [line] = error_lines(capsys)
    assert code == 2 and line.startswith("kaizen eval: error: unknown benchmark 'nope'")


def test_cli_unknown_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_eval(["--model", str(tmp_path), "--benchmark", "math500", "--mode", "beam@4", "--out", str(tmp_path)])
    [line] = error_lines(capsys)
    assert code == 2 and line.startswith("kaizen eval: error: unknown mode 'beam@4'")


def test_cli_ppm_mode_without_a_ppm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_eval(["--model", str(tmp_path), "--benchmark", "math500", "--mode", "ppm@4", "--out", str(tmp_path)])
    [line] = error_lines(capsys)
    assert code == 2 and "ppm@4 need a PPM checkpoint (--ppm)" in line


def test_cli_benchmark_file_with_missing_answers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{"id": "q7", "problem": "1+1?"}])
    code = cli_eval(["--model", str(tmp_path), "--benchmark", f"mine={path}", "--out", str(tmp_path / "out")])
    [line] = error_lines(capsys)
    assert code == 2 and "problem q7 has no answer" in line


def test_cli_model_that_does_not_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    code = cli_eval(["--model", str(broken), "--benchmark", "math500", "--limit", "1", "--out", str(tmp_path / "out")])
    [line] = error_lines(capsys)
    assert code == 1 and line.startswith(f"kaizen eval: error: cannot load model '{broken}'")
    assert not (tmp_path / "out").exists()


# -- end to end on a tiny model (slow) ---------------------------------------------------------------

QUICK = ["--limit", "2", "--max-step-tokens", "32", "--max-depth", "3"]


@pytest.fixture(scope="module")
def untrained_ppm(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model with a fresh value head: a PPM checkpoint whose scores mean nothing, loaded for real."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from models.ppm import ScoringContract

    out = tmp_path_factory.mktemp("ppm") / "ppm"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    ScoringContract(max_length=512).save(out)
    return out


@pytest.mark.slow
def test_kaizen_eval_on_math500_and_gsm8k(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    out = tmp_path / "out"
    code = cli_eval(["--model", str(model_dir), "--benchmark", "math500", "--benchmark", "gsm8k",
                     "--mode", "greedy", "--mode", "maj@2", *QUICK, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    table = pq.read_table(out / EVAL_FILE)
    check_schema(table.schema, "eval")
    assert Counter((row["benchmark"], row["mode"]) for row in table.to_pylist()) == {
        ("math500", "greedy"): 2, ("math500", "maj@2"): 2, ("gsm8k", "greedy"): 2, ("gsm8k", "maj@2"): 2}
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert set(summary["metrics"]) == {"math500/greedy", "math500/maj@2", "gsm8k/greedy", "gsm8k/maj@2"}
    assert all(line["tokens"] > 0 and line["n"] == 2 for line in summary["summary"])
    assert all(f"{benchmark} " in printed for benchmark in ("math500", "gsm8k"))


@pytest.mark.slow
def test_greedy_evaluation_of_a_real_model_replays(model_dir: Path) -> None:  # noqa: F811
    benchmarks = [load_benchmark("gsm8k", limit=2)]
    config = EvalConfig(modes=["greedy"], max_step_tokens=32, max_depth=3)
    first, again = (evaluate(model_dir, benchmarks, config).rows.to_pylist() for _ in range(2))
    assert first == again


@pytest.mark.slow
def test_kaizen_eval_ppm_modes_with_a_real_ppm(model_dir: Path, untrained_ppm: Path, tmp_path: Path) -> None:  # noqa: F811
    code = cli_eval(["--model", str(model_dir), "--ppm", str(untrained_ppm), "--benchmark", "amc23", "--mode", "ppm@2",
                     "--mode", "mcts", "--mcts-width", "2", "--mcts-rollouts", "2", *QUICK, "--out", str(tmp_path)])
    assert code == 0
    rows = pq.read_table(tmp_path / EVAL_FILE).to_pylist()
    assert Counter(row["mode"] for row in rows) == {"ppm@2": 2, "mcts": 2}


def test_a_negative_temperature_is_refused_by_the_settings_check() -> None:
    with pytest.raises(EvalInputError, match="temperature must be >= 0, got -0.3"):
        check_eval_settings(["gsm8k"], ["greedy"], {"temperature": -0.3})


@pytest.mark.parametrize("mode", ["maj@4", "ppm@2", "mcts"])
def test_a_mode_that_samples_is_refused_at_temperature_zero(mode: str) -> None:
    with pytest.raises(EvalInputError, match=f"mode\\(s\\) {mode} sample several continuations"):
        EvalConfig(modes=[mode], temperature=0)


# a grader can take "10%" as 0.1 and as 10, though 0.1 is not 10
_LENIENT = {frozenset({"0.1", "10%"}), frozenset({"10", "10%"})}


def _lenient_same(a: str, b: str) -> bool:
    return a == b or frozenset({a, b}) in _LENIENT


def test_an_answer_equal_to_two_different_ones_does_not_gather_both_their_votes() -> None:
    answers = ["0.1", "0.1", "0.1", "10%", "10"]  # 0.1 has the most votes; 10% must not outvote it with 10's
    assert answers[majority_vote(answers, _lenient_same)] == "0.1"


def test_an_answer_equal_to_two_different_ones_joins_the_more_written() -> None:
    answers = ["0.1", "10%", "10", "10"]  # 10% with the two 10s: three votes against one
    assert answers[majority_vote(answers, _lenient_same)] == "10"


def test_a_nan_ppm_score_never_wins() -> None:
    assert best_scored([float("nan"), 0.9, 0.3]) == 1 and best_scored([0.1, float("nan"), 0.3]) == 2
    assert best_scored([float("nan")]) is None


def test_worked_examples_are_refused_for_a_coat_policy() -> None:
    with pytest.raises(EvalInputError, match="worked examples are written in the rstar step format, not coat"):
        EvalConfig(step_format="coat", worked_examples=1)
