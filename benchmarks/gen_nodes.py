"""Synthetic `nodes` tables shaped like rStar-Math MCTS trees, for the mining benchmark and tests.

Trees are grown level by level for all problems at once (numpy, no per-row Python): each expanded
node gets 5-8 children; a child is an answer (more likely deeper), an error, a plain step, or a
depth_limit leaf at the maximum depth; the rollouts that reach a node are spread over its step
children, and only children that some rollout reaches are expanded. Q-values follow the terminal
rewards under each node (+1 correct, -1 wrong or error) plus noise, so margins and correct/wrong
leads behave like real trees. A third of the siblings reuse the previous sibling's wording with other
numbers, so the edit-distance filter has near-duplicates to reject.

    python benchmarks/gen_nodes.py --rows 10000000 --out /tmp/synthetic_nodes
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_store.parquet import write_table

ROOT_PARENT = -1

PHRASES = pa.array(
    [
        "Compute the total number of items after combining both groups",
        "Find the remaining amount once the expenses are subtracted",
        "Express the unknown side length using the Pythagorean theorem",
        "Count the arrangements where the two books stay together",
        "Set up the equation relating the speeds and the times",
        "Simplify the fraction by dividing out the common factor",
        "Evaluate the polynomial at the given point",
        "Sum the arithmetic series using the closed form",
        "Convert the percentage into a decimal multiplier",
        "Solve the linear system by elimination of one variable",
        "Determine the probability as favourable over total outcomes",
        "Apply the remainder theorem to find the constant term",
        "Use the area formula for a triangle with base and height",
        "Factor the quadratic and keep the positive root",
        "Multiply the rate by the elapsed time to get the distance",
        "Take the least common multiple of the two periods",
    ]
)
VARIABLES = pa.array(["total", "remaining", "side", "count", "speed", "ratio", "value", "result"])
OPERATORS = pa.array(["+", "-", "*", "//"])
ERRORS = pa.array(
    [
        "Traceback (most recent call last):\nZeroDivisionError: division by zero",
        "Traceback (most recent call last):\nNameError: name 'x' is not defined",
        "Traceback (most recent call last):\nTypeError: unsupported operand type(s)",
        "TimeoutError: the program ran longer than 5 s",
    ]
)


@dataclass
class TreeShape:
    """How the synthetic search trees grow."""

    rollouts: int = field(default=16, metadata={"help": "rollouts per tree (rStar: 16 after round 1)"})
    min_width: int = field(default=5, metadata={"help": "fewest children of an expanded node"})
    max_width: int = field(default=8, metadata={"help": "most children of an expanded node"})
    max_depth: int = field(
        default=8, metadata={"help": "children at this depth that are not answers end as depth_limit"}
    )
    error_rate: float = field(default=0.08, metadata={"help": "share of children whose code fails"})
    rounds: int = field(default=2, metadata={"help": "each problem gets one tree per round"})
    q_noise: float = field(default=0.15, metadata={"help": "standard deviation of the noise added to Q"})


def _answer_rate(depth: int, max_depth: int) -> float:
    """Chance that a child at `depth` is a final answer: rare near the root, common deep down."""
    return 0.05 + 0.55 * (depth - 1) / max(max_depth - 1, 1)


def _grow(num_trees: int, shape: TreeShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Grow all trees level by level; returns flat arrays in level order (parents before children)."""
    tree = [np.arange(num_trees)]
    parent = [np.full(num_trees, ROOT_PARENT)]
    depth = [np.zeros(num_trees, dtype=np.int64)]
    kind = [np.zeros(num_trees, dtype=np.int8)]  # 0 root, 1 step, 2 answer, 3 error, 4 depth_limit
    sibling = [np.zeros(num_trees, dtype=np.int64)]
    solve_rate = rng.beta(0.25, 2.0, num_trees)  # per-problem difficulty: many hard problems stay unsolved
    correct = [np.zeros(num_trees, dtype=bool)]
    frontier = np.arange(num_trees)  # global indices of the nodes expanded at this level
    frontier_tree = np.arange(num_trees)
    reach = np.full(num_trees, shape.rollouts)  # rollouts arriving at each frontier node
    offset = num_trees
    for level in range(1, shape.max_depth + 1):
        if frontier.size == 0:
            break
        width = rng.integers(shape.min_width, shape.max_width + 1, frontier.size)
        child_parent = np.repeat(frontier, width)
        child_tree = np.repeat(frontier_tree, width)
        first_child = np.cumsum(width) - width
        child_sibling = np.arange(child_parent.size) - np.repeat(first_child, width)
        draw = rng.random(child_parent.size)
        child_kind = np.ones(child_parent.size, dtype=np.int8)
        child_kind[draw < _answer_rate(level, shape.max_depth)] = 2
        child_kind[draw > 1.0 - shape.error_rate] = 3
        if level == shape.max_depth:
            child_kind[child_kind == 1] = 4
        child_correct = (child_kind == 2) & (rng.random(child_parent.size) < solve_rate[child_tree])
        # Each rollout that reached a parent continues into one of its step children at random.
        child_index = np.arange(child_parent.size) + offset
        step_children = child_kind == 1
        arrivals = np.repeat(np.arange(frontier.size), reach)
        picks = first_child[arrivals] + rng.integers(0, width[arrivals])
        picks = picks[step_children[picks]]
        next_reach = np.bincount(picks, minlength=child_parent.size)
        for array, values in (
            (tree, child_tree),
            (parent, child_parent),
            (depth, np.full(child_parent.size, level)),
            (kind, child_kind),
            (sibling, child_sibling),
            (correct, child_correct),
        ):
            array.append(values)
        expanded = next_reach > 0
        frontier, frontier_tree, reach = child_index[expanded], child_tree[expanded], next_reach[expanded]
        offset += child_parent.size
    return {
        name: np.concatenate(arrays)
        for name, arrays in (
            ("tree", tree),
            ("parent", parent),
            ("depth", depth),
            ("kind", kind),
            ("sibling", sibling),
            ("correct", correct),
        )
    }


def _q_values(
    nodes: dict[str, np.ndarray], shape: TreeShape, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Q = mean terminal reward below a node (+1 correct, -1 wrong/error) plus noise; visits = terminals below."""
    size = nodes["parent"].size
    reward = np.zeros(size)
    visits = np.zeros(size, dtype=np.int64)
    terminal = np.isin(nodes["kind"], (2, 3))
    reward[terminal] = np.where(nodes["correct"][terminal], 1.0, -1.0)
    visits[terminal] = 1
    for level in range(int(nodes["depth"].max()), 0, -1):  # children before parents
        at_level = np.flatnonzero(nodes["depth"] == level)
        np.add.at(reward, nodes["parent"][at_level], reward[at_level])
        np.add.at(visits, nodes["parent"][at_level], visits[at_level])
    q = np.where(visits > 0, reward / np.maximum(visits, 1), 0.0) + rng.normal(0.0, shape.q_noise, size)
    return np.clip(q, -1.0, 1.0), visits


def _step_texts(
    nodes: dict[str, np.ndarray], answer: pa.Array, rng: np.random.Generator
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Step text, code and output per node, built column-wise with pyarrow string kernels."""
    size = nodes["parent"].size
    phrase = rng.integers(0, len(PHRASES), size)
    variable = rng.integers(0, len(VARIABLES), size)
    # Near-duplicate siblings: same wording as the previous sibling, other numbers.
    copies = (nodes["sibling"] > 0) & (rng.random(size) < 1 / 3)
    for _ in range(3):  # a chain of copies resolves within a few passes
        phrase[copies] = phrase[np.flatnonzero(copies) - 1]
        variable[copies] = variable[np.flatnonzero(copies) - 1]
    left = pc.cast(pa.array(rng.integers(2, 500, size)), pa.string())
    right = pc.cast(pa.array(rng.integers(2, 500, size)), pa.string())
    operator = OPERATORS.take(pa.array(rng.integers(0, len(OPERATORS), size)))
    name = VARIABLES.take(pa.array(variable))
    code = pc.binary_join_element_wise(
        "# Step ",
        pc.cast(pa.array(nodes["depth"]), pa.string()),
        ": ",
        PHRASES.take(pa.array(phrase)),
        "\n",
        name,
        " = ",
        left,
        " ",
        operator,
        " ",
        right,
        "\nprint(",
        name,
        ")",
        "",
    )
    is_answer = pa.array(nodes["kind"] == 2)
    answer_text = pc.binary_join_element_wise("<answer>The answer is \\boxed{", answer, "}.<end_of_answer>", "")
    step = pc.if_else(is_answer, answer_text, pc.binary_join_element_wise(code, "\n<end_of_step>", ""))
    step = pc.if_else(pa.array(nodes["kind"] == 0), "", step)
    code = pc.if_else(pa.array(np.isin(nodes["kind"], (0, 2))), "", code)
    is_error = pa.array(nodes["kind"] == 3)
    error = pc.if_else(is_error, ERRORS.take(pa.array(rng.integers(0, len(ERRORS), size))), pa.nulls(size, pa.string()))
    output = pc.cast(pa.array(rng.integers(0, 10_000, size)), pa.string())
    output = pc.if_else(pa.array(np.isin(nodes["kind"], (0, 2))), pa.nulls(size, pa.string()), output)
    return step, code, output, error


def _reference_answer(problem_index: np.ndarray) -> np.ndarray:
    return problem_index * 7 % 1000


def _answers(nodes: dict[str, np.ndarray], problem_index: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """The problem's reference answer for correct leaves, some other number for wrong ones."""
    reference = _reference_answer(problem_index)
    wrong = reference + rng.integers(1, 50, reference.size)
    return pc.cast(pa.array(np.where(nodes["correct"], reference, wrong)), pa.string())


def generate(
    num_rows: int, *, seed: int = 0, shape: TreeShape | None = None, run: str = "bench"
) -> tuple[pa.Table, pa.Table]:
    """A nodes table of about `num_rows` rows (whole trees) and the matching problems table."""
    shape = shape or TreeShape()
    rng = np.random.default_rng(seed)
    pilot_trees = 64  # tree size depends on the shape; measure it rather than model it
    mean_tree_size = _grow(pilot_trees, shape, rng)["tree"].size / pilot_trees
    nodes = _grow(max(1, int(num_rows / mean_tree_size * 1.1)), shape, rng)
    # Per-tree breadth-first order: sort by tree (stable keeps level order), then number within tree.
    order = np.argsort(nodes["tree"], kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    tree_sorted = nodes["tree"][order]
    tree_start = np.searchsorted(tree_sorted, np.arange(tree_sorted.max() + 1))
    node_id = position - tree_start[nodes["tree"]]
    has_parent = nodes["parent"] >= 0
    parent_id = np.where(has_parent, node_id[np.where(has_parent, nodes["parent"], 0)], ROOT_PARENT)
    q_value, visits = _q_values(nodes, shape, rng)
    problem_index = nodes["tree"] // shape.rounds
    answer = _answers(nodes, problem_index, rng)
    step, code, output, error = _step_texts(nodes, answer, rng)
    kind_names = pa.array(["root", "step", "answer", "error", "depth_limit"])
    is_answer = nodes["kind"] == 2
    table = pa.table(
        {
            "run": pa.repeat(pa.scalar(run, pa.string()), order.size),
            "round": pa.array(1 + nodes["tree"] % shape.rounds, pa.int32()),
            "problem_id": pc.binary_join_element_wise("synthetic-", pc.cast(pa.array(problem_index), pa.string()), ""),
            "node_id": pa.array(node_id, pa.int64()),
            "parent_id": pa.array(parent_id, pa.int64()),
            "depth": pa.array(nodes["depth"], pa.int32()),
            "step": step,
            "code": code,
            "output": output,
            "error": error,
            "kind": kind_names.take(pa.array(nodes["kind"])),
            "answer": pc.if_else(pa.array(is_answer), answer, pa.nulls(order.size, pa.string())),
            "correct": pa.array(np.where(is_answer, nodes["correct"], False), mask=~is_answer),
            "visits": pa.array(visits, pa.int64()),
            "q_value": pa.array(q_value, pa.float64()),
            "ppm_score": pa.nulls(order.size, pa.float64()),
        }
    ).take(pa.array(order))
    rows_through_tree = np.cumsum(np.bincount(tree_sorted))
    last_tree = min(int(np.searchsorted(rows_through_tree, num_rows)), rows_through_tree.size - 1)
    table = table.slice(0, int(rows_through_tree[last_tree]))
    return table, _problems(int(problem_index.max()) + 1)


def _problems(count: int) -> pa.Table:
    index = pa.array(np.arange(count))
    text = pc.cast(index, pa.string())
    return pa.table(
        {
            "problem_id": pc.binary_join_element_wise("synthetic-", text, ""),
            "problem": pc.binary_join_element_wise("Synthetic problem ", text, ": compute the value described.", ""),
            "answer": pc.cast(pa.array(_reference_answer(np.arange(count))), pa.string()),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="approximate number of nodes (whole trees)")
    parser.add_argument("--shards", type=int, default=10, help="files to split the trees over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="directory for nodes-*.parquet and problems.parquet")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    nodes, problems = generate(args.rows, seed=args.seed)
    generated = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    write_table(problems, args.out / "problems.parquet", table="problems")
    for shard, part in enumerate(_split_by_tree(nodes, args.shards)):
        write_table(part, args.out / f"nodes-{shard:05d}.parquet", table="nodes")
    print(
        f"{nodes.num_rows} nodes in {problems.num_rows} problems x rounds; "
        f"generated in {generated - started:.1f} s, written in {time.perf_counter() - generated:.1f} s -> {args.out}"
    )
    return 0


def _split_by_tree(nodes: pa.Table, shards: int) -> list[pa.Table]:
    """Cut the (tree-ordered) table into about equal parts at tree boundaries (roots)."""
    roots = np.flatnonzero(nodes["node_id"].to_numpy() == 0)
    # A cut past the last root (fewer trees than shards) is the table's end; repeated cuts give empty parts.
    positions = np.searchsorted(roots, np.linspace(0, nodes.num_rows, shards + 1)[1:-1])
    cuts = [int(roots[position]) if position < len(roots) else nodes.num_rows for position in positions]
    bounds = [0, *cuts, nodes.num_rows]
    return [nodes.slice(start, stop - start) for start, stop in itertools.pairwise(bounds) if stop > start]


if __name__ == "__main__":
    sys.exit(main())
