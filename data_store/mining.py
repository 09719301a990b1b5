"""Mining search trees into training data, as DuckDB SQL over the `nodes` table.

From the nodes of one or more rounds (any number of Parquet files) this builds, per rStar-Math:

- PPM step pairs. At every node, among its children, the top-2 by Q that lead to a correct answer
  (some descendant-or-self answer node is correct) against the bottom-2 by Q that lead to a wrong
  one (`error` and `depth_limit` leaves lead to neither); every chosen x rejected combination of two
  different children is kept when `q_chosen - q_rejected >= margin` and the two step texts are at
  least `min_edit_distance` characters apart. `prompt` = question + the path to the node.
- Trajectory pairs (the paper's final-answer relaxation): per tree, the 2 correct trajectories with
  the highest mean step Q against the 2 wrong ones with the lowest, every combination, without the
  margin: a verified answer against a wrong one needs no Q estimate to say which is better.
- SFT rows: per tree, the top-k correct trajectories by mean step Q (ties: higher min Q), either as
  plain solutions (`rstar`), as ASTRO traces that first walk a failed branch, say why it failed,
  and go back to the last good step (`astro`), or as Satori's chain-of-action-thought format-tuning
  rows, with `<|reflect|>` / `<|explore|>` rollbacks (`coat`, built by `data_store.rl_prompts`).

Q values are compared rounded to Q_DECIMALS places, so a margin of 0.7 - 0.2 (0.49999999999999994 in
floating point) counts as 0.5 and means that differ only by summation order tie. Ties everywhere
fall to the lower node id, so results are deterministic. Tree logic is SQL (window
functions, recursive CTEs over parent ids); Python only renders text, through `render_node_step`
and `search.steps`, the one place the step format lives, and measures edit distance (rapidfuzz).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rapidfuzz.distance import Levenshtein

from data_store.parquet import COMPRESSION, atomic_path, check_output_directory
from data_store.schema import SchemaError, check_schema, conform
from data_store.views import PROBLEM_STATUS_SELECT
from search.arguments import OneLineParser, field_help
from search.coat import astro_backtrack, live_path, plain_coat_steps
from search.mcts import MALFORMED_STEP_ERROR
from search.steps import (
    END_OF_CODE,
    SolutionStep,
    StepKind,
    parse_solution,
    parse_step,
    render_prompt,
    render_solution,
)

if TYPE_CHECKING:
    import duckdb

SFT_FORMATS = ("rstar", "astro", "coat")
NODE_KINDS = ("root", "step", "answer", "error", "depth_limit")
Q_DECIMALS = 9
"""Places Q values and their differences are rounded to before any comparison (see the docstring)."""
_NODES_FILE = re.compile(r"nodes(-\d+)?\.parquet")


class MiningInputError(ValueError):
    """The nodes or problems given to the miner are inconsistent; nothing was written."""


@dataclass(frozen=True)
class MiningConfig:
    """What to mine and how strictly."""

    margin: float = field(
        default=0.5, metadata={"help": "minimum q_chosen - q_rejected of a step pair (official rStar code: 0.5)"}
    )
    min_edit_distance: int = field(
        default=20, metadata={"help": "minimum Levenshtein distance between the two steps of a step pair"}
    )
    per_side: int = field(
        default=2, metadata={"help": "children (or trajectories) taken on each side of a pair: top-2 vs bottom-2"}
    )
    sft_per_problem: int = field(
        default=2, metadata={"help": "correct trajectories kept for SFT per problem and round (one search tree)"}
    )
    sft_format: str = field(
        default="rstar",
        metadata={"help": "rstar (plain solutions), astro (traces with a failed branch and backtracking) or coat "
                  "(chain-of-action-thought format tuning: steps led by meta-action tokens, reflect/explore rollbacks)"},
    )
    threads: int | None = field(default=None, metadata={"help": "DuckDB threads; None uses every core"})

    def __post_init__(self) -> None:
        if self.sft_format not in SFT_FORMATS:
            raise ValueError(f"sft_format must be one of {', '.join(SFT_FORMATS)}, got {self.sft_format!r}")
        if not self.margin >= 0 or self.margin == math.inf:  # also refuses NaN
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        if self.per_side < 1 or self.sft_per_problem < 0 or self.min_edit_distance < 0:
            raise ValueError("per_side must be >= 1; sft_per_problem and min_edit_distance must be >= 0")


@dataclass
class MiningResult:
    """The mined tables (schemas `pairs` and `sft`), per-tree bookkeeping and stage timings."""

    pairs: pa.Table
    sft: pa.Table
    problem_status: pa.Table  # run, round, problem_id, answers, correct_answers, solved
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        kinds = self.pairs.column("pair_kind").to_pylist()
        solved = sum(self.problem_status.column("solved").to_pylist())
        return (
            f"{kinds.count('step')} step pairs, {kinds.count('trajectory')} trajectory pairs, "
            f"{self.sft.num_rows} sft rows from {self.problem_status.num_rows} trees ({solved} solved)"
        )


# --- the one rendering rule -------------------------------------------------------------------


def render_node_step(step: str, output: str | None, kind: str) -> str:
    """A node's step as it appears in a solution: its output shows only after a final code step.

    The same rule as the search's own rendering (`search.mcts.Tree`): the output of a `step` node
    that parses as a final code step (closed by <end_of_code>) is shown, no other output is. A path
    renders as the concatenation of its nodes' renderings, which equals `search.steps.render_solution`
    of the whole path (a test holds both to that).
    """
    final_code = (
        kind == "step"
        and output is not None
        and step.rstrip().endswith(END_OF_CODE)  # implied by a final code step; parsing costs ~3 us a row
        and parse_step(step).kind is StepKind.FINAL_CODE
    )
    return render_solution([SolutionStep(step, output if final_code else None)])


def trajectory_mean_q(q_values: Sequence[float]) -> float:
    """A trajectory's mean step Q as the SQL ranks it: an exact sum, rounded to Q_DECIMALS places."""
    return round(math.fsum(q_values) / len(q_values), Q_DECIMALS)


def failure_reason(failure_kind: str, error: str | None, answer: str | None) -> str:
    """Why a failed branch failed, in words for a trace (ASTRO's backtrack, COAT's reflect or explore):
    the sandbox's error for a failed step, else the result that was wrong."""
    if failure_kind == "error":
        lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
        return f"running this code fails with {lines[-1][:200]}" if lines else "running this code fails"
    if answer is None:
        return "this ends without a final result"
    return f"the result {answer} does not check out"


def astro_reflection(failure_kind: str, error: str | None, answer: str | None, back_to_step: int) -> str:
    """The step that admits a failed branch and goes back, written as a comment-only code step."""
    reason = failure_reason(failure_kind, error, answer)
    return render_node_step(astro_backtrack(reason, back_to_step).text, None, "step")


def astro_completion(prefix: str, failed_branch: str, continuation: str, failure_kind: str, error: str | None,
                     answer: str | None) -> str:
    """An ASTRO trace: the shared prefix, the failed branch, the backtrack, then the correct rest.

    The backtrack goes back to the steps of the prefix still in force (`search.coat.live_path`: a
    backtrack earlier on the path left some out), which is what "go back to step k" keeps when the
    trace runs. A branch that itself went back into the prefix cannot be undone by one backtrack: the
    trace is then the plain solution.
    """
    shared = plain_coat_steps(parse_solution(prefix))
    resume = live_path(shared)
    reflection = astro_reflection(failure_kind, error, answer, len(resume))
    if live_path([*shared, *plain_coat_steps(parse_solution(failed_branch + reflection))]) != resume:
        return prefix + continuation
    return prefix + failed_branch + reflection + continuation


def _render_steps_udf(steps: pa.Array, outputs: pa.Array, kinds: pa.Array) -> pa.Array:
    return pa.array(
        [
            render_node_step(step or "", output, kind)
            for step, output, kind in zip(steps.to_pylist(), outputs.to_pylist(), kinds.to_pylist(), strict=True)
        ],
        pa.string(),
    )


def capped_edit_distance(first: str, second: str, cap: int) -> int:
    """Levenshtein distance, but at most `cap` (the bound lets rapidfuzz stop early)."""
    return 0 if cap <= 0 else min(Levenshtein.distance(first, second, score_cutoff=cap - 1), cap)


def _edit_distance_udf(first: pa.Array, second: pa.Array, cap: pa.Array) -> pa.Array:
    bound = cap[0].as_py() if len(cap) else 0
    return pa.array(
        [
            capped_edit_distance(a or "", b or "", bound)
            for a, b in zip(first.to_pylist(), second.to_pylist(), strict=True)
        ],
        pa.int64(),
    )


# --- input --------------------------------------------------------------------------------------


def find_node_files(paths: Sequence[str | Path]) -> list[Path]:
    """The nodes files named by `paths`: files as given, directories searched for `nodes[-NNNNN].parquet`."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*.parquet") if _NODES_FILE.fullmatch(p.name))
            if not matches:
                raise MiningInputError(f"no nodes files (nodes.parquet, nodes-NNNNN.parquet) under {path}")
            found += matches
        elif path.is_file():
            found.append(path)
        else:
            raise MiningInputError(f"nodes path {path} does not exist")
    # The same file named twice (by its directory and by its path) would double every node.
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def connect_nodes(files: Sequence[Path], config: MiningConfig) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the nodes files as the `source` view and the rendering UDFs registered
    (MiningInputError for a file that is not Parquet, SchemaError for missing columns)."""
    import duckdb  # noqa: PLC0415 - keep `kaizen` start-up light

    for path in files:
        try:
            check_schema(pq.read_schema(path), "nodes", source=str(path))
        except (pa.ArrowInvalid, OSError) as error:
            raise MiningInputError(f"{path} is not a readable Parquet file: {error}") from error
    con = duckdb.connect()
    if config.threads:
        con.execute(f"SET threads = {int(config.threads)}")
    con.read_parquet([str(path) for path in files], union_by_name=True).create_view("source")
    con.create_function(
        "render_step",
        _render_steps_udf,
        ["VARCHAR", "VARCHAR", "VARCHAR"],
        "VARCHAR",
        type="arrow",
        null_handling="special",
    )
    con.create_function(
        "edit_distance",
        _edit_distance_udf,
        ["VARCHAR", "VARCHAR", "BIGINT"],
        "BIGINT",
        type="arrow",
        null_handling="special",
    )
    return con


# --- SQL ---------------------------------------------------------------------------------------
# Trees are keyed by a 64-bit hash of (run, round, problem_id) so every join is on integers; the
# `tree` table maps keys back to names, and loading checks that no two trees share a key.

LOAD_SQL = """
CREATE TEMP TABLE node AS
SELECT hash(run, round, problem_id) AS tree, node_id, parent_id, depth, kind, correct, q_value,
       kind = 'error' AND error IS NOT DISTINCT FROM $malformed AS malformed
FROM source;
CREATE TEMP TABLE tree AS
SELECT hash(run, round, problem_id) AS tree, run, round, problem_id, count(*) AS nodes,
       count(*) FILTER (WHERE parent_id = -1) AS roots,
       min(node_id) FILTER (WHERE parent_id = -1) AS root_id
FROM source GROUP BY ALL;
"""

# Paths from each starting node up to the root, one row per (start, ancestor-or-self); columns in
# `{carry}` ride along from the start. Depth strictly decreases upward (checked), so it terminates.
ANCESTORS_SQL = """
WITH RECURSIVE up AS (
    SELECT n.tree, n.node_id AS start_id, {carry_start} n.node_id, n.parent_id, n.depth, n.q_value
    FROM node n JOIN {starts} s ON s.tree = n.tree AND s.node_id = n.node_id
    UNION ALL
    SELECT up.tree, up.start_id, {carry_up} p.node_id, p.parent_id, p.depth, p.q_value
    FROM up JOIN node p ON p.tree = up.tree AND p.node_id = up.parent_id
)
SELECT * FROM up
"""

# A malformed step (the policy broke the step format) is no branch a trace can show being tried.
LEAF_SQL = """
CREATE TEMP TABLE leaf AS
SELECT tree, node_id, correct AS leaf_correct, kind = 'error' OR correct = false AS leaf_failed, depth AS leaf_depth
FROM node WHERE kind = 'answer' OR (kind = 'error' AND NOT malformed AND $with_errors)
"""

# Per node: whether some answer below (or at) it is correct / wrong, and (ASTRO) the shallowest
# failed leaf below it.
LEAD_SQL = """
CREATE TEMP TABLE lead AS
SELECT tree, node_id, any_value(parent_id) AS parent_id, any_value(depth) AS depth, any_value(q_value) AS q_value,
       coalesce(bool_or(leaf_correct), false) AS leads_correct,
       coalesce(bool_or(NOT leaf_correct), false) AS leads_wrong,
       arg_min(start_id, (leaf_depth, start_id)) FILTER (WHERE leaf_failed) AS nearest_failure
FROM leaf_path GROUP BY tree, node_id
"""

CANDIDATE_SQL = """
CREATE TEMP TABLE candidate AS
WITH child AS (SELECT * FROM lead WHERE parent_id <> -1),
chosen AS (
    SELECT * FROM child WHERE leads_correct
    QUALIFY row_number() OVER (PARTITION BY tree, parent_id ORDER BY q_value DESC, node_id) <= $per_side
),
rejected AS (
    SELECT * FROM child WHERE leads_wrong
    QUALIFY row_number() OVER (PARTITION BY tree, parent_id ORDER BY q_value ASC, node_id) <= $per_side
)
SELECT c.tree, c.parent_id AS node_id, c.node_id AS chosen_id, r.node_id AS rejected_id,
       c.q_value AS q_chosen, r.q_value AS q_rejected
FROM chosen c JOIN rejected r ON r.tree = c.tree AND r.parent_id = c.parent_id
WHERE c.node_id <> r.node_id AND round(c.q_value - r.q_value, $q_decimals) >= $margin
"""

TRAJECTORY_SQL = """
CREATE TEMP TABLE trajectory AS
SELECT tree, start_id AS leaf_id, any_value(leaf_correct) AS correct,
       round(fsum(q_value) / count(*), $q_decimals) AS mean_q, min(q_value) AS min_q
FROM leaf_path WHERE depth >= 1 AND leaf_correct IS NOT NULL GROUP BY tree, start_id;
CREATE TEMP TABLE sft_leaf AS
SELECT tree, leaf_id, mean_q, min_q,
       row_number() OVER (PARTITION BY tree ORDER BY mean_q DESC, min_q DESC, leaf_id) AS rank
FROM trajectory WHERE correct QUALIFY rank <= $sft_per_problem;
CREATE TEMP TABLE trajectory_pair AS
WITH best AS (
    SELECT * FROM trajectory WHERE correct
    QUALIFY row_number() OVER (PARTITION BY tree ORDER BY mean_q DESC, min_q DESC, leaf_id) <= $per_side
),
worst AS (
    SELECT * FROM trajectory WHERE NOT correct
    QUALIFY row_number() OVER (PARTITION BY tree ORDER BY mean_q ASC, min_q ASC, leaf_id) <= $per_side
)
SELECT b.tree, b.leaf_id AS chosen_id, w.leaf_id AS rejected_id, b.mean_q AS q_chosen, w.mean_q AS q_rejected
FROM best b JOIN worst w USING (tree)
"""

# ASTRO: for each SFT trajectory, the deepest node on its path with another child that leads to a
# failure; the branch followed is that child's shallowest failed leaf (ties: lower ids).
DETOUR_SQL = """
CREATE TEMP TABLE sft_path AS
SELECT p.tree, p.start_id AS leaf_id, p.node_id, p.depth
FROM leaf_path p SEMI JOIN sft_leaf s ON s.tree = p.tree AND s.leaf_id = p.start_id;
CREATE TEMP TABLE detour AS
SELECT here.tree, here.leaf_id, here.depth AS back_to_depth, sibling.nearest_failure AS failure_id
FROM sft_path here
JOIN sft_path next ON next.tree = here.tree AND next.leaf_id = here.leaf_id AND next.depth = here.depth + 1
JOIN lead sibling ON sibling.tree = here.tree AND sibling.parent_id = here.node_id
JOIN leaf failure ON failure.tree = here.tree AND failure.node_id = sibling.nearest_failure
WHERE sibling.node_id <> next.node_id
  -- a wrong answer right at the fork read the shared output: the trace would have nothing to go back on
  AND NOT (sibling.nearest_failure = sibling.node_id AND failure.leaf_correct IS NOT NULL)
QUALIFY row_number() OVER (
    PARTITION BY here.tree, here.leaf_id ORDER BY here.depth DESC, failure.leaf_depth, sibling.nearest_failure
) = 1
"""

PREFIX_STARTS_SQL = "CREATE TEMP TABLE prefix_start AS SELECT DISTINCT tree, node_id FROM candidate"

SELECTED_LEAVES_SQL = """
CREATE TEMP TABLE selected_leaf AS
SELECT tree, leaf_id FROM sft_leaf
UNION SELECT tree, chosen_id FROM trajectory_pair
UNION SELECT tree, rejected_id FROM trajectory_pair
"""

WANTED_SQL = """
CREATE TEMP TABLE wanted AS
SELECT tree, chosen_id AS node_id FROM candidate
UNION SELECT tree, rejected_id FROM candidate
UNION SELECT tree, node_id FROM prefix_path WHERE depth >= 1
UNION SELECT lp.tree, lp.node_id FROM leaf_path lp
      SEMI JOIN selected_leaf s ON s.tree = lp.tree AND s.leaf_id = lp.start_id
WHERE lp.depth >= 1
"""

TEXT_SQL = """
CREATE TEMP TABLE text AS
SELECT hash(s.run, s.round, s.problem_id) AS tree, s.node_id, coalesce(s.step, '') AS step,
       render_step(s.step, s.output, s.kind) AS rendered, s.kind, s.output, s.error, s.answer
FROM source s SEMI JOIN wanted w ON w.tree = hash(s.run, s.round, s.problem_id) AND w.node_id = s.node_id
"""

STEP_PAIR_SQL = """
CREATE TEMP TABLE step_pair AS
SELECT c.* FROM candidate c
JOIN text a ON a.tree = c.tree AND a.node_id = c.chosen_id
JOIN text b ON b.tree = c.tree AND b.node_id = c.rejected_id
WHERE $min_edit_distance = 0 OR edit_distance(a.step, b.step, $min_edit_distance) >= $min_edit_distance
"""

# Text of a path: its nodes' renderings, root excluded, in depth order.
PATH_TEXT_SQL = """
CREATE TEMP TABLE prefix_text AS
SELECT p.tree, p.start_id AS node_id, string_agg(t.rendered, '' ORDER BY p.depth) AS text
FROM prefix_path p JOIN text t ON t.tree = p.tree AND t.node_id = p.node_id
WHERE p.depth >= 1 AND (p.tree, p.start_id) IN (SELECT (tree, node_id) FROM step_pair)
GROUP BY p.tree, p.start_id;
CREATE TEMP TABLE leaf_text AS
SELECT p.tree, p.start_id AS leaf_id, string_agg(t.rendered, '' ORDER BY p.depth) AS text
FROM leaf_path p JOIN text t ON t.tree = p.tree AND t.node_id = p.node_id
SEMI JOIN selected_leaf s ON s.tree = p.tree AND s.leaf_id = p.start_id
WHERE p.depth >= 1
GROUP BY p.tree, p.start_id
"""

PAIRS_SQL = """
SELECT q.prompt || coalesce(pt.text, '') AS prompt, a.rendered AS chosen, b.rendered AS rejected,
       t.run, t.round, t.problem_id, 'step' AS pair_kind, sp.node_id, sp.chosen_id, sp.rejected_id,
       sp.q_chosen, sp.q_rejected, sp.q_chosen - sp.q_rejected AS margin
FROM step_pair sp
JOIN tree t USING (tree)
JOIN problem_prompt q USING (problem_id)
JOIN text a ON a.tree = sp.tree AND a.node_id = sp.chosen_id
JOIN text b ON b.tree = sp.tree AND b.node_id = sp.rejected_id
LEFT JOIN prefix_text pt ON pt.tree = sp.tree AND pt.node_id = sp.node_id
UNION ALL
SELECT q.prompt, a.text, b.text, t.run, t.round, t.problem_id, 'trajectory', t.root_id, tp.chosen_id, tp.rejected_id,
       tp.q_chosen, tp.q_rejected, tp.q_chosen - tp.q_rejected
FROM trajectory_pair tp
JOIN tree t USING (tree)
JOIN problem_prompt q USING (problem_id)
JOIN leaf_text a ON a.tree = tp.tree AND a.leaf_id = tp.chosen_id
JOIN leaf_text b ON b.tree = tp.tree AND b.leaf_id = tp.rejected_id
ORDER BY run, round, problem_id, pair_kind, node_id, chosen_id, rejected_id
"""

SFT_SQL = """
SELECT q.prompt, lt.text AS completion, t.run, t.round, t.problem_id, 'rstar' AS sft_format,
       s.rank, s.leaf_id, s.mean_q, s.min_q
FROM sft_leaf s JOIN tree t USING (tree) JOIN problem_prompt q USING (problem_id)
JOIN leaf_text lt ON lt.tree = s.tree AND lt.leaf_id = s.leaf_id
ORDER BY run, round, problem_id, rank
"""

# The pieces of each ASTRO trace; `astro_completion` joins them. A trace without a detour is all prefix.
ASTRO_SQL = """
WITH piece AS (
    SELECT p.tree, p.leaf_id, p.depth, t.rendered,
           CASE WHEN d.back_to_depth IS NULL OR p.depth <= d.back_to_depth THEN 'prefix' ELSE 'continuation' END AS part
    FROM sft_path p
    JOIN text t ON t.tree = p.tree AND t.node_id = p.node_id
    LEFT JOIN detour d ON d.tree = p.tree AND d.leaf_id = p.leaf_id
    WHERE p.depth >= 1
    UNION ALL
    SELECT d.tree, d.leaf_id, f.depth, t.rendered, 'failed_branch'
    FROM detour d
    JOIN leaf_path f ON f.tree = d.tree AND f.start_id = d.failure_id AND f.depth > d.back_to_depth
    JOIN text t ON t.tree = f.tree AND t.node_id = f.node_id
    -- a wrong answer's branch stops at the output it read: <end_of_answer> ends generation, so a
    -- trace that went on after an answer step could never be acted out
    WHERE t.kind <> 'answer'
),
joined AS (
    SELECT tree, leaf_id,
           coalesce(string_agg(rendered, '' ORDER BY depth) FILTER (WHERE part = 'prefix'), '') AS prefix,
           coalesce(string_agg(rendered, '' ORDER BY depth) FILTER (WHERE part = 'failed_branch'), '') AS failed_branch,
           coalesce(string_agg(rendered, '' ORDER BY depth) FILTER (WHERE part = 'continuation'), '') AS continuation
    FROM piece GROUP BY tree, leaf_id
)
SELECT q.prompt, t.run, t.round, t.problem_id, s.rank, s.leaf_id, s.mean_q, s.min_q,
       d.back_to_depth, failure.kind AS failure_kind, failure.error AS failure_error,
       failure.answer AS failure_answer, j.prefix, j.failed_branch, j.continuation
FROM sft_leaf s JOIN tree t USING (tree) JOIN problem_prompt q USING (problem_id)
JOIN joined j ON j.tree = s.tree AND j.leaf_id = s.leaf_id
LEFT JOIN detour d ON d.tree = s.tree AND d.leaf_id = s.leaf_id
LEFT JOIN text failure ON failure.tree = d.tree AND failure.node_id = d.failure_id
ORDER BY t.run, t.round, t.problem_id, s.rank
"""

LINK_CHECK_SQL = """
WITH link AS (
    SELECT c.tree, c.node_id, c.parent_id,
           c.parent_id <> -1 AND p.node_id IS NULL AS dangling,
           (c.parent_id = -1 AND c.depth <> 0) OR c.depth <> p.depth + 1 AS bad_depth
    FROM node c LEFT JOIN node p ON p.tree = c.tree AND p.node_id = c.parent_id
)
SELECT count(*) FILTER (WHERE dangling),
       arg_min((tree, node_id, parent_id), (tree, node_id)) FILTER (WHERE dangling),
       count(*) FILTER (WHERE bad_depth),
       arg_min((tree, node_id), (tree, node_id)) FILTER (WHERE bad_depth)
FROM link
"""

# --- validation ---------------------------------------------------------------------------------


def _first(con: duckdb.DuckDBPyConnection, sql: str, parameters: list | None = None) -> tuple:
    """The first row of a query (all rows are fetched: DuckDB refuses new work while a result is open)."""
    rows = con.execute(sql, parameters).fetchall()
    return rows[0] if rows else ()


def _describe_node(con: duckdb.DuckDBPyConnection, files: Sequence[Path], tree: int, node_id: int) -> str:
    """`run=.. round=.. problem_id=.. node_id=.. in FILE[, FILE]` for an error message (error path only)."""
    run, round_number, problem_id = _first(con, "SELECT run, round, problem_id FROM tree WHERE tree = ?", [tree])
    located = _first(
        con,
        "SELECT string_agg(DISTINCT filename, ', ' ORDER BY filename) "
        "FROM read_parquet(?, union_by_name=true, filename=true) "
        "WHERE run = ? AND round = ? AND problem_id = ? AND node_id = ?",
        [[str(path) for path in files], run, round_number, problem_id, node_id],
    )
    where = f" in {located[0]}" if located and located[0] else ""
    return f"run={run} round={round_number} problem_id={problem_id} node_id={node_id}{where}"


def validate_trees(con: duckdb.DuckDBPyConnection, files: Sequence[Path], problem_ids: pa.Table) -> None:
    """Raise MiningInputError for the first inconsistency found in the loaded trees."""
    required = ("node_id", "parent_id", "depth", "kind", "q_value")
    nulls = _first(con, "SELECT " + ", ".join(f"count(*) - count({column})" for column in required) + " FROM node")
    for column, count in zip(required, nulls, strict=True):
        if count:
            example = _first(con, f"SELECT tree, node_id FROM node WHERE {column} IS NULL AND node_id IS NOT NULL LIMIT 1")
            where = f", e.g. {_describe_node(con, files, *example)}" if example else ""
            raise MiningInputError(f"nodes: {count} row(s) have no {column}{where}")
    # DuckDB orders NaN above every number, so a NaN Q would be the best child and trajectory.
    not_a_number = _first(con, "SELECT count(*), arg_min((tree, node_id), (tree, node_id)) FROM node WHERE isnan(q_value)")
    if not_a_number[0]:
        raise MiningInputError(
            f"nodes: {not_a_number[0]} row(s) have a NaN q_value, e.g. {_describe_node(con, files, *not_a_number[1])}"
        )
    if _first(con, "SELECT count(*) FILTER (WHERE run IS NULL OR round IS NULL OR problem_id IS NULL) FROM tree")[0]:
        raise MiningInputError("nodes: some rows have no run, round or problem_id")
    kinds = [
        row[0]
        for row in con.execute("SELECT DISTINCT kind FROM node WHERE kind NOT IN ?", [list(NODE_KINDS)]).fetchall()
    ]
    if kinds:
        raise MiningInputError(
            f"nodes: unknown kind value(s) {', '.join(map(repr, sorted(kinds)))}; expected {', '.join(NODE_KINDS)}"
        )
    if _first(con, "SELECT count(DISTINCT tree) <> count(*) FROM tree")[0]:
        raise MiningInputError("nodes: two trees hash to the same key; rename a run or problem id")

    con.register("known_problem", problem_ids)
    missing = [
        row[0]
        for row in con.execute(
            "SELECT DISTINCT problem_id FROM tree ANTI JOIN known_problem USING (problem_id) ORDER BY problem_id"
        ).fetchall()
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise MiningInputError(f"{len(missing)} problem id(s) in the nodes are not in the problems file: {shown}")

    duplicate = _first(
        con, "SELECT tree, node_id, count(*) FROM node GROUP BY tree, node_id HAVING count(*) > 1 LIMIT 1"
    )
    if duplicate:
        raise MiningInputError(
            f"nodes: node id appears {duplicate[2]} times in one tree: {_describe_node(con, files, *duplicate[:2])}"
        )
    roots = _first(con, "SELECT tree, roots FROM tree WHERE roots <> 1 LIMIT 1")
    if roots:
        run, round_number, problem_id = _first(con, f"SELECT run, round, problem_id FROM tree WHERE tree = {roots[0]}")
        raise MiningInputError(
            f"nodes: tree run={run} round={round_number} problem_id={problem_id} "
            f"has {roots[1]} root(s) (parent_id -1); expected 1"
        )
    # Parent links, checked in one pass: every parent exists, and depth grows by one per link (which
    # also rules out cycles, so the recursive walks up the tree terminate).
    dangling, dangling_example, bad_depth, bad_depth_example = _first(con, LINK_CHECK_SQL)
    if dangling:
        tree, node_id, parent_id = dangling_example
        raise MiningInputError(
            f"nodes: {dangling} node(s) have a parent_id that is not a node of their tree, "
            f"e.g. parent_id={parent_id} of {_describe_node(con, files, tree, node_id)}"
        )
    if bad_depth:
        raise MiningInputError(
            f"nodes: {bad_depth} node(s) have a depth that is not their parent's depth + 1 (0 for a root), "
            f"e.g. {_describe_node(con, files, *bad_depth_example)}"
        )


# --- mining ---------------------------------------------------------------------------------------


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


def _execute(con: duckdb.DuckDBPyConnection, statements: str, parameters: Mapping[str, object] | None = None) -> None:
    """Run `;`-separated statements, passing each the named parameters it uses."""
    for statement in filter(str.strip, statements.split(";")):
        used = {name: value for name, value in (parameters or {}).items() if f"${name}" in statement}
        con.execute(statement, used or None)


def load_trees(con: duckdb.DuckDBPyConnection) -> None:
    """The `node` and `tree` tables from the `source` view (LOAD_SQL)."""
    _execute(con, LOAD_SQL, {"malformed": MALFORMED_STEP_ERROR})


def _ancestors(starts: str, carry: Sequence[str] = ()) -> str:
    return ANCESTORS_SQL.format(
        starts=starts,
        carry_start="".join(f"s.{column}, " for column in carry),
        carry_up="".join(f"up.{column}, " for column in carry),
    )


def mine(node_files: Sequence[str | Path], problems: pa.Table, config: MiningConfig | None = None) -> MiningResult:
    """Mine pairs and SFT rows from the nodes in `node_files` (files or directories).

    `problems` needs `problem_id` and `problem` columns (see `data_store.problems.load_problems`).
    Raises MiningInputError or SchemaError, before producing anything, on inconsistent input.
    """
    config = config or MiningConfig()
    for column in ("problem_id", "problem"):
        if column not in problems.column_names:
            raise SchemaError(f"problems table has no {column} column")
    counts = problems["problem_id"].value_counts()
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        raise MiningInputError(
            f"problems: problem id {repeated[0]['values']} appears {repeated[0]['counts']} times; ids must be unique"
        )
    files = find_node_files(node_files)
    if not files:
        raise MiningInputError("no nodes files given")
    timings: dict[str, float] = {}
    with closing(connect_nodes(files, config)) as con:
        params = {
            "margin": config.margin,
            "per_side": config.per_side,
            "sft_per_problem": config.sft_per_problem,
            "min_edit_distance": config.min_edit_distance,
            "q_decimals": Q_DECIMALS,
        }
        with _timed(timings, "load"):
            load_trees(con)
        with _timed(timings, "validate"):
            validate_trees(con, files, problems.select(["problem_id"]))
        astro = config.sft_format == "astro"
        with _timed(timings, "trees"):
            _execute(con, LEAF_SQL, {"with_errors": astro})
            _execute(
                con,
                "CREATE TEMP TABLE leaf_path AS " + _ancestors("leaf", ("leaf_correct", "leaf_failed", "leaf_depth")),
            )
            _execute(con, LEAD_SQL)
            _execute(con, CANDIDATE_SQL, params)
            _execute(con, TRAJECTORY_SQL, params)
            if astro:
                _execute(con, DETOUR_SQL)
            _execute(con, PREFIX_STARTS_SQL)
            _execute(con, "CREATE TEMP TABLE prefix_path AS " + _ancestors("prefix_start"))
            _execute(con, SELECTED_LEAVES_SQL)
            if astro:
                _execute(con, "INSERT INTO selected_leaf SELECT tree, failure_id FROM detour")
            _execute(con, WANTED_SQL)
        with _timed(timings, "text"):
            _execute(con, TEXT_SQL)
            _register_prompts(con, problems)
        with _timed(timings, "edit_distance"):
            _execute(con, STEP_PAIR_SQL, params)
        with _timed(timings, "assemble"):
            _execute(con, PATH_TEXT_SQL)
            pairs = conform(con.sql(PAIRS_SQL).to_arrow_table(), "pairs")
            if config.sft_format == "coat":
                from data_store.rl_prompts import coat_sft_rows  # it builds on this module

                # The rstar rows' trajectories (top-k correct by mean Q), woven with the tree's failures.
                sft = coat_sft_rows(files, problems, config.sft_per_problem, config.threads)
            else:
                sft = _astro_rows(con) if astro else conform(con.sql(SFT_SQL).to_arrow_table(), "sft")
            status = con.sql(PROBLEM_STATUS_SELECT.format(nodes="source")).to_arrow_table()
    return MiningResult(pairs=pairs, sft=sft, problem_status=status, timings=timings)


def _register_prompts(con: duckdb.DuckDBPyConnection, problems: pa.Table) -> None:
    """`problem_prompt(problem_id, prompt)`: the policy prompt of every problem the trees use."""
    used_ids = pa.array([row[0] for row in con.execute("SELECT DISTINCT problem_id FROM tree").fetchall()], pa.string())
    used = problems.filter(pc.is_in(problems["problem_id"], value_set=used_ids))
    prompts = [render_prompt(text) for text in used["problem"].to_pylist()]
    con.register(
        "problem_prompt", pa.table({"problem_id": used["problem_id"], "prompt": pa.array(prompts, pa.string())})
    )


def _astro_rows(con: duckdb.DuckDBPyConnection) -> pa.Table:
    parts = con.sql(ASTRO_SQL).to_arrow_table().to_pylist()
    completions = []
    for row in parts:
        if row["back_to_depth"] is None:  # no failed branch in the tree: the plain solution
            completions.append(row["prefix"])
            continue
        completions.append(astro_completion(row["prefix"], row["failed_branch"], row["continuation"],
                                            row["failure_kind"], row["failure_error"], row["failure_answer"]))
    columns = {
        name: [row[name] for row in parts]
        for name in ("prompt", "run", "round", "problem_id", "rank", "leaf_id", "mean_q", "min_q")
    }
    table = pa.table(
        {
            **columns,
            "completion": pa.array(completions, pa.string()),
            "sft_format": pa.array(["astro"] * len(parts), pa.string()),
        }
    )
    return conform(table, "sft")


def write_mined(result: MiningResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `pairs.parquet` and `sft.parquet` under `out_dir`; neither appears unless both were written."""
    out = Path(out_dir)
    pairs_path, sft_path = out / "pairs.parquet", out / "sft.parquet"
    with atomic_path(pairs_path) as pairs_temporary, atomic_path(sft_path) as sft_temporary:
        pq.write_table(result.pairs, pairs_temporary, compression=COMPRESSION)
        pq.write_table(result.sft, sft_temporary, compression=COMPRESSION)
    return pairs_path, sft_path


# --- kaizen mine ----------------------------------------------------------------------------------


def _help(name: str) -> str:
    return field_help(MiningConfig, name, show_default=True)


def cli_mine(argv: list[str]) -> int:
    """`kaizen mine`: mine pairs and SFT rows from nodes files into DIR/pairs.parquet and DIR/sft.parquet."""
    defaults = MiningConfig()
    parser = OneLineParser(
        prog="kaizen mine", description="Mine PPM preference pairs and SFT trajectories from nodes tables."
    )
    parser.add_argument(
        "--nodes",
        nargs="+",
        required=True,
        metavar="PATH",
        help="nodes Parquet files, or directories holding nodes[-NNNNN].parquet",
    )
    parser.add_argument(
        "--problems",
        required=True,
        metavar="FILE",
        help="the problems the trees were grown from (JSONL, Parquet or a datasets name)",
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="where pairs.parquet and sft.parquet go")
    parser.add_argument("--margin", type=float, default=defaults.margin, metavar="M", help=_help("margin"))
    parser.add_argument(
        "--min-edit-distance",
        type=int,
        default=defaults.min_edit_distance,
        metavar="D",
        help=_help("min_edit_distance"),
    )
    parser.add_argument(
        "--sft-per-problem", type=int, default=defaults.sft_per_problem, metavar="K", help=_help("sft_per_problem")
    )
    parser.add_argument("--sft-format", choices=SFT_FORMATS, default=defaults.sft_format, help=_help("sft_format"))
    args = parser.parse_args(argv)
    # MiningConfig refuses these too, but under its field names, and in one message for all of them.
    if not 0 <= args.margin < math.inf:  # also refuses NaN
        parser.error(f"--margin must be a finite number >= 0, got {args.margin}")
    for flag, value in (("--min-edit-distance", args.min_edit_distance), ("--sft-per-problem", args.sft_per_problem)):
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")

    from data_store.problems import ProblemsError, load_problems  # noqa: PLC0415 - keep `--help` fast

    try:
        check_output_directory(args.out)
        config = MiningConfig(
            margin=args.margin,
            min_edit_distance=args.min_edit_distance,
            sft_per_problem=args.sft_per_problem,
            sft_format=args.sft_format,
        )
        result = mine(args.nodes, load_problems(args.problems, require_answer=False), config)
        pairs_path, sft_path = write_mined(result, args.out)
    except (MiningInputError, SchemaError, ProblemsError, ValueError) as error:
        print(f"kaizen mine: error: {error}", file=sys.stderr)
        return 1
    kinds = result.pairs.column("pair_kind").to_pylist()
    print(f"{kinds.count('step')} step pairs + {kinds.count('trajectory')} trajectory pairs -> {pairs_path}")
    print(f"{result.sft.num_rows} sft rows ({config.sft_format}) -> {sft_path}")
    status = (
        result.problem_status.group_by(["run", "round"])
        .aggregate([("solved", "count"), ("solved", "sum")])
        .sort_by([("run", "ascending"), ("round", "ascending")])
    )
    for row in status.to_pylist():
        print(f"run {row['run']} round {row['round']}: {row['solved_sum']} of {row['solved_count']} problems solved")
    return 0
