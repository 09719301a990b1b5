"""`kaizen status`: a run's state read from its files, for each kind of state a run can be in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_store.home import Layout, output_lock
from flows.cli import main
from models.pipeline import Pipeline
from models.recipe import load_recipe
from models.rollout import chunk_directory
from models.status import format_status
from models.training import PROVENANCE_FILE, RESUMABLE_FILE


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(load_recipe("demo", {"search.shards": 2}), Layout(tmp_path))


def status_lines(pipeline: Pipeline) -> list[str]:
    return [line.strip() for line in format_status(pipeline).splitlines()]


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def promote(pipeline: Pipeline, round_number: int) -> None:
    policy = pipeline.layout.checkpoint_dir("demo", round_number, "policy")
    touch(policy / PROVENANCE_FILE, "{}")
    touch(pipeline.layout.round_dir("demo", round_number) / "promoted.json",
          json.dumps({"round": round_number, "policy": {"path": str(policy), "digest": "d"}, "ppm": None}))


def test_a_new_run_has_no_rounds(pipeline: Pipeline) -> None:
    assert status_lines(pipeline)[1:] == ["idle (no process holds it)", "promoted: none yet", "next: round 0",
                                          "no round has started"]


def test_a_held_run_names_its_holder(pipeline: Pipeline, tmp_path: Path, hold_run_elsewhere) -> None:
    holder = hold_run_elsewhere(tmp_path, "demo")
    assert status_lines(pipeline)[1].startswith(f"in use by a test holder (pid {holder.pid} ")


def test_the_round_after_the_promoted_one_is_next(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    assert "next: round 1" in status_lines(pipeline)


def test_a_round_lists_the_stages_that_wrote_their_outputs(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    layout = pipeline.layout
    touch(layout.table_path("demo", 1, "problems", stage="problems"))
    touch(layout.table_path("demo", 1, "nodes", shard=0))
    assert status_lines(pipeline)[-1] == "1  not finished   -                        select, rollout (1 of 2 shards)"


def test_saved_rollout_chunks_are_offered_for_resuming(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    saved = chunk_directory(pipeline.layout.table_path("demo", 1, "nodes", shard=1))
    touch(saved / "manifest.json", json.dumps({"identity": "x", "chunks": 3}))
    touch(saved / "chunk-00000.parquet")
    assert "to resume: rollout shard 1: 1 of 3 chunks saved" in status_lines(pipeline)


def test_a_saved_training_checkpoint_is_offered_for_resuming(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    policy = pipeline.layout.checkpoint_dir("demo", 1, "policy")
    touch(policy.parent / f".{policy.name}.partial-abc" / "checkpoint-40" / RESUMABLE_FILE)
    assert "to resume: sft: checkpoint at step 40 saved" in status_lines(pipeline)


def test_what_a_training_at_work_saved_is_its_progress(pipeline: Pipeline, hold_lock_elsewhere) -> None:
    promote(pipeline, 0)
    policy = pipeline.layout.checkpoint_dir("demo", 1, "policy")
    touch(policy.parent / f".{policy.name}.partial-abc" / "checkpoint-40" / RESUMABLE_FILE)
    hold_lock_elsewhere(output_lock(policy))
    assert "in progress: sft: checkpoint at step 40 saved" in status_lines(pipeline)


def test_what_a_held_run_saved_in_a_stage_not_at_work_is_to_resume(pipeline: Pipeline, tmp_path: Path,
                                                                      hold_run_elsewhere) -> None:
    """The run's holder may be at work on another round or stage (a `kaizen stage` on an older round)."""
    promote(pipeline, 0)
    policy = pipeline.layout.checkpoint_dir("demo", 1, "policy")
    touch(policy.parent / f".{policy.name}.partial-abc" / "checkpoint-40" / RESUMABLE_FILE)
    hold_run_elsewhere(tmp_path, "demo")
    assert "to resume: sft: checkpoint at step 40 saved" in status_lines(pipeline)


def test_an_attempt_that_saved_nothing_offers_nothing_to_resume(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    policy = pipeline.layout.checkpoint_dir("demo", 1, "policy")
    (policy.parent / f".{policy.name}.partial-abc").mkdir(parents=True)
    assert not [line for line in status_lines(pipeline) if "resume" in line]


def test_a_copy_of_a_round_directory_is_not_a_round(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    (pipeline.layout.run_dir("demo") / "round-000.bak").mkdir()
    assert [line.split()[0] for line in status_lines(pipeline)[5:]] == ["0"]


def test_a_stale_promoted_round_says_so_in_the_header(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    pipeline.mark_stale(0, "bootstrap", ["evaluate", "gate", "promote"])
    assert status_lines(pipeline)[2] == "promoted: round 0 (stale: a later `kaizen round` runs it again)"


def test_a_round_that_failed_its_gate_says_why(tmp_path: Path) -> None:
    from test_report import RUN, write_rounds_row

    pipeline = Pipeline(load_recipe("demo", {"run": RUN}), Layout(tmp_path))
    write_rounds_row(pipeline.layout, 1, gate_passed=False)
    assert "gate: greedy fell by 12.0 points" in status_lines(pipeline)


def test_a_stale_round_says_why(pipeline: Pipeline) -> None:
    promote(pipeline, 0)
    pipeline.mark_stale(0, "bootstrap", ["evaluate", "gate", "promote"])
    assert "stale: its bootstrap stage was re-run after its gate" in status_lines(pipeline)


def test_the_command_prints_the_status(pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    promote(pipeline, 0)
    assert main(["status", "--recipe", "demo", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"run 'demo' in {tmp_path}\n")


def test_a_run_that_has_not_started_is_named_with_the_runs_there(pipeline: Pipeline, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    promote(pipeline, 0)
    assert main(["status", "--recipe", "astro", "--home", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"run 'astro' has not started in {tmp_path} (runs there: demo)\n"


def test_a_home_that_does_not_exist_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "--recipe", "demo", "--home", str(tmp_path / "typo")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [f"kaizen status: error: data home {tmp_path / 'typo'} does not "
                                                 "exist (--home, or $KAIZEN_HOME)"]


def test_a_reader_that_leaves_early_gets_no_traceback(pipeline: Pipeline, tmp_path: Path) -> None:
    """`kaizen status | head -1`."""
    import os
    import subprocess
    import sys

    promote(pipeline, 0)
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "status", "--recipe", "demo", "--home", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1], env={**os.environ})
    process.stdout.close()  # before it prints
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == ""
