"""DuckDB views over the data store: one view per table across every run and round.

    con = connect()                      # views over $KAIZEN_HOME (or ./kaizen_home)
    con.sql("SELECT round, count(*) FROM pairs GROUP BY round")

Views: `problems`, `nodes`, `pairs`, `sft`, `eval`, `rounds`, and `problem_status` (per run, round
and problem: answers found, correct answers, solved). A view lists the finished files present when it
was created (a writer's temporary files never match); call `create_views` again to see new files.
A table with no files yet is an empty view with the table's columns, so queries still bind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from data_store.home import Layout, get_home
from data_store.schema import SCHEMAS

if TYPE_CHECKING:
    import duckdb

# One definition of "solved" (some answer node is correct), for the view and for `kaizen mine`.
PROBLEM_STATUS_SELECT = """
SELECT run, round, problem_id,
       count(*) FILTER (WHERE kind = 'answer') AS answers,
       count(*) FILTER (WHERE kind = 'answer' AND correct) AS correct_answers,
       count(*) FILTER (WHERE kind = 'answer' AND correct) > 0 AS solved
FROM {nodes} GROUP BY run, round, problem_id ORDER BY run, round, problem_id
"""


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_views(con: duckdb.DuckDBPyConnection, layout: Layout) -> None:
    """(Re)create every table view on `con` over the files under `layout.home`."""
    for table, schema in SCHEMAS.items():
        files = layout.table_files(table)
        if files:
            listing = ", ".join(_quote(str(path)) for path in files)
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM read_parquet([{listing}], union_by_name = true)"
            )
        else:
            con.register(f"_empty_{table}", schema.empty_table())
            con.execute(f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM _empty_{table}")
    con.execute("CREATE OR REPLACE VIEW problem_status AS " + PROBLEM_STATUS_SELECT.format(nodes="nodes"))


def connect(home: str | Path | None = None, *, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the data store's views; `home` defaults to `get_home()`."""
    import duckdb  # noqa: PLC0415 - keep importing the package cheap

    con = duckdb.connect(database)
    create_views(con, Layout(get_home(home)))
    return con


def unsolved_problems(con: duckdb.DuckDBPyConnection, run: str, *, through_round: int | None = None) -> list[str]:
    """Ids in `problems` that no round of `run` (up to `through_round`) has solved, sorted.

    rStar-Math reruns these in later rounds with more rollouts.
    """
    rows = con.execute(
        """
        SELECT problem_id FROM (SELECT DISTINCT problem_id FROM problems)
        ANTI JOIN (
            SELECT problem_id FROM problem_status
            WHERE run = $run AND solved AND ($through IS NULL OR round <= $through)
        ) USING (problem_id)
        ORDER BY problem_id
        """,
        {"run": run, "through": through_round},
    ).fetchall()
    return [row[0] for row in rows]


def solved_per_round(con: duckdb.DuckDBPyConnection, run: str) -> list[tuple[int, int, int]]:
    """(round, problems attempted, problems solved) for each round of `run`."""
    return con.execute(
        "SELECT round, count(*), count(*) FILTER (WHERE solved) FROM problem_status "
        "WHERE run = $run GROUP BY round ORDER BY round",
        {"run": run},
    ).fetchall()
