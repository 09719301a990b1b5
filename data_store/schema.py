"""The Parquet tables of the data store: their pyarrow schemas and a validator with clear errors.

Tables: `problems` (the problem pools), `nodes` (every MCTS node of a round, from the rollout
stage), `pairs` (PPM preference pairs) and `sft` (policy fine-tuning rows), both with TRL's column
names, `eval` (benchmark predictions) and `rounds` (per-round metrics and the gate decision).

Readers accept any width of an integer or float column and large or small strings, so files written
by other tools (DuckDB, pandas, an int32 `round`) pass; an all-null optional column may have pyarrow's
null type. Writers `conform` to the canonical types below.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa


class SchemaError(ValueError):
    """A table lacks required columns or has a column of the wrong type."""


def _field(name: str, kind: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, kind, nullable=nullable)


PROBLEMS = pa.schema(
    [
        _field("problem_id", pa.string()),
        _field("problem", pa.string()),
        _field("answer", pa.string(), nullable=True),
        _field("source", pa.string(), nullable=True),
        _field("metadata", pa.string(), nullable=True),  # JSON object of the source's other fields
    ]
)

NODES = pa.schema(
    [
        _field("run", pa.string()),
        _field("round", pa.int64()),
        _field("problem_id", pa.string()),
        _field("node_id", pa.int64()),  # the root is 0
        _field("parent_id", pa.int64()),  # -1 for the root
        _field("depth", pa.int64()),
        _field("step", pa.string()),  # as generated, closing marker included; "" for the root
        _field("code", pa.string(), nullable=True),
        _field("output", pa.string(), nullable=True),
        _field("error", pa.string(), nullable=True),  # why an `error` node failed (sandbox error, malformed step)
        _field("kind", pa.string()),  # root | step | answer | error | depth_limit
        _field("answer", pa.string(), nullable=True),
        _field("correct", pa.bool_(), nullable=True),  # set on answer nodes
        _field("visits", pa.int64()),
        _field("q_value", pa.float64()),
        _field("ppm_score", pa.float64(), nullable=True),
    ]
)

PAIRS = pa.schema(
    [
        _field("prompt", pa.string()),
        _field("chosen", pa.string()),
        _field("rejected", pa.string()),
        _field("run", pa.string()),
        _field("round", pa.int64()),
        _field("problem_id", pa.string()),
        _field("pair_kind", pa.string()),  # step (same prefix) | trajectory (final-answer relaxation)
        _field("node_id", pa.int64()),  # the node whose children are paired; the root for trajectories
        _field("chosen_id", pa.int64()),
        _field("rejected_id", pa.int64()),
        _field("q_chosen", pa.float64()),
        _field("q_rejected", pa.float64()),
        _field("margin", pa.float64()),
    ]
)

SFT = pa.schema(
    [
        _field("prompt", pa.string()),
        _field("completion", pa.string()),
        _field("run", pa.string()),
        _field("round", pa.int64()),
        _field("problem_id", pa.string()),
        _field("sft_format", pa.string()),  # rstar | astro | coat | teacher (round 0)
        _field("rank", pa.int64()),  # 1 = the problem's best trajectory
        _field("leaf_id", pa.int64()),  # the correct answer node the completion ends in
        _field("mean_q", pa.float64()),
        _field("min_q", pa.float64()),
    ]
)

EVAL = pa.schema(
    [
        _field("run", pa.string()),
        _field("round", pa.int64()),
        _field("benchmark", pa.string()),
        _field("problem_id", pa.string()),
        _field("mode", pa.string()),
        _field("prediction", pa.string(), nullable=True),
        _field("correct", pa.bool_(), nullable=True),
        _field("extracted_answer", pa.string(), nullable=True),
        _field("grader_status", pa.string()),  # ok | no_answer | timeout | checker_error
        _field("tokens", pa.int64()),  # generated for this problem in this mode
    ]
)

ROUNDS = pa.schema(
    [
        _field("run", pa.string()),
        _field("round", pa.int64()),
        _field("started_at", pa.timestamp("us", tz="UTC"), nullable=True),
        _field("finished_at", pa.timestamp("us", tz="UTC"), nullable=True),
        _field("policy_checkpoint", pa.string(), nullable=True),
        _field("ppm_checkpoint", pa.string(), nullable=True),
        _field("metrics", pa.string(), nullable=True),  # JSON object
        _field("gate_passed", pa.bool_(), nullable=True),
        _field("gate_reason", pa.string(), nullable=True),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "problems": PROBLEMS,
    "nodes": NODES,
    "pairs": PAIRS,
    "sft": SFT,
    "eval": EVAL,
    "rounds": ROUNDS,
}

# A stored type is acceptable when it is in the same family as the canonical one.
_FAMILIES: list[tuple[Callable[[pa.DataType], bool], str]] = [
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t), "a string"),
    (pa.types.is_integer, "an integer"),
    (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "a number"),
    (pa.types.is_boolean, "a boolean"),
    (pa.types.is_timestamp, "a timestamp"),
]


def _family(kind: pa.DataType) -> tuple[Callable[[pa.DataType], bool], str]:
    for accepts, description in _FAMILIES:
        if accepts(kind):
            return accepts, description
    raise TypeError(f"no type family for {kind}")


def schema_problems(stored: pa.Schema, table: str) -> list[str]:
    """What is wrong with `stored` as a `table` table: missing columns, then wrongly typed ones."""
    expected = SCHEMAS[table]
    missing = [f.name for f in expected if f.name not in stored.names]
    problems = [f"missing column{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"] if missing else []
    for wanted in expected:
        if wanted.name not in stored.names:
            continue
        found = stored.field(wanted.name).type
        accepts, description = _family(wanted.type)
        if not (accepts(found) or (pa.types.is_null(found) and wanted.nullable)):
            problems.append(f"column {wanted.name} has type {found}, expected {description}")
    return problems


def check_schema(stored: pa.Schema, table: str, source: str | None = None) -> None:
    """Raise SchemaError naming every missing or mistyped column of a `table` table read from `source`."""
    problems = schema_problems(stored, table)
    if problems:
        raise SchemaError(f"{source or 'table'} is not a valid {table} table: {'; '.join(problems)}")


def conform(data: pa.Table, table: str, source: str | None = None) -> pa.Table:
    """`data` cast to the canonical schema of `table`, for writing.

    Missing optional (nullable) columns are added as nulls; missing required columns, wrong types
    and nulls in required columns raise SchemaError. Extra columns are kept after the schema's.
    """
    expected = SCHEMAS[table]
    for wanted in expected:
        if wanted.nullable and wanted.name not in data.column_names:
            data = data.append_column(wanted.name, pa.nulls(data.num_rows, wanted.type))
    check_schema(data.schema, table, source)
    columns = [data.column(f.name).cast(f.type) for f in expected]
    for wanted, column in zip(expected, columns, strict=True):
        if not wanted.nullable and column.null_count:
            raise SchemaError(
                f"{source or 'table'}: column {wanted.name} of the {table} table has {column.null_count} null value(s)"
            )
    extras = [name for name in data.column_names if name not in expected.names]
    return pa.Table.from_arrays(
        columns + [data.column(name) for name in extras],
        schema=pa.schema(list(expected) + [data.schema.field(name) for name in extras]),
    )
