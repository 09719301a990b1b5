"""Mining rules on hand-built trees (expected pairs and trajectories written out), the SQL against the
Python tree walk on random trees, input validation, and the `kaizen mine` command."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_store.mining import MiningConfig, MiningInputError, astro_reflection, cli_mine, mine, render_node_step
from data_store.schema import SchemaError
from search.steps import SolutionStep, render_prompt, render_solution, render_trajectory

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is 2 + 2?"


def _load_benchmark(name: str) -> ModuleType:
    """Import a script from benchmarks/ (not a package) by path."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def step_text(node_id: int, depth: int) -> str:
    """A distinct step per node: siblings differ in a 30-character run of one letter."""
    return (
        f"# Step {depth}: idea {node_id}\n"
        + "abcdefghijklmnopqrstuvwxyz"[node_id % 26] * 30
        + f"\nv = {node_id}\n<end_of_step>"
    )


def answer_text(answer: str) -> str:
    return f"<answer>The answer is \\boxed{{{answer}}}.<end_of_answer>"


def tree(*nodes: dict, run: str = "run", round_number: int = 1, problem_id: str = "p1") -> list[dict]:
    """Complete hand-written nodes (depth from the parents, default texts) into nodes-table rows."""
    depth = {-1: -1}
    rows = []
    for spec in sorted(nodes, key=lambda n: n["node_id"]):
        node_id, parent_id = spec["node_id"], spec["parent_id"]
        depth[node_id] = depth[parent_id] + 1
        kind = spec.get("kind", "root" if parent_id == -1 else "step")
        answer = spec.get("answer", "4" if spec.get("correct") else "5") if kind == "answer" else None
        default_step = (
            "" if kind == "root" else answer_text(answer) if kind == "answer" else step_text(node_id, depth[node_id])
        )
        rows.append(
            {
                "run": run,
                "round": round_number,
                "problem_id": problem_id,
                "node_id": node_id,
                "parent_id": parent_id,
                "depth": depth[node_id],
                "step": spec.get("step", default_step),
                "code": "",
                "output": spec.get("output"),
                "error": spec.get("error"),
                "kind": kind,
                "answer": answer,
                "correct": spec.get("correct"),
                "visits": 1,
                "q_value": float(spec.get("q", 0.0)),
                "ppm_score": None,
            }
        )
    return rows


def root() -> dict:
    return {"node_id": 0, "parent_id": -1}


def step(node_id: int, parent_id: int, q: float, **extra) -> dict:
    return {"node_id": node_id, "parent_id": parent_id, "q": q, **extra}


def leaf(node_id: int, parent_id: int, correct: bool | None, q: float | None = None, **extra) -> dict:
    q = (1.0 if correct else -1.0) if q is None else q
    return {"node_id": node_id, "parent_id": parent_id, "kind": "answer", "correct": correct, "q": q, **extra}


def write_nodes(directory: Path, rows: list[dict], name: str = "nodes.parquet") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def problems_table(*problem_ids: str) -> pa.Table:
    ids = problem_ids or ("p1",)
    return pa.table({"problem_id": list(ids), "problem": [QUESTION] * len(ids), "answer": ["4"] * len(ids)})


def mined(tmp_path: Path, rows: list[dict], **config) -> tuple[list[dict], list[dict]]:
    result = mine(
        [write_nodes(tmp_path / "nodes", rows)],
        problems_table(*sorted({r["problem_id"] for r in rows})),
        MiningConfig(**config),
    )
    return result.pairs.to_pylist(), result.sft.to_pylist()


def step_pairs(pairs: list[dict]) -> list[tuple[int, int, int]]:
    return [(p["node_id"], p["chosen_id"], p["rejected_id"]) for p in pairs if p["pair_kind"] == "step"]


def fan_out(children: list[tuple[int, float, bool | str]]) -> list[dict]:
    """root -> node 1 -> the given children, each above one leaf: a correct (True) or wrong (False)
    answer, or an "error" / "depth_limit" leaf. Leaf ids are the child's id + 100."""
    nodes = [root(), step(1, 0, 0.0)]
    for child_id, q, outcome in children:
        nodes.append(step(child_id, 1, q))
        if isinstance(outcome, bool):
            nodes.append(leaf(child_id + 100, child_id, outcome))
        else:
            nodes.append(
                {"node_id": child_id + 100, "parent_id": child_id, "kind": outcome, "q": -1.0, "error": "boom"}
            )
    return tree(*nodes)


# --- step pairs -----------------------------------------------------------------------------------


def test_top_two_correct_leading_children_pair_with_bottom_two_wrong_leading(tmp_path: Path) -> None:
    rows = fan_out(
        [(2, 0.9, True), (3, 0.8, True), (4, 0.7, True), (5, -0.1, False), (6, -0.8, False), (7, -0.9, False)]
    )
    pairs, _ = mined(tmp_path, rows)
    assert step_pairs(pairs) == [(1, 2, 6), (1, 2, 7), (1, 3, 6), (1, 3, 7)]


def test_pairs_below_the_margin_are_dropped(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.25, True), (3, 0.125, True), (4, -0.25, False)])
    pairs, _ = mined(tmp_path, rows)
    # 0.25 - (-0.25) = 0.5 is kept (>=); 0.125 - (-0.25) = 0.375 is not
    assert step_pairs(pairs) == [(1, 2, 4)]


def test_margin_is_configurable(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.25, True), (3, 0.125, True), (4, -0.25, False)])
    pairs, _ = mined(tmp_path, rows, margin=0.3)
    assert step_pairs(pairs) == [(1, 2, 4), (1, 3, 4)]


def test_a_margin_equal_to_the_threshold_up_to_float_rounding_is_kept(tmp_path: Path) -> None:
    # Q values are visit averages: 0.7 - 0.2 is 0.49999999999999994 in floating point
    pairs, _ = mined(tmp_path, fan_out([(2, 0.7, True), (3, 0.2, False)]))
    assert step_pairs(pairs) == [(1, 2, 3)]


@pytest.mark.parametrize("margin", [-1.0, float("nan")])
def test_a_negative_or_nan_margin_is_refused(margin: float) -> None:
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        MiningConfig(margin=margin)


def test_steps_closer_than_the_edit_distance_are_not_paired(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True), (3, 0.8, True), (4, -0.9, False)])
    base = "# Step 2: same idea\n"
    texts = {2: base + "y" + "x" * 19, 3: base + "x" * 20, 4: base + "y" * 20}  # 19 and 20 edits from 4
    for row in rows:
        row["step"] = texts.get(row["node_id"], row["step"])
    pairs, _ = mined(tmp_path, rows)
    assert step_pairs(pairs) == [(1, 3, 4)]


def test_min_edit_distance_is_configurable(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True), (3, 0.8, True), (4, -0.9, False)])
    base = "# Step 2: same idea\n"
    texts = {2: base + "y" + "x" * 19, 3: base + "x" * 20, 4: base + "y" * 20}
    for row in rows:
        row["step"] = texts.get(row["node_id"], row["step"])
    pairs, _ = mined(tmp_path, rows, min_edit_distance=19)
    assert step_pairs(pairs) == [(1, 2, 4), (1, 3, 4)]


def test_error_and_depth_limit_leaves_lead_to_neither_side(tmp_path: Path) -> None:
    pairs, _ = mined(tmp_path, fan_out([(2, 0.9, True), (3, -0.9, "error"), (4, -0.95, "depth_limit")]))
    assert step_pairs(pairs) == []


def test_equal_q_values_fall_to_the_lower_node_id(tmp_path: Path) -> None:
    rows = fan_out(
        [(5, 0.5, True), (3, 0.5, True), (4, 0.5, True), (8, -0.5, False), (6, -0.5, False), (7, -0.5, False)]
    )
    pairs, _ = mined(tmp_path, rows)
    assert step_pairs(pairs) == [(1, 3, 6), (1, 3, 7), (1, 4, 6), (1, 4, 7)]


def test_a_child_leading_both_ways_is_never_paired_with_itself(tmp_path: Path) -> None:
    nodes = [
        root(),
        step(1, 0, 0.0),
        step(2, 1, 0.0),
        leaf(3, 2, True),
        leaf(4, 2, False),
        step(5, 1, -0.75),
        leaf(6, 5, False),
    ]
    pairs, _ = mined(tmp_path, tree(*nodes), min_edit_distance=0)  # the two answers differ in one character
    # at node 1, child 2 is on both sides (it leads to a correct and a wrong answer) but is only paired with 5
    assert step_pairs(pairs) == [(1, 2, 5), (2, 3, 4)]


def test_a_child_leading_both_ways_is_not_paired_with_itself_at_margin_and_edit_distance_zero(tmp_path: Path) -> None:
    nodes = [
        root(), step(1, 0, 0.0), step(2, 1, 0.0), leaf(3, 2, True), leaf(4, 2, False), step(5, 1, -0.75),
        leaf(6, 5, False),
    ]
    # neither the margin (2 against 2 is 0 >= 0) nor the edit distance (none asked) rules the self-pair out
    pairs, _ = mined(tmp_path, tree(*nodes), margin=0.0, min_edit_distance=0)
    assert step_pairs(pairs) == [(1, 2, 5), (2, 3, 4)]


def test_edit_distance_is_measured_on_the_steps_not_their_outputs(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True), (3, -0.9, False)])
    code = "# Now print the final answer\nprint(total)\n<end_of_code>"
    steps = {2: (code, "4"), 3: (code.replace("total", "totals"), "NameError: " + "x" * 40)}
    for row in rows:
        row["step"], row["output"] = steps.get(row["node_id"], (row["step"], row["output"]))
    # one character apart as written, though their rendered outputs are 40+ characters apart
    pairs, _ = mined(tmp_path, rows)
    assert step_pairs(pairs) == []


def test_step_pair_prompt_is_the_question_and_the_path_to_the_node(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True), (3, -0.9, False)])
    pairs, _ = mined(tmp_path, rows)
    pair = next(p for p in pairs if p["pair_kind"] == "step")
    step_one = next(r for r in rows if r["node_id"] == 1)
    chosen = next(r for r in rows if r["node_id"] == 2)
    assert pair["prompt"] == render_trajectory(QUESTION, [SolutionStep(step_one["step"])])
    assert pair["chosen"] == render_solution([SolutionStep(chosen["step"])])
    assert (pair["q_chosen"], pair["q_rejected"], pair["margin"]) == (0.9, -0.9, pytest.approx(1.8))


# --- trajectories ---------------------------------------------------------------------------------


def three_trajectories() -> list[dict]:
    """Correct a (mean 0.5, min 0), correct b (mean 0.5, min 0.25), correct c (mean 0.25), wrong d, e."""
    return tree(
        root(),
        step(1, 0, 0.0),
        leaf(2, 1, True, q=1.0),  # a: (0 + 1) / 2 = 0.5, min 0
        step(3, 0, 0.25),
        leaf(4, 3, True, q=0.75),  # b: 0.5, min 0.25
        step(5, 0, -0.5),
        leaf(6, 5, True, q=1.0),  # c: 0.25
        step(7, 0, -0.5),
        leaf(8, 7, False, q=-1.0),  # d: -0.75
        step(9, 0, 0.5),
        leaf(10, 9, False, q=-0.5),  # e: 0
    )


def test_sft_keeps_the_top_k_correct_trajectories_by_mean_q_then_min_q(tmp_path: Path) -> None:
    _, sft = mined(tmp_path, three_trajectories(), sft_per_problem=2)
    assert [(row["rank"], row["leaf_id"], row["mean_q"], row["min_q"]) for row in sft] == [
        (1, 4, 0.5, 0.25),
        (2, 2, 0.5, 0.0),
    ]


def test_means_equal_up_to_float_rounding_fall_to_the_higher_min_q(tmp_path: Path) -> None:
    rows = tree(
        root(),
        step(1, 0, 0.1),
        leaf(2, 1, True, q=0.2),  # mean (0.1 + 0.2) / 2 = 0.15000000000000002 in floating point, min 0.1
        step(3, 0, 0.15),
        leaf(4, 3, True, q=0.15),  # mean 0.15, min 0.15
    )
    _, sft = mined(tmp_path, rows, sft_per_problem=1)
    assert [row["leaf_id"] for row in sft] == [4]


def test_sft_row_is_prompt_and_rendered_solution(tmp_path: Path) -> None:
    rows = tree(
        root(),
        step(1, 0, 0.5, step="# Step 1: add\ntotal = 2 + 2\n<end_of_step>", output="ignored"),
        step(2, 1, 0.5, step="# Now print the final answer\nprint(total)\n<end_of_code>", output="4"),
        leaf(3, 2, True, step="<answer>The total is \\boxed{4}.<end_of_answer>"),
    )
    _, sft = mined(tmp_path, rows)
    assert sft[0]["prompt"] == render_prompt(QUESTION)
    assert sft[0]["completion"] == (
        "# Step 1: add\ntotal = 2 + 2\n<end_of_step>\n"
        "# Now print the final answer\nprint(total)\n<end_of_code>\n"
        "<output>4<end_of_output>\n"
        "<answer>The total is \\boxed{4}.<end_of_answer>\n"
    )


def test_trajectory_pairs_best_correct_against_worst_wrong_by_mean_q(tmp_path: Path) -> None:
    pairs, sft = mined(tmp_path, three_trajectories())
    trajectory = [p for p in pairs if p["pair_kind"] == "trajectory"]
    # best correct: b (0.5, min 0.25), a (0.5, min 0); worst wrong: d (-0.75), e (0)
    assert [(p["chosen_id"], p["rejected_id"], p["margin"]) for p in trajectory] == [
        (2, 8, 1.25),
        (2, 10, 0.5),
        (4, 8, 1.25),
        (4, 10, 0.5),
    ]
    assert {p["prompt"] for p in trajectory} == {render_prompt(QUESTION)}
    assert trajectory[0]["chosen"] == next(row["completion"] for row in sft if row["leaf_id"] == 2)


def test_trajectory_pairs_need_no_margin(tmp_path: Path) -> None:
    # a verified answer against a wrong one: the outcome, not a Q estimate, says which is better
    rows = tree(root(), step(1, 0, 0.2), leaf(2, 1, True, q=0.2), step(3, 0, 0.1), leaf(4, 3, False, q=0.1))
    pairs, _ = mined(tmp_path, rows)
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs if p["pair_kind"] == "trajectory"] == [(2, 4)]


def test_unsolved_tree_gives_no_sft_rows_and_counts_as_unsolved(tmp_path: Path) -> None:
    rows = tree(root(), step(1, 0, -0.5), leaf(2, 1, False))
    result = mine([write_nodes(tmp_path, rows)], problems_table(), MiningConfig())
    assert result.sft.num_rows == 0
    assert result.problem_status.to_pylist() == [
        {"run": "run", "round": 1, "problem_id": "p1", "answers": 1, "correct_answers": 0, "solved": False}
    ]


# --- ASTRO traces ---------------------------------------------------------------------------------


def test_astro_trace_walks_the_failed_branch_says_why_and_backtracks(tmp_path: Path) -> None:
    rows = tree(
        root(),
        step(1, 0, 0.5, step="# Step 1: set x\nx = 2\n<end_of_step>"),
        step(
            2,
            1,
            -1.0,
            kind="error",
            step="# Step 2: divide\ny = x / 0\n<end_of_step>",
            error="ZeroDivisionError: division by zero",
        ),
        step(3, 1, 0.75, step="# Step 2: add\ny = x + 2\n<end_of_step>"),
        leaf(4, 3, True, step="<answer>So \\boxed{4}.<end_of_answer>"),
    )
    _, sft = mined(tmp_path, rows, sft_format="astro")
    assert sft[0]["completion"] == (
        "# Step 1: set x\nx = 2\n<end_of_step>\n"
        "# Step 2: divide\ny = x / 0\n<end_of_step>\n"
        "# But wait, running this code fails with ZeroDivisionError: division by zero. "
        "Let me go back to step 1 and try a different way.\n<end_of_step>\n"
        "# Step 2: add\ny = x + 2\n<end_of_step>\n"
        "<answer>So \\boxed{4}.<end_of_answer>\n"
    )
    assert sft[0]["sft_format"] == "astro"


def test_astro_trace_names_the_wrong_answer_and_can_start_over(tmp_path: Path) -> None:
    rows = tree(
        root(),
        step(1, 0, -0.5, step="# Step 1: guess\nx = 5\n<end_of_step>"),
        leaf(2, 1, False, answer="5", step="<answer>\\boxed{5}<end_of_answer>"),
        step(3, 0, 0.5, step="# Step 1: add\nx = 2 + 2\n<end_of_step>"),
        leaf(4, 3, True, step="<answer>\\boxed{4}<end_of_answer>"),
    )
    _, sft = mined(tmp_path, rows, sft_format="astro")
    assert sft[0]["completion"] == (
        "# Step 1: guess\nx = 5\n<end_of_step>\n"
        "# But wait, the result 5 does not check out. "
        "Let me start over and try a different way.\n<end_of_step>\n"
        "# Step 1: add\nx = 2 + 2\n<end_of_step>\n"
        "<answer>\\boxed{4}<end_of_answer>\n"
    )


def test_astro_trace_goes_back_to_the_steps_in_force_after_an_earlier_backtrack(tmp_path: Path) -> None:
    went_back = "# But wait, this is wrong. Let me go back to step 1 and try a different way.\n<end_of_step>"
    rows = tree(
        root(),
        step(1, 0, 0.5, step="# Step 1: set x\nx = 2\n<end_of_step>"),
        step(2, 1, 0.5, step="# Step 2: spoil x\nx = 100\n<end_of_step>"),
        step(3, 2, 0.5, step=went_back),  # the path's own backtrack: step 2 is out
        step(4, 3, -1.0, kind="error", step="# Step 2: divide\ny = x / 0\n<end_of_step>",
             error="ZeroDivisionError: division by zero"),
        step(5, 3, 0.75, step="# Step 2: add\ny = x + 2\n<end_of_step>"),
        leaf(6, 5, True, step="<answer>So \\boxed{4}.<end_of_answer>"),
    )
    _, sft = mined(tmp_path, rows, sft_format="astro")
    assert "fails with ZeroDivisionError: division by zero. Let me go back to step 1 and" in sft[0]["completion"]


def test_astro_trace_has_no_detour_for_a_wrong_answer_read_off_the_shared_output(tmp_path: Path) -> None:
    rows = tree(
        root(),
        step(1, 0, 0.5, step="# Step 1: add\nx = 2 + 2\n<end_of_step>"),
        leaf(2, 1, False, answer="5", step="<answer>\\boxed{5}<end_of_answer>"),
        leaf(3, 1, True, step="<answer>\\boxed{4}<end_of_answer>"),
    )
    _, sft = mined(tmp_path, rows, sft_format="astro")
    assert sft[0]["completion"] == "# Step 1: add\nx = 2 + 2\n<end_of_step>\n<answer>\\boxed{4}<end_of_answer>\n"


def test_astro_trace_of_a_wrong_answer_without_a_result_says_so() -> None:
    reflection = astro_reflection("answer", None, None, back_to_step=1)
    assert "None" not in reflection and "without a final result" in reflection


def test_astro_trace_never_shows_a_malformed_step_as_the_branch_tried(tmp_path: Path) -> None:
    from search.mcts import MALFORMED_STEP_ERROR

    rows = tree(
        root(),
        step(1, 0, 0.5),
        step(2, 1, -1.0, kind="error", step="total = a +", error=MALFORMED_STEP_ERROR),
        leaf(3, 1, True),
    )
    _, astro = mined(tmp_path, rows, sft_format="astro")
    _, plain = mined(tmp_path / "plain", rows)
    assert astro[0]["completion"] == plain[0]["completion"]


def test_astro_trace_never_shows_a_closed_malformed_step_as_the_branch_tried(tmp_path: Path) -> None:
    from search.mcts import MALFORMED_STEP_ERROR

    rows = tree(
        root(),
        step(1, 0, 0.5, step="# Step 1: add\nx = 2 + 2\n<end_of_step>"),
        step(2, 1, 0.5, step="# Now print the final answer\nprint(x)\n<end_of_code>", output="4"),
        # a step where the answer belonged: closed, but out of the format
        step(3, 2, -1.0, kind="error", step="# Step 3: check\ny = x\n<end_of_step>", error=MALFORMED_STEP_ERROR),
        leaf(4, 2, True, step="<answer>\\boxed{4}<end_of_answer>"),
    )
    _, astro = mined(tmp_path, rows, sft_format="astro")
    _, plain = mined(tmp_path / "plain", rows)
    assert astro[0]["completion"] == plain[0]["completion"]


def test_astro_trace_without_any_failure_is_the_plain_solution(tmp_path: Path) -> None:
    rows = tree(root(), step(1, 0, 0.5), leaf(2, 1, True))
    _, astro = mined(tmp_path, rows, sft_format="astro")
    _, plain = mined(tmp_path / "plain", rows)
    assert astro[0]["completion"] == plain[0]["completion"]


# --- the SQL against the tree walk -------------------------------------------------------------------


def _normalised(rows: list[dict]) -> list[dict]:
    return [
        {key: pytest.approx(value) if isinstance(value, float) else value for key, value in row.items()} for row in rows
    ]


def test_the_generator_shards_a_table_with_fewer_trees_than_shards_at_tree_boundaries() -> None:
    generator = _load_benchmark("gen_nodes")
    nodes, _ = generator.generate(1000, seed=0)
    parts = generator._split_by_tree(nodes, 10)
    assert sum(part.num_rows for part in parts) == nodes.num_rows
    assert all(part["node_id"][0].as_py() == 0 for part in parts)


@pytest.mark.parametrize("sft_format", ["rstar", "astro"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sql_mining_equals_the_python_tree_walk_on_random_trees(tmp_path: Path, seed: int, sft_format: str) -> None:
    generator, bench = _load_benchmark("gen_nodes"), _load_benchmark("bench_mining")
    nodes, problems = generator.generate(6000, seed=seed)
    path = tmp_path / "nodes.parquet"
    pq.write_table(nodes, path)
    config = MiningConfig(sft_format=sft_format, margin=0.3, min_edit_distance=25)
    result = mine([path], problems, config)
    walk_pairs, walk_sft = bench.mine_by_tree_walk(nodes, problems, config)
    assert result.pairs.num_rows > 50 and result.sft.num_rows > 10  # the trees are not degenerate
    assert _normalised(result.pairs.to_pylist()) == [
        {k: row[k] for k in result.pairs.column_names} for row in walk_pairs
    ]
    assert _normalised(result.sft.to_pylist()) == [{k: row[k] for k in result.sft.column_names} for row in walk_sft]


# --- several files, validation, CLI -----------------------------------------------------------------


def test_nodes_from_several_rounds_and_shards_are_mined_together(tmp_path: Path) -> None:
    first = write_nodes(tmp_path / "round-1", fan_out([(2, 0.9, True), (3, -0.9, False)]))
    second = write_nodes(
        tmp_path / "round-2",
        [dict(row, round=2) for row in fan_out([(2, 0.9, True), (3, -0.9, False)])],
        "nodes-00001.parquet",
    )
    result = mine([first, second.parent], problems_table(), MiningConfig())
    assert sorted({(p["round"], p["pair_kind"]) for p in result.pairs.to_pylist()}) == [
        (1, "step"),
        (1, "trajectory"),
        (2, "step"),
        (2, "trajectory"),
    ]
    assert [row["round"] for row in result.sft.to_pylist()] == [1, 2]


def test_missing_columns_are_named_with_the_file(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k not in ("q_value", "kind")} for row in fan_out([(2, 0.9, True)])]
    path = write_nodes(tmp_path, rows)
    with pytest.raises(SchemaError, match=rf"{re.escape(str(path))}.*missing columns: kind, q_value"):
        mine([path], problems_table(), MiningConfig())


def test_dangling_parent_id_is_named(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)])
    next(row for row in rows if row["node_id"] == 2)["parent_id"] = 77
    path = write_nodes(tmp_path, rows)
    with pytest.raises(
        MiningInputError, match=rf"parent_id=77 of run=run round=1 problem_id=p1 node_id=2 in {re.escape(str(path))}"
    ):
        mine([path], problems_table(), MiningConfig())


def test_problem_ids_missing_from_the_problems_file_are_named(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)]) + [dict(row, problem_id="p9") for row in fan_out([(2, 0.9, True)])]
    with pytest.raises(MiningInputError, match=r"1 problem id\(s\) in the nodes are not in the problems file: p9"):
        mine([write_nodes(tmp_path, rows)], problems_table("p1"), MiningConfig())


def test_duplicate_node_ids_are_rejected(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)])
    rows.append(dict(rows[-1]))
    with pytest.raises(
        MiningInputError, match="node id appears 2 times in one tree: run=run round=1 problem_id=p1 node_id=102"
    ):
        mine([write_nodes(tmp_path, rows)], problems_table(), MiningConfig())


def test_a_node_id_in_two_files_names_both(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)])
    first = write_nodes(tmp_path / "a", rows)
    second = write_nodes(tmp_path / "b", rows)
    with pytest.raises(MiningInputError, match=rf"in {re.escape(str(first))}, {re.escape(str(second))}"):
        mine([first, second], problems_table(), MiningConfig())


def test_the_same_file_named_twice_is_read_once(tmp_path: Path) -> None:
    path = write_nodes(tmp_path / "nodes", fan_out([(2, 0.9, True), (3, -0.9, False)]))
    same_file = path.parent / ".." / "nodes" / path.name
    result = mine([path.parent, same_file], problems_table(), MiningConfig())
    assert result.sft.num_rows == 1


def test_a_nan_q_value_is_rejected(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True), (3, -0.9, False)])
    next(row for row in rows if row["node_id"] == 3)["q_value"] = float("nan")
    with pytest.raises(MiningInputError, match="1 row\\(s\\) have a NaN q_value, e.g. .*node_id=3"):
        mine([write_nodes(tmp_path, rows)], problems_table(), MiningConfig())


def test_a_missing_q_value_names_a_node(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)])
    next(row for row in rows if row["node_id"] == 2)["q_value"] = None
    with pytest.raises(MiningInputError, match="1 row\\(s\\) have no q_value, e.g. .*node_id=2 in"):
        mine([write_nodes(tmp_path, rows)], problems_table(), MiningConfig())


def test_a_problem_id_repeated_in_the_problems_table_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(MiningInputError, match="problem id p1 appears 2 times"):
        mine([write_nodes(tmp_path, fan_out([(2, 0.9, True)]))], problems_table("p1", "p1"), MiningConfig())


def test_a_depth_inconsistent_with_the_parent_is_rejected(tmp_path: Path) -> None:
    rows = fan_out([(2, 0.9, True)])
    next(row for row in rows if row["node_id"] == 102)["depth"] = 7
    with pytest.raises(MiningInputError, match="depth that is not their parent's depth \\+ 1.*node_id=102"):
        mine([write_nodes(tmp_path, rows)], problems_table(), MiningConfig())


def test_rendered_nodes_concatenate_to_render_solution_of_the_path() -> None:
    steps = [("# Step 1: a\nx = 1\n<end_of_step>", "1"), ("print(x)\n<end_of_code>", "1"), (answer_text("1"), None)]
    kinds = ["step", "step", "answer"]
    rendered = "".join(render_node_step(text, output, kind) for (text, output), kind in zip(steps, kinds, strict=True))
    expected = [SolutionStep(steps[0][0]), SolutionStep(steps[1][0], "1"), SolutionStep(steps[2][0])]
    assert rendered == render_solution(expected)


def test_output_of_a_failed_final_code_step_is_not_rendered() -> None:
    assert (
        render_node_step("print(1 / 0)\n<end_of_code>", "ZeroDivisionError", "error") == "print(1 / 0)\n<end_of_code>\n"
    )


def _problems_file(directory: Path) -> Path:
    path = directory / "problems.jsonl"
    path.write_text('{"id": "p1", "problem": "What is 2 + 2?", "answer": "4"}\n')
    return path


def test_cli_writes_pairs_and_sft_and_prints_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nodes = write_nodes(tmp_path / "nodes", fan_out([(2, 0.9, True), (3, -0.9, False)]))
    out = tmp_path / "out"
    code = cli_mine(
        [
            "--nodes",
            str(nodes),
            "--problems",
            str(_problems_file(tmp_path)),
            "--out",
            str(out),
            "--sft-per-problem",
            "1",
        ]
    )
    assert code == 0
    assert pq.read_table(out / "pairs.parquet").num_rows == 2
    assert pq.read_table(out / "sft.parquet").column_names[:2] == ["prompt", "completion"]
    printed = capsys.readouterr().out
    assert "1 step pairs + 1 trajectory pairs" in printed and "1 sft rows (rstar)" in printed
    assert "round 1: 1 of 1 problems solved" in printed


def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = fan_out([(2, 0.9, True)])
    rows[-1]["parent_id"] = 55
    nodes = write_nodes(tmp_path / "nodes", rows)
    out = tmp_path / "out"
    code = cli_mine(["--nodes", str(nodes), "--problems", str(_problems_file(tmp_path)), "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 1
    assert error.startswith("kaizen mine: error: ") and error.count("\n") == 1 and "parent_id=55" in error
    assert not out.exists()


def test_cli_usage_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli_mine(["--nodes", str(tmp_path), "--problems", "p.jsonl", "--out", str(tmp_path), "--sft-format", "plain"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().startswith("kaizen mine: error: argument --sft-format")


def test_cli_refuses_an_output_path_that_is_a_file_before_mining(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    nodes = write_nodes(tmp_path / "nodes", fan_out([(2, 0.9, True)]))
    (tmp_path / "afile").write_text("")
    code = cli_mine(["--nodes", str(nodes), "--problems", str(_problems_file(tmp_path)), "--out", str(tmp_path / "afile")])
    assert code == 1 and "cannot be created" in capsys.readouterr().err
