"""RL prompts and chain-of-action-thought SFT rows from stored search trees (Satori).

Two tables come from the `nodes` of one or more rounds:

- RL prompts for restart-and-explore: per tree, the question alone, plus the question followed by
  intermediate states of its best correct trajectory and of its worst wrong one (by mean step Q,
  as mining ranks them), so the policy learns to finish a good start and to recover from a bad
  one. Each row carries the reference answer for the reward and says where it restarts
  (`prefix_kind` none | correct | wrong, `prefix_steps`).
- COAT format-tuning rows (TRL prompt/completion, the `sft` schema with `sft_format` coat): the
  problem's top correct trajectories with the tree's nearest failure woven in, as Satori's format
  tuning teaches: a step that failed in the sandbox is followed by `<|reflect|>`, a branch that
  reached a wrong answer by `<|explore|>`, each rolling back to where the correct path resumes.

Trees searched in either step format work: a step stored without a token (rstar) is led by
`<|continue|>`, one searched in COAT keeps its own token, and rollbacks count the live steps.

The nodes are read and validated with DuckDB exactly as mining does; trees are then small enough
to walk in Python. Step text is rendered by `data_store.mining.render_node_step`, the one rule for
how a stored node appears in a solution.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_store.mining import (
    MiningConfig,
    MiningInputError,
    connect_nodes,
    failure_reason,
    find_node_files,
    load_trees,
    render_node_step,
    trajectory_mean_q,
    validate_trees,
)
from data_store.parquet import write_table
from data_store.schema import SFT, SchemaError, conform
from search.coat import (
    CoatStep,
    MetaAction,
    is_astro_backtrack,
    live_path,
    meta_step,
    plain_coat_steps,
    render_coat_solution,
    split_action,
)
from search.mcts import MALFORMED_STEP_ERROR
from search.steps import SolutionStep, StepFormat, StepKind, parse_step, render_prompt

STEP_FORMATS = tuple(StepFormat)
PREFIX_KINDS = ("none", "correct", "wrong")

RL_PROMPTS = pa.schema(
    [
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("run", pa.string(), nullable=False),
        pa.field("round", pa.int64(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("prefix_kind", pa.string(), nullable=False),  # none | correct | wrong
        pa.field("prefix_steps", pa.int64(), nullable=False),  # steps of the trajectory already in the prompt
    ]
)

_NODE_COLUMNS = "run, round, problem_id, node_id, parent_id, depth, step, output, error, kind, answer, correct, q_value"


@dataclass(frozen=True)
class RestartConfig:
    """Which intermediate states become RL prompts."""

    trajectories_per_kind: int = field(
        default=1, metadata={"help": "correct (best by mean Q) and wrong (worst by mean Q) trajectories per tree"}
    )
    prefixes_per_trajectory: int = field(
        default=2, metadata={"help": "intermediate states per trajectory, evenly spaced before its answer"}
    )
    include_question: bool = field(default=True, metadata={"help": "also a row with the bare question per tree"})
    step_format: str = field(default="rstar", metadata={"help": "rstar or coat (prefix steps led by <|continue|>)"})
    threads: int | None = field(default=None, metadata={"help": "DuckDB threads; None uses every core"})

    def __post_init__(self) -> None:
        if self.step_format not in STEP_FORMATS:
            raise ValueError(f"step_format must be one of {', '.join(STEP_FORMATS)}, got {self.step_format!r}")
        if self.trajectories_per_kind < 0 or self.prefixes_per_trajectory < 0:
            raise ValueError("trajectories_per_kind and prefixes_per_trajectory must be >= 0")


# --- trees --------------------------------------------------------------------------------------


@dataclass
class _Tree:
    """One search tree: its nodes by id and the children of each."""

    run: str
    round: int
    problem_id: str
    root_id: int
    nodes: dict[int, dict[str, Any]]
    children: dict[int, list[int]]

    def path(self, node_id: int) -> list[dict[str, Any]]:
        """The nodes from the root's first child down to `node_id`."""
        path = []
        while self.nodes[node_id]["parent_id"] != -1:
            path.append(self.nodes[node_id])
            node_id = self.nodes[node_id]["parent_id"]
        return path[::-1]

    def trajectories(self, correct: bool) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """(answer leaf, path) for its correct or wrong answers, best first for correct ones, worst first for wrong ones.

        Ranked as mining ranks them: mean step Q, then min step Q, then the lower leaf id.
        """
        found = [(leaf, self.path(leaf["node_id"])) for leaf in self.nodes.values()
                 if leaf["kind"] == "answer" and leaf["correct"] is correct]  # None: not judged, neither
        sign = -1 if correct else 1

        def rank(item: tuple[dict[str, Any], list[dict[str, Any]]]) -> tuple[float, float, int]:
            leaf, path = item
            values = [node["q_value"] for node in path]
            return sign * trajectory_mean_q(values), sign * min(values), leaf["node_id"]

        return sorted(found, key=rank)

    def nearest_failure(self, node_id: int) -> dict[str, Any] | None:
        """The shallowest failed leaf (a sandbox error, or a wrong answer) in the subtree of `node_id`."""
        failures = [node for node in self._subtree(node_id) if _failure_action(node) is not None]
        return min(failures, key=lambda node: (node["depth"], node["node_id"]), default=None)

    def _subtree(self, node_id: int) -> Iterator[dict[str, Any]]:
        stack = [node_id]
        while stack:
            current = stack.pop()
            yield self.nodes[current]
            stack.extend(self.children[current])


def _failure_action(node: dict[str, Any]) -> MetaAction | None:
    """Reflect after a code step that failed in the sandbox, explore after a wrong answer; None otherwise."""
    if node["kind"] == "answer" and node["correct"] is False:
        return MetaAction.EXPLORE
    # Malformed generations are error nodes too; only real code is worth reflecting on.
    if (node["kind"] == "error" and node["error"] != MALFORMED_STEP_ERROR
            and parse_step(node["step"] or "").kind in (StepKind.CODE, StepKind.FINAL_CODE)):
        return MetaAction.REFLECT
    return None


def _load_trees(node_files: Sequence[str | Path], problems: pa.Table, threads: int | None) -> list[_Tree]:
    """Every tree in the nodes files, checked for consistency the way mining checks them."""
    if "problem_id" not in problems.column_names:
        raise SchemaError("problems table has no problem_id column")
    files = find_node_files(node_files)
    if not files:
        raise MiningInputError("no nodes files given")
    with closing(connect_nodes(files, MiningConfig(threads=threads))) as con:
        load_trees(con)
        validate_trees(con, files, problems.select(["problem_id"]))
        rows = con.sql(f"SELECT {_NODE_COLUMNS} FROM source ORDER BY run, round, problem_id, node_id").fetchall()
    names = _NODE_COLUMNS.split(", ")
    grouped: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        node = dict(zip(names, row, strict=True))
        grouped[(node["run"], node["round"], node["problem_id"])].append(node)
    trees = []
    for (run, round_number, problem_id), nodes in grouped.items():
        children: dict[int, list[int]] = {node["node_id"]: [] for node in nodes}
        for node in nodes:
            if node["parent_id"] != -1:
                children[node["parent_id"]].append(node["node_id"])
        root_id = next(node["node_id"] for node in nodes if node["parent_id"] == -1)
        by_id = {node["node_id"]: node for node in nodes}
        trees.append(_Tree(run, round_number, problem_id, root_id, by_id, children))
    return trees


def _questions(problems: pa.Table, column: str) -> dict[str, str | None]:
    if column not in problems.column_names:
        raise SchemaError(f"problems table has no {column} column")
    return dict(zip(problems.column("problem_id").to_pylist(), problems.column(column).to_pylist(), strict=True))


def _render(nodes: Sequence[dict[str, Any]], action: MetaAction | None) -> str:
    """Nodes as solution text; with a meta action, each step not led by a token yet gets its token (COAT)."""
    # A COAT step renders exactly as the plain step with its token in front (see search.coat).
    return "".join(
        _token(node["step"] or "", action) + render_node_step(node["step"] or "", node["output"], node["kind"])
        for node in nodes
    )


def _token(step: str, action: MetaAction | None) -> str:
    # Steps searched in the coat format carry their own token already; a plain step gets `action`'s,
    # but an ASTRO backtrack reflects (it rolls back, as `_coat_steps` reads it).
    if action is None or split_action(step)[0] is not None:
        return ""
    return MetaAction.REFLECT.value if is_astro_backtrack(step) else action.value


def _coat_steps(nodes: Sequence[dict[str, Any]]) -> list[CoatStep]:
    """Stored steps as COAT steps: one without a token is a plain step (it continues the solution, or
    rolls it back when it is an ASTRO backtrack)."""
    steps = []
    for node in nodes:
        action, body = split_action(node["step"] or "")
        step = SolutionStep(body.strip())
        steps.append(CoatStep(action, step) if action is not None else plain_coat_steps([step])[0])
    return steps


# --- restart-and-explore prompts --------------------------------------------------------------------


def prefix_lengths(trajectory_steps: int, count: int) -> list[int]:
    """`count` evenly spaced prefix lengths strictly inside a trajectory of `trajectory_steps` steps."""
    inside = trajectory_steps - 1  # the last step is the answer: a prefix must leave something to do
    if inside < 1 or count < 1:
        return []
    return sorted({max(1, min(inside, round((index + 1) * trajectory_steps / (count + 1)))) for index in range(count)})


def restart_prompts(node_files: Sequence[str | Path], problems: pa.Table, config: RestartConfig | None = None) -> pa.Table:
    """RL prompt rows (schema `RL_PROMPTS`) from the trees in `node_files` (files or directories).

    `problems` needs problem_id, problem and answer. Raises MiningInputError or SchemaError on
    inconsistent input, before producing anything.
    """
    config = config or RestartConfig()
    questions, answers = _questions(problems, "problem"), _questions(problems, "answer")
    trees = _load_trees(node_files, problems, config.threads)
    unanswered = sorted({tree.problem_id for tree in trees if not answers.get(tree.problem_id)})
    if unanswered:
        raise MiningInputError(f"{len(unanswered)} problem(s) have no reference answer: {', '.join(unanswered[:5])}")
    action = MetaAction.CONTINUE if config.step_format == "coat" else None
    rows = []
    for tree in trees:
        base = {"answer": answers[tree.problem_id], "run": tree.run, "round": tree.round, "problem_id": tree.problem_id}
        prompt = render_prompt(questions[tree.problem_id])
        if config.include_question:
            rows.append({**base, "prompt": prompt, "prefix_kind": "none", "prefix_steps": 0})
        for kind in ("correct", "wrong"):
            for _, path in tree.trajectories(kind == "correct")[: config.trajectories_per_kind]:
                for length in prefix_lengths(len(path), config.prefixes_per_trajectory):
                    rows.append({**base, "prompt": prompt + _render(path[:length], action), "prefix_kind": kind,
                                 "prefix_steps": length})
    return pa.Table.from_pylist(rows, schema=RL_PROMPTS)


# --- COAT format tuning -------------------------------------------------------------------------------


def coat_completion(tree: _Tree, path: Sequence[dict[str, Any]]) -> str:
    """A correct trajectory in COAT, with the deepest detour the tree offers (none: every step continues).

    The detour leaves the path at its deepest node that has another child leading to a failure,
    follows that child to its nearest failure, then reflects or explores back to the node: "Back to
    step k" names the live steps (after the path's own rollbacks, in a tree searched in COAT) to keep.
    """
    for kept in range(len(path) - 1, -1, -1):
        branch_id = path[kept - 1]["node_id"] if kept else tree.root_id
        resume = live_path(_coat_steps(path[:kept]))
        for sibling in sorted(tree.children[branch_id]):
            if sibling == path[kept]["node_id"]:
                continue
            failure = tree.nearest_failure(sibling)
            if failure is None:
                continue
            # A wrong answer's detour stops at the final code step whose output it read: the answer step
            # would end generation (<end_of_answer>), so a policy could never explore after writing it.
            detour = [node for node in tree.path(failure["node_id"])[kept:] if node["kind"] != "answer"]
            if not detour:
                continue  # the wrong answer read the shared output: nothing was tried that could be gone back on
            reason = failure_reason(failure["kind"], failure["error"], failure["answer"])
            rollback = meta_step(_failure_action(failure), reason, len(resume))
            if live_path([*_coat_steps([*path[:kept], *detour]), rollback]) != resume:
                continue  # the detour rolled back into the shared steps itself: one rollback cannot restore them
            return (_render(path[:kept], MetaAction.CONTINUE) + _render(detour, MetaAction.CONTINUE)
                    + render_coat_solution([rollback]) + _render(path[kept:], MetaAction.CONTINUE))
    return _render(path, MetaAction.CONTINUE)


def coat_sft_rows(node_files: Sequence[str | Path], problems: pa.Table, per_problem: int = 2,
                  threads: int | None = None) -> pa.Table:
    """COAT format-tuning rows (the `sft` schema, sft_format coat): per tree, its top correct trajectories."""
    questions = _questions(problems, "problem")
    rows = []
    for tree in _load_trees(node_files, problems, threads):
        for rank, (leaf, path) in enumerate(tree.trajectories(correct=True)[:per_problem], start=1):
            values = [node["q_value"] for node in path]
            rows.append({
                "prompt": render_prompt(questions[tree.problem_id]), "completion": coat_completion(tree, path),
                "run": tree.run, "round": tree.round, "problem_id": tree.problem_id, "sft_format": "coat",
                "rank": rank, "leaf_id": leaf["node_id"], "mean_q": trajectory_mean_q(values), "min_q": min(values),
            })
    return conform(pa.Table.from_pylist(rows, schema=SFT), "sft")


def write_rl_prompts(table: pa.Table, path: str | Path) -> Path:
    """Write an RL prompts table atomically."""
    return write_table(table.cast(RL_PROMPTS), path)
