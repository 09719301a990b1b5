"""Chain-of-action-thought through the pipeline: scripted COAT policies searched by MCTS (rollbacks,
malformed steps), evaluated in every sampling mode, mined into format-tuning rows, and the COAT
bootstrap and the checks that a COAT policy holds the meta-action tokens."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_coat import problems, tree_file  # noqa: F401 - the stored rstar tree of the format-tuning tests
from test_evaluation import FractionChecker
from test_rollout_driver import BoxedChecker, InProcessExecutor
from test_training import FAST_SFT, sft_rows, write_table

from data_store.curriculum import EASIEST_LEVEL, bootstrap_sft_rows, make_curriculum, solve
from data_store.mining import MiningConfig, mine
from data_store.rl_prompts import RestartConfig, coat_sft_rows, restart_prompts
from models.evaluation import Benchmark, EvalConfig, EvalInputError, evaluate
from models.rl import SolutionJudge
from models.training import TrainingInputError, train_sft
from search.coat import (
    COAT_TOKENS,
    MetaAction,
    astro_backtrack,
    continue_steps,
    live_path,
    missing_coat_tokens,
    parse_coat_solution,
    parse_coat_trajectory,
    render_coat_solution,
    split_action,
)
from search.evaluation import EvalSearchConfig, evaluate_modes, parse_mode
from search.mcts import MALFORMED_STEP_ERROR, MCTSConfig, NodeKind, Tree
from search.policy import Completion
from search.rollout import Problem, RolloutResult, run_rollouts
from search.sandbox import SandboxConfig
from search.steps import parse_solution, parse_trajectory, render_prompt

QUESTION = "Twelve apples are shared by two children. How many does each get?"
COUNT = "<|continue|># Step 1: Count the apples\napples = 3 * 4\n<end_of_step>"
SPOIL = "<|continue|># Step 2: Add the neighbour's apples\napples = 100\n<end_of_step>"
REFLECT = "<|reflect|># Reflect: the neighbour keeps those apples. Back to step 1.\n<end_of_step>"
SHARE = "<|continue|># Step 2: Share them between two\nshare = apples // 2\n<end_of_step>"
DOUBLE = "<|continue|># Step 2: Double them\nshare = apples * 2\n<end_of_step>"
BAD_SHARE = "<|continue|># Step 2: Share them\nshare = apples / 0\n<end_of_step>"
PRINT = "<|continue|># Now print the final answer\nprint(share)\n<end_of_code>"
EXPLORE = "<|explore|># Explore: 24 apples is more than there were. Back to step 1 and try a different way.\n<end_of_step>"
ANSWER = "answer"  # in a menu: the answer step boxing what the final code step printed


def boxed_output(prompt: str) -> str:
    printed = re.findall(r"<output>(.*?)<end_of_output>", prompt, re.S)[-1]
    return f"<|continue|><answer>Each child gets \\boxed{{{printed}}} apples.<end_of_answer>"


class MenuPolicy:
    """Offers the steps `menu(prompt)` names, cycled to n samples."""

    def __init__(self, menu: Callable[[str], Sequence[str]]) -> None:
        self.menu = menu

    def generate(
        self, prompts: Sequence[str], *, n: int, stop: Sequence[str], temperature: float, max_tokens: int
    ) -> list[list[Completion]]:
        results = []
        for prompt in prompts:
            options = [boxed_output(prompt) if option == ANSWER else option for option in self.menu(prompt)]
            results.append([Completion(text, len(text.split())) for text in (options * n)[:n]])
        return results

    def restart_seeds(self) -> None:  # it keeps no sampling state
        pass


def scripted_chain(*steps: str) -> MenuPolicy:
    """A policy whose k-th step is `steps[k]` (steps counted by their tokens in the prompt)."""
    return MenuPolicy(lambda prompt: [steps[min(sum(map(prompt.count, COAT_TOKENS)), len(steps) - 1)]])


def coat_search(policy: MenuPolicy, *, width: int = 1, rollouts: int = 1, answer: str = "6") -> tuple[
        Tree, InProcessExecutor]:
    executor = InProcessExecutor()
    result = run_rollouts([Problem("apples", QUESTION, answer)],
                          MCTSConfig(width=width, rollouts=rollouts, max_depth=8, step_format="coat"),
                          generator=policy, executor=executor, checker=BoxedChecker(), pipeline_groups=1)
    return result.trees[0], executor


def answer_leaf(tree: Tree):
    return next(node for node in tree.nodes if node.kind is NodeKind.ANSWER)


# --- search ---------------------------------------------------------------------------------------


def test_a_reflect_step_rolls_back_so_later_programs_leave_its_code_out() -> None:
    tree, executor = coat_search(scripted_chain(COUNT, SPOIL, REFLECT, SHARE, PRINT, ANSWER))
    leaf = answer_leaf(tree)
    assert leaf.correct and leaf.answer == "6"  # with the spoilt count, the share would be 50
    later = [program for batch in executor.calls for program in batch if "share" in program]
    assert later and all("apples = 100" not in program for program in later)
    assert [node.kind for node in tree.path(leaf)] == [NodeKind.STEP] * 5 + [NodeKind.ANSWER]


def test_a_meta_step_runs_the_rolled_back_program_and_stays_an_ordinary_step() -> None:
    tree, _ = coat_search(scripted_chain(COUNT, SPOIL, REFLECT, SHARE, PRINT, ANSWER))
    reflect = next(node for node in tree.nodes if node.step == REFLECT)
    assert reflect.kind is NodeKind.STEP and not reflect.is_final_code
    assert reflect.code.startswith("# Reflect:")  # the node's own code: the step after its token
    assert tree.propose(reflect, [SHARE])[0].program == (
        "# Step 1: Count the apples\napples = 3 * 4\n# Step 2: Share them between two\nshare = apples // 2\n")


def test_prompts_render_the_path_as_coat_with_the_live_program_output() -> None:
    tree, _ = coat_search(scripted_chain(COUNT, SPOIL, REFLECT, SHARE, PRINT, ANSWER))
    leaf = answer_leaf(tree)
    question, steps = parse_coat_trajectory(tree.prompt(leaf))
    assert question == QUESTION
    assert [step.action for step in steps] == [MetaAction.CONTINUE] * 2 + [MetaAction.REFLECT] + [MetaAction.CONTINUE] * 3
    assert [step.step.output for step in steps][4] == "6"
    assert len(live_path(steps)) == 4


@pytest.mark.parametrize("step", [
    "# Step 1: Count the apples\napples = 3 * 4\n<end_of_step>",  # no token
    "Let me think. " + COUNT,  # text before the token
    "<|reflect|># Reflect: try again\napples = 1\n<end_of_step>",  # a meta step with code
    "<|explore|># Explore: print it\n<end_of_code>",  # a meta step closing as a final code step
    "<|continue|># Step 1: Count\napples = 3 * 4 <|continue|>\n<end_of_step>",  # a second token inside
    "<|continue|><answer>\\boxed{6}<end_of_answer>",  # an answer before any final code step
])
def test_malformed_coat_steps_become_error_nodes(step: str) -> None:
    tree, executor = coat_search(scripted_chain(step))
    [node] = tree.nodes[1:]
    assert (node.kind, node.error, node.step) == (NodeKind.ERROR, MALFORMED_STEP_ERROR, step)
    assert executor.calls == []


def test_an_explore_step_may_follow_a_final_output_and_the_search_goes_on() -> None:
    tree, _ = coat_search(scripted_chain(COUNT, DOUBLE, PRINT, EXPLORE, SHARE, PRINT, ANSWER))
    explore = next(node for node in tree.nodes if node.step == EXPLORE)
    assert explore.kind is NodeKind.STEP
    leaf = answer_leaf(tree)
    assert leaf.correct and tree.path(leaf)[-2].output.strip() == "6"


# ASTRO's backtrack in the plain format (mined ASTRO traces teach it): a comment step that rolls back.
PLAIN_COUNT, PLAIN_SPOIL, PLAIN_SHARE, PLAIN_DOUBLE, PLAIN_PRINT = (
    split_action(step)[1] for step in (COUNT, SPOIL, SHARE, DOUBLE, PRINT))
PLAIN_ANSWER = "<answer>Each child gets \\boxed{6} apples.<end_of_answer>"


def plain_chain(*steps: str) -> MenuPolicy:
    """A plain-format policy whose k-th step is `steps[k]` (steps counted by their end markers)."""
    return MenuPolicy(lambda prompt: [steps[min(prompt.count("<end_of_step>") + prompt.count("<end_of_code>"),
                                                len(steps) - 1)]])


def plain_search(policy: MenuPolicy) -> tuple[Tree, InProcessExecutor]:
    executor = InProcessExecutor()
    result = run_rollouts([Problem("apples", QUESTION, "6")], MCTSConfig(width=1, rollouts=1, max_depth=8),
                          generator=policy, executor=executor, checker=BoxedChecker(), pipeline_groups=1)
    return result.trees[0], executor


def test_an_astro_backtrack_rolls_back_so_later_programs_leave_the_branch_out() -> None:
    backtrack = astro_backtrack("the neighbour keeps those apples", 1).text
    tree, executor = plain_search(plain_chain(PLAIN_COUNT, PLAIN_SPOIL, backtrack, PLAIN_SHARE, PLAIN_PRINT,
                                              PLAIN_ANSWER))
    later = [program for batch in executor.calls for program in batch if "share" in program]
    assert answer_leaf(tree).correct and later and all("apples = 100" not in program for program in later)


def test_an_astro_backtrack_may_follow_a_wrong_output_and_the_search_goes_on() -> None:
    backtrack = astro_backtrack("the result 24 does not check out", 1).text
    tree, _ = plain_search(plain_chain(PLAIN_COUNT, PLAIN_DOUBLE, PLAIN_PRINT, backtrack, PLAIN_SHARE, PLAIN_PRINT,
                                       PLAIN_ANSWER))
    assert next(node for node in tree.nodes if node.step == backtrack).kind is NodeKind.STEP
    assert answer_leaf(tree).correct


def test_mcts_config_rejects_an_unknown_step_format() -> None:
    with pytest.raises(ValueError, match="step_format must be one of rstar, coat"):
        MCTSConfig(step_format="cot")


# --- evaluation -----------------------------------------------------------------------------------


def evaluate_coat(policy: MenuPolicy, modes: Sequence[str], step_format: str = "coat"):
    return evaluate_modes([Problem("apples", QUESTION, "6")], [parse_mode(mode) for mode in modes],
                          EvalSearchConfig(pipeline_groups=1, max_depth=8, step_format=step_format),
                          generator=policy, executor=InProcessExecutor(), checker=FractionChecker())


def test_greedy_and_majority_evaluation_of_a_coat_policy() -> None:
    results = evaluate_coat(scripted_chain(COUNT, SPOIL, REFLECT, SHARE, PRINT, ANSWER), ["greedy", "maj@3"])
    for result in results:
        [record] = result.records
        assert (record.correct, record.extracted_answer, record.status) == (True, "6", "ok")
        steps = parse_coat_solution(record.prediction)
        assert MetaAction.REFLECT in [step.action for step in steps]


def test_an_rstar_policy_evaluated_as_coat_states_no_answer() -> None:
    plain = MenuPolicy(lambda prompt: ["# Step 1: Count the apples\napples = 3 * 4\n<end_of_step>"])
    [result] = evaluate_coat(plain, ["greedy"])
    [record] = result.records
    assert (record.correct, record.status) == (False, "no_answer")


# --- mining -----------------------------------------------------------------------------------------


def branching_menu(prompt: str) -> list[str]:
    """Count, then share / double / divide by zero; after doubling, print or reflect."""
    _, steps = parse_coat_trajectory(prompt)
    live = live_path(steps)
    if prompt.endswith("<end_of_output>\n"):
        return [ANSWER]
    if not live:
        return [COUNT]
    if len(live) == 1:
        return [SHARE, DOUBLE, BAD_SHARE]
    if "apples * 2" in live[-1].text and steps[-1].action is MetaAction.CONTINUE:
        return [PRINT, REFLECT]
    return [PRINT]


@pytest.fixture(scope="module")
def coat_tree_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    executor = InProcessExecutor()
    result: RolloutResult = run_rollouts(
        [Problem("p1", QUESTION, "6")], MCTSConfig(width=3, rollouts=12, max_depth=8, step_format="coat"),
        generator=MenuPolicy(branching_menu), executor=executor, checker=BoxedChecker(), pipeline_groups=1)
    path = tmp_path_factory.mktemp("coat_nodes") / "nodes.parquet"
    pq.write_table(pa.Table.from_pylist(result.node_rows("r", 1)), path)
    return path


def test_mining_coat_rows_from_a_coat_tree_keep_one_token_per_step_and_grade_correct(coat_tree_file: Path) -> None:
    kinds = set(pq.read_table(coat_tree_file).column("kind").to_pylist())
    assert {"answer", "error"} <= kinds
    result = mine([coat_tree_file], problems(), MiningConfig(sft_format="coat"))
    rows = result.sft.to_pylist()
    assert rows and {row["sft_format"] for row in rows} == {"coat"}
    judge = SolutionJudge(InProcessExecutor(), BoxedChecker(), step_format="coat")
    for row in rows:
        assert row["prompt"] == render_prompt(QUESTION)
        steps = parse_coat_solution(row["completion"])  # a doubled token would leave an empty step: rejected
        assert all(not step.step.text.startswith(tuple(COAT_TOKENS)) for step in steps)
        assert judge.judge([row["prompt"]], [row["completion"]], ["6"])[0].correct
    detours = [step for row in rows for step in parse_coat_solution(row["completion"])
               if step.action is not MetaAction.CONTINUE]
    assert detours and all("Back to step" in step.step.text for step in detours)
    assert result.pairs.num_rows == mine([coat_tree_file], problems()).pairs.num_rows


def test_restart_prompts_from_a_coat_tree_keep_one_token_per_step(coat_tree_file: Path) -> None:
    rows = restart_prompts([coat_tree_file], problems(), RestartConfig(step_format="coat")).to_pylist()
    prefixes = [row for row in rows if row["prefix_steps"]]
    assert prefixes
    for row in prefixes:
        _, steps = parse_coat_trajectory(row["prompt"])
        assert len(steps) == row["prefix_steps"]


def test_mining_coat_rows_of_an_rstar_tree_are_the_format_tuning_rows(tree_file: Path) -> None:  # noqa: F811
    mined = mine([tree_file], problems(), MiningConfig(sft_format="coat"))
    assert mined.sft.to_pylist() == coat_sft_rows([tree_file], problems()).to_pylist()


# --- bootstrap and the tokens a COAT policy needs ---------------------------------------------------------


def test_the_coat_bootstrap_writes_the_teachers_steps_all_continuing() -> None:
    teacher, _ = make_curriculum(4, 0, seed=3, levels=(EASIEST_LEVEL,))
    for problem, row in zip(teacher, bootstrap_sft_rows(teacher, "coat"), strict=True):
        steps = parse_coat_solution(row["completion"])
        assert {step.action for step in steps} == {MetaAction.CONTINUE}
        assert live_path(steps) == solve(problem)


def test_coat_sft_that_would_not_add_the_tokens_fails_before_training(tmp_path: Path, tiny_model: Path) -> None:
    table = write_table(tmp_path / "sft.parquet", [{"prompt": render_prompt(QUESTION), "completion": COUNT}])
    with pytest.raises(TrainingInputError, match=r"lacks the chain-of-action-thought token.*add_step_tokens"):
        train_sft([table], tmp_path / "sft", base_model=str(tiny_model),
                  overrides={"step_format": "coat", "add_step_tokens": False})


def test_coat_evaluation_of_a_policy_without_the_tokens_fails_before_generating(tiny_model: Path) -> None:
    benchmark = Benchmark("apples", [Problem("apples", QUESTION, "6")])
    with pytest.raises(EvalInputError, match="lacks the chain-of-action-thought token"):
        evaluate(tiny_model, [benchmark], EvalConfig(step_format="coat"))


@pytest.mark.slow
def test_a_format_tuned_policy_gets_the_tokens_and_answers_in_coat_greedily(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    rows = [{**row, "completion": render_coat_solution(continue_steps(parse_solution(row["completion"])))}
            for row in sft_rows()]
    table = write_table(tmp_path / "sft.parquet", rows)
    policy = train_sft([table], tmp_path / "policy", base_model=str(tiny_model),
                       overrides={**FAST_SFT, "num_train_epochs": 30, "step_format": "coat"})
    assert missing_coat_tokens(AutoTokenizer.from_pretrained(policy).get_added_vocab()) == []
    sums = [Problem(row["problem_id"], parse_trajectory(row["prompt"])[0], str(2 * index + 1))
                 for index, row in enumerate(rows)]
    config = EvalConfig(step_format="coat", max_step_tokens=48, max_depth=4, sandbox=SandboxConfig(workers=1),
                        grader_workers=1)
    report = evaluate(policy, [Benchmark("sums", sums)], config)
    [summary] = report.summary
    assert summary.accuracy >= 0.75
    for prediction in report.rows.column("prediction").to_pylist():
        assert {step.action for step in parse_coat_solution(prediction)} == {MetaAction.CONTINUE}
