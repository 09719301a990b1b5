"""The pipeline's problem stages on a curriculum run: pools as problems tables, per-round selection."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from data_store.home import Layout
from data_store.parquet import write_table
from data_store.problems import load_problems
from data_store.views import connect
from models.pipeline import Pipeline
from models.recipe import load_recipe


def curriculum_pipeline(home: Path, **overrides: object) -> Pipeline:
    recipe = load_recipe("demo", {"problems.curriculum.train": 10, "problems.curriculum.test": 5, **overrides})
    return Pipeline(recipe, Layout(home))


def solved_in_round(layout: Layout, round_number: int, problem_id: str) -> None:
    """A nodes file in which `problem_id` has one correct answer."""
    base = {"run": "demo", "round": round_number, "problem_id": problem_id, "code": "", "visits": 1,
            "ppm_score": None, "output": None, "error": None}
    rows = [
        {**base, "node_id": 0, "parent_id": -1, "depth": 0, "step": "", "kind": "root", "answer": None,
         "correct": None, "q_value": 1.0},
        {**base, "node_id": 1, "parent_id": 0, "depth": 1, "step": "<answer>\\boxed{1}<end_of_answer>",
         "kind": "answer", "answer": "1", "correct": True, "q_value": 1.0},
    ]
    write_table(pa.Table.from_pylist(rows), layout.table_path("demo", round_number, "nodes", shard=0), table="nodes")


def test_curriculum_pools_are_problems_tables_with_their_levels(tmp_path: Path) -> None:
    pools = curriculum_pipeline(tmp_path).prepare_problems()
    table = load_problems(pools.train.path)
    levels = {json.loads(metadata)["level"] for metadata in table.column("metadata").to_pylist()}
    assert levels == {1, 2, 3, 4, 5}
    assert connect(tmp_path).execute("SELECT count(*) FROM problems").fetchone() == (15,)


def test_round_one_selects_per_round_problems_before_any_search(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"problems.per_round": 4})
    selected = pipeline.select_problems(1, pipeline.prepare_problems().train)
    assert load_problems(selected.path).num_rows == 4


def test_selection_puts_problems_no_round_solved_first(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"problems.per_round": 9})
    pools = pipeline.prepare_problems()
    first = load_problems(pools.train.path).column("problem_id")[0].as_py()
    solved_in_round(pipeline.layout, 1, first)
    selected = load_problems(pipeline.select_problems(2, pools.train).path).column("problem_id").to_pylist()
    assert first not in selected
