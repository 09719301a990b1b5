"""The data store: home directory and layout, atomic Parquet writes, schemas, DuckDB views, problem loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_store.home import CODE_ROOT, HOME_ENV, HomeError, Layout, RunBusyError, get_home
from data_store.parquet import (
    ParquetStreamWriter,
    check_output_directory,
    remove_stale_temporaries,
    write_table,
)
from data_store.problems import ProblemsError, content_id, load_problems
from data_store.schema import NODES, SchemaError, check_schema, conform
from data_store.views import connect, solved_per_round, unsolved_problems

SHARED_DATA = Path(os.environ.get("KAIZEN_SHARED_DATA", CODE_ROOT / ".." / "shared" / "data")).resolve()
REAL_FILES = {
    "math500_test.jsonl": 500,
    "gsm8k_test.jsonl": 1319,
    "gsm8k_train.jsonl": 7473,
    "math_train12k_prm800k_split.jsonl": 11998,
    "aime24.jsonl": 30,
    "amc23.jsonl": 40,
}


def nodes_rows(run: str, round_number: int, problem_id: str, solved: bool) -> list[dict]:
    base = {"run": run, "round": round_number, "problem_id": problem_id, "code": "", "visits": 1, "ppm_score": None}
    return [
        {
            **base,
            "node_id": 0,
            "parent_id": -1,
            "depth": 0,
            "step": "",
            "output": None,
            "kind": "root",
            "answer": None,
            "correct": None,
            "q_value": 0.0,
        },
        {
            **base,
            "node_id": 1,
            "parent_id": 0,
            "depth": 1,
            "step": "<answer>\\boxed{1}<end_of_answer>",
            "output": None,
            "kind": "answer",
            "answer": "1",
            "correct": solved,
            "q_value": 1.0 if solved else -1.0,
        },
    ]


# --- home and layout ------------------------------------------------------------------------------


def test_home_defaults_to_kaizen_home_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert get_home() == tmp_path.resolve() / "kaizen_home"


def test_home_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "data"))
    assert get_home() == (tmp_path / "data").resolve()


@pytest.mark.parametrize("inside", ["data_store/runs", "tests", ".git/x", "."])
def test_home_inside_the_code_tree_is_refused(inside: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(CODE_ROOT / inside))
    with pytest.raises(HomeError, match="code tree"):
        get_home()


def test_an_explicit_home_inside_the_code_tree_is_refused_too() -> None:
    with pytest.raises(HomeError, match="code tree"):
        get_home(CODE_ROOT / "models" / "kaizen_home")


def test_layout_names_round_stage_and_shard_files(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert (
        layout.table_path("nightly", 3, "nodes", shard=7)
        == tmp_path / "runs/nightly/round-003/rollout/nodes-00007.parquet"
    )
    assert layout.table_path("nightly", 3, "pairs") == tmp_path / "runs/nightly/round-003/mine/pairs.parquet"
    assert layout.problems_path("math500") == tmp_path / "problems/math500.parquet"


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", ""])
def test_layout_refuses_names_that_escape_or_hide(tmp_path: Path, name: str) -> None:
    with pytest.raises(HomeError):
        Layout(tmp_path).run_dir(name)


# --- one process per run -----------------------------------------------------------------------------

@pytest.fixture
def held_run(tmp_path: Path, hold_run_elsewhere: Callable[[Path, str], subprocess.Popen]) -> subprocess.Popen:
    return hold_run_elsewhere(tmp_path, "demo")


def test_a_run_another_process_holds_is_refused_naming_that_process(tmp_path: Path, held_run: subprocess.Popen) -> None:
    with pytest.raises(RunBusyError, match=rf"run 'demo' .* in use by a test holder \(pid {held_run.pid} "):
        with Layout(tmp_path).hold_run("demo", "a test"):
            pass


def test_another_run_of_the_same_home_is_free(tmp_path: Path, held_run: subprocess.Popen) -> None:
    with Layout(tmp_path).hold_run("other", "a test"):
        pass


def test_a_run_is_free_once_its_holder_is_killed(tmp_path: Path, held_run: subprocess.Popen) -> None:
    held_run.kill()
    held_run.wait()
    with Layout(tmp_path).hold_run("demo", "a test"):
        pass


def test_a_process_may_hold_its_own_run_again_inside_itself(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with layout.hold_run("demo", "an evolve flow"), layout.hold_run("demo", "a round flow"):
        pass


def test_a_hold_that_fails_to_record_its_holder_releases_the_lock(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import data_store.home

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_store.home.os, "pwrite", disk_full)
    with pytest.raises(OSError, match="No space left"), Layout(tmp_path).hold_run("demo", "a test"):
        pass
    monkeypatch.undo()
    with Layout(tmp_path).hold_run("demo", "a test"):  # a leaked descriptor would still hold it
        pass


def try_holding_elsewhere(home: Path, run: str) -> str:
    """Whether another process can take the run now: "held" or "busy"."""
    script = ("import sys; from pathlib import Path; from data_store.home import Layout, RunBusyError\n"
              "try:\n    with Layout(Path(sys.argv[1])).hold_run(sys.argv[2], 'a test'): print('held')\n"
              "except RunBusyError: print('busy')")
    return subprocess.run([sys.executable, "-c", script, str(home), run], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(CODE_ROOT)}).stdout.strip()


def test_a_run_is_free_for_others_once_every_hold_has_ended(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    with layout.hold_run("demo", "an evolve flow"):
        with layout.hold_run("demo", "a round flow"):
            pass
        assert try_holding_elsewhere(tmp_path, "demo") == "busy"  # still held by the outer block
    assert try_holding_elsewhere(tmp_path, "demo") == "held"


# --- atomic writes ----------------------------------------------------------------------------------


def test_write_table_leaves_only_the_final_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "t.parquet"
    write_table(pa.table({"x": [1, 2]}), target)
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]


def test_a_writer_that_fails_midway_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError), ParquetStreamWriter(target, pa.schema([("x", pa.int64())])) as writer:
        writer.write(pa.table({"x": [1]}))
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_a_writer_killed_mid_file_leaves_nothing_visible(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    target = layout.table_path("run", 1, "nodes", shard=0)
    writer = textwrap.dedent(
        """
        import sys, time
        import pyarrow as pa
        from data_store.parquet import ParquetStreamWriter
        batch = pa.table({"x": list(range(100_000))})
        with ParquetStreamWriter(sys.argv[1], batch.schema) as writer:
            writer.write(batch)
            print("half written", flush=True)
            time.sleep(60)
            writer.write(batch)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, cwd=CODE_ROOT)
    try:
        assert process.stdout.readline().strip() == b"half written"
    finally:
        process.kill()  # SIGKILL: no cleanup handlers run
        process.wait()
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and leftovers[0].stat().st_size > 0
    assert not target.exists()
    assert layout.table_files("nodes") == []
    assert connect(tmp_path).sql("SELECT count(*) FROM nodes").fetchall() == [(0,)]


def test_an_output_directory_under_a_read_only_mount_is_refused_before_the_work() -> None:
    # /proc refuses new directories even to root, for whom permission checks always pass
    with pytest.raises(ValueError, match="cannot be created in /proc"):
        check_output_directory("/proc/kaizen-out")


def test_checking_an_output_directory_leaves_nothing_behind(tmp_path: Path) -> None:
    check_output_directory(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_with_a_file_in_the_way_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "out").touch()
    with pytest.raises(ValueError, match="out cannot be created: .*out is a file"):
        check_output_directory(tmp_path / "out")


def test_stale_temporaries_are_swept(tmp_path: Path) -> None:
    stale = tmp_path / ".t.parquet.123.abcd.tmp"
    stale.write_bytes(b"PAR1")
    os.utime(stale, (0, 0))
    kept = tmp_path / "t.parquet"
    kept.write_bytes(b"PAR1")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


# --- schemas --------------------------------------------------------------------------------------


def test_schema_check_names_every_missing_column() -> None:
    stored = pa.schema([field for field in NODES if field.name not in ("depth", "q_value")])
    with pytest.raises(
        SchemaError, match=r"shard\.parquet is not a valid nodes table: missing columns: depth, q_value"
    ):
        check_schema(stored, "nodes", source="shard.parquet")


def test_schema_check_names_a_wrongly_typed_column() -> None:
    stored = NODES.set(NODES.get_field_index("q_value"), pa.field("q_value", pa.string()))
    with pytest.raises(SchemaError, match="column q_value has type string, expected a number"):
        check_schema(stored, "nodes")


def test_schema_accepts_narrow_integers_and_all_null_optional_columns() -> None:
    rows = nodes_rows("r", 1, "p", solved=True)
    table = pa.Table.from_pylist(rows).set_column(1, "round", pa.array([1, 1], pa.int32()))
    assert table.schema.field("ppm_score").type == pa.null()
    assert conform(table, "nodes").schema.field("round").type == pa.int64()


def test_conform_rejects_nulls_in_required_columns() -> None:
    table = pa.Table.from_pylist([dict(row, step=None) for row in nodes_rows("r", 1, "p", solved=True)])
    with pytest.raises(SchemaError, match="column step of the nodes table has 2 null"):
        conform(
            table.set_column(table.schema.get_field_index("step"), "step", pa.array([None, None], pa.string())), "nodes"
        )


def test_conform_adds_missing_optional_columns_as_nulls() -> None:
    table = conform(pa.table({"problem_id": ["p"], "problem": ["1?"]}), "problems")
    assert table.to_pylist() == [{"problem_id": "p", "problem": "1?", "answer": None, "source": None, "metadata": None}]


# --- DuckDB views ---------------------------------------------------------------------------------


@pytest.fixture
def home_with_rounds(tmp_path: Path) -> Path:
    """Two runs: `a` solves p1 in round 1 and p2 in round 2; `b` solves nothing."""
    layout = Layout(tmp_path)
    problems = pa.table({"problem_id": ["p1", "p2", "p3"], "problem": ["1?", "2?", "3?"], "answer": ["1", "2", "3"]})
    write_table(problems, layout.problems_path("pool"), table="problems")
    runs = {("a", 1): [("p1", True), ("p2", False)], ("a", 2): [("p2", True)], ("b", 1): [("p1", False)]}
    for (run, round_number), outcomes in runs.items():
        rows = [row for problem_id, solved in outcomes for row in nodes_rows(run, round_number, problem_id, solved)]
        write_table(pa.Table.from_pylist(rows), layout.table_path(run, round_number, "nodes", shard=0), table="nodes")
    return tmp_path


def test_nodes_view_spans_runs_and_rounds(home_with_rounds: Path) -> None:
    con = connect(home_with_rounds)
    counts = con.sql("SELECT run, round, count(*) FROM nodes GROUP BY ALL ORDER BY ALL").fetchall()
    assert counts == [("a", 1, 4), ("a", 2, 2), ("b", 1, 2)]


def test_a_table_is_read_from_its_own_stage_only(home_with_rounds: Path) -> None:
    layout = Layout(home_with_rounds)
    nodes = pa.Table.from_pylist(nodes_rows("a", 1, "p3", True))
    write_table(nodes, layout.table_path("a", 1, "nodes", stage="elsewhere"), table="nodes")
    assert connect(home_with_rounds).sql("SELECT count(*) FROM nodes WHERE problem_id = 'p3'").fetchall() == [(0,)]


def test_tables_without_files_are_empty_views_with_their_columns(home_with_rounds: Path) -> None:
    con = connect(home_with_rounds)
    assert con.sql("SELECT count(*) FROM pairs").fetchall() == [(0,)]
    assert con.sql("SELECT * FROM sft").columns[:2] == ["prompt", "completion"]


def test_solved_problems_are_counted_per_round(home_with_rounds: Path) -> None:
    assert solved_per_round(connect(home_with_rounds), "a") == [(1, 2, 1), (2, 1, 1)]


def test_unsolved_problems_are_those_no_round_of_the_run_solved(home_with_rounds: Path) -> None:
    con = connect(home_with_rounds)
    assert unsolved_problems(con, "a") == ["p3"]
    assert unsolved_problems(con, "a", through_round=1) == ["p2", "p3"]
    assert unsolved_problems(con, "b") == ["p1", "p2", "p3"]


# --- problem loaders -----------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_problems_keep_their_ids_and_other_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a-1", "problem": " 1+1? ", "answer": 2, "level": 3}])
    assert load_problems(path).to_pylist() == [
        {"problem_id": "a-1", "problem": "1+1?", "answer": "2", "source": "p", "metadata": '{"level": 3}'}
    ]


def test_a_normalised_table_reads_back_unchanged(tmp_path: Path) -> None:
    once = load_problems(write_jsonl(tmp_path / "p.jsonl", [{"id": "a-1", "problem": "1+1?", "answer": 2, "level": 3}]))
    pq.write_table(once, tmp_path / "once.parquet")
    assert load_problems(tmp_path / "once.parquet").to_pylist() == once.to_pylist()


def test_a_shared_problems_source_is_read_from_the_shared_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pool.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    monkeypatch.setenv("KAIZEN_SHARED_DATA", str(tmp_path))
    assert load_problems("shared:pool.jsonl").column("answer").to_pylist() == ["2"]


def test_problems_without_an_id_get_a_stable_content_hash(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [{"problem": "What is 1+1?", "answer": "2"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"problem": "  What is 1+1?\n", "answer": "2", "source": "x"}])
    ids = {load_problems(first)["problem_id"][0].as_py(), load_problems(second)["problem_id"][0].as_py()}
    assert ids == {content_id("What is 1+1?")}


def test_parquet_problems_load_like_jsonl(tmp_path: Path) -> None:
    rows = [{"id": "q1", "question": "2*3?", "answer": "6"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert (
        load_problems(tmp_path / "p.parquet").to_pylist()
        == load_problems(write_jsonl(tmp_path / "p.jsonl", rows)).to_pylist()
    )


def test_a_problem_without_an_answer_is_rejected_by_name(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"id": "ok", "problem": "1?", "answer": "1"}, {"id": "no-answer", "problem": "2?", "answer": ""}],
    )
    with pytest.raises(ProblemsError, match="line 2: problem no-answer has no answer"):
        load_problems(path)



@pytest.mark.parametrize("answer", [True, ["1", "2"], {"value": 1}], ids=["bool", "list", "object"])
def test_an_answer_that_is_not_text_or_a_number_is_refused(tmp_path: Path, answer: object) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "problem": "1?", "answer": answer}])
    with pytest.raises(ProblemsError, match="line 1: field answer holds .*expected text or a number"):
        load_problems(path)


def test_a_numeric_answer_is_read_as_written(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "x", "problem": "1?", "answer": 18}])
    assert load_problems(path)["answer"].to_pylist() == ["18"]

def test_answers_are_optional_when_not_required(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "ok", "problem": "1?", "answer": "1"}, {"id": "open", "problem": "2?"}]
    )
    assert load_problems(path, require_answer=False)["answer"].to_pylist() == ["1", None]


def test_the_same_id_with_different_content_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"id": "x", "problem": "1?", "answer": "1"}, {"id": "x", "problem": "2?", "answer": "2"}]
    )
    with pytest.raises(ProblemsError, match="problem id x appears twice"):
        load_problems(path)


def test_datasets_names_are_loaded_with_a_field_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, config: str | None, split: str) -> datasets.Dataset:
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"idx": 7, "query": "3+4?", "gold": "7"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    table = load_problems("org/set:main", fields={"id": "idx", "problem": "query", "answer": "gold"}, split="train")
    assert calls == [("org/set", "main", "train")]
    assert table.select(["problem_id", "problem", "answer", "source"]).to_pylist() == [
        {"problem_id": "7", "problem": "3+4?", "answer": "7", "source": "org/set:main"}
    ]


def test_a_missing_problems_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ProblemsError, match="problems file .*nope.jsonl does not exist"):
        load_problems(tmp_path / "nope.jsonl")


def test_a_path_in_an_existing_folder_is_a_missing_file_not_a_hub_name(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ProblemsError, match="problems file data/problems does not exist"):
        load_problems("data/problems")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_problem_files_load_with_their_own_ids(name: str) -> None:
    table = load_problems(SHARED_DATA / name)
    with (SHARED_DATA / name).open(encoding="utf-8") as lines:  # not splitlines(): problems contain U+2028
        ids = [json.loads(line)["id"] for line in lines if line.strip()]
    assert table.num_rows == REAL_FILES[name]
    assert table["problem_id"].to_pylist() == ids
