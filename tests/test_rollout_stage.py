"""The rollout stage's chunks: a long stage saves finished chunks and, run again, resumes after them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import models.rollout
from models.rollout import RolloutStageConfig, _search_identity, chunk_directory, problem_chunks, rollout_stage
from search.mcts import MCTSConfig, Tree
from search.rollout import Problem, RolloutProgress, RolloutResult, RolloutStats

PROBLEMS = [Problem(f"p{index}", f"What is {index} + 1?", str(index + 1)) for index in range(5)]
CHUNKED = RolloutStageConfig(chunk_problems=2)


class StandInSearch:
    """Replaces the engines: each problem's tree is its root alone; records what it searched and
    fails on the call numbered `fail_on_call` (counted from 0 over the stand-in's life)."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.fail_on_call = fail_on_call
        self.searched: list[str] = []
        self.calls = 0
        self.opened = 0

    @contextmanager
    def open(self, model: object, config: object = None, ppm: object = None) -> Iterator[Callable[..., RolloutResult]]:
        self.opened += 1
        yield self.search

    def search(self, problems: Sequence[Problem],
               on_progress: Callable[[RolloutProgress], None] | None = None) -> RolloutResult:
        if self.calls == self.fail_on_call:
            raise RuntimeError("the node was lost")
        self.calls += 1
        self.searched += [problem.problem_id for problem in problems]
        if on_progress:
            on_progress(RolloutProgress(len(problems), len(problems), 1, len(problems), 10))
        trees = [Tree(p.problem_id, p.question, MCTSConfig(), random.Random(0)) for p in problems]
        return RolloutResult(trees, RolloutStats(trees=len(problems), tokens_generated=10 * len(problems)))


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Callable[..., StandInSearch]:
    def install(**options: object) -> StandInSearch:
        search = StandInSearch(**options)
        monkeypatch.setattr(models.rollout, "open_search", search.open)
        return search

    return install


def run_stage(out: Path, model: str = "policy-a", **options: object) -> RolloutStats:
    return rollout_stage(PROBLEMS, model=model, out=out, config=CHUNKED, **options)


def test_a_chunked_stage_writes_every_problem_once_in_order(tmp_path: Path, stand_in) -> None:
    stand_in()
    run_stage(tmp_path / "nodes.parquet")
    assert pq.read_table(tmp_path / "nodes.parquet").column("problem_id").to_pylist() == [p.problem_id for p in PROBLEMS]


def test_a_finished_chunked_stage_leaves_no_chunks(tmp_path: Path, stand_in) -> None:
    stand_in()
    run_stage(tmp_path / "nodes.parquet")
    assert not chunk_directory(tmp_path / "nodes.parquet").exists()


def test_a_chunked_stage_opens_its_engines_once(tmp_path: Path, stand_in) -> None:
    search = stand_in()
    run_stage(tmp_path / "nodes.parquet")
    assert search.opened == 1 and search.calls == 3


def test_a_stage_that_died_resumes_after_its_saved_chunks(tmp_path: Path, stand_in) -> None:
    stand_in(fail_on_call=1)
    with pytest.raises(RuntimeError, match="lost"):
        run_stage(tmp_path / "nodes.parquet")
    again = stand_in()
    run_stage(tmp_path / "nodes.parquet")
    assert again.searched == ["p2", "p3", "p4"]


def test_a_stage_that_died_writes_no_output(tmp_path: Path, stand_in) -> None:
    stand_in(fail_on_call=2)
    with pytest.raises(RuntimeError, match="lost"):
        run_stage(tmp_path / "nodes.parquet")
    assert not (tmp_path / "nodes.parquet").exists()


def test_chunks_searched_with_another_checkpoint_are_not_reused(tmp_path: Path, stand_in) -> None:
    stand_in(fail_on_call=1)
    with pytest.raises(RuntimeError, match="lost"):
        run_stage(tmp_path / "nodes.parquet")
    again = stand_in()
    run_stage(tmp_path / "nodes.parquet", model="policy-b")
    assert again.searched == [p.problem_id for p in PROBLEMS]


def test_a_checkpoint_rewritten_in_place_is_another_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "policy"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"round 1")
    before = models.rollout._model_fingerprint(checkpoint)
    (checkpoint / "model.safetensors").write_bytes(b"round 1, retrained")
    assert models.rollout._model_fingerprint(checkpoint) != before


def test_a_chunked_stage_reports_progress_through_the_whole_stage(tmp_path: Path, stand_in) -> None:
    stand_in()
    seen: list[tuple[int, int]] = []
    run_stage(tmp_path / "nodes.parquet", on_progress=lambda p: seen.append((p.trees_done, p.trees_total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_a_resumed_stage_counts_the_saved_chunks_in_its_stats(tmp_path: Path, stand_in) -> None:
    stand_in(fail_on_call=1)
    with pytest.raises(RuntimeError, match="lost"):
        run_stage(tmp_path / "nodes.parquet")
    stand_in()
    stats = run_stage(tmp_path / "nodes.parquet")
    assert (stats.trees, stats.tokens_generated) == (5, 50)


def fail_after_first_chunk(out: Path, stand_in) -> None:
    stand_in(fail_on_call=1)
    with pytest.raises(RuntimeError, match="lost"):
        run_stage(out)


@pytest.mark.parametrize("name, damaged", [("chunk-00000.parquet", "PAR1 cut off"), ("manifest.json", '{"identity": ')],
                         ids=["chunk", "manifest"])
def test_a_damaged_saved_file_means_its_chunks_are_searched_again(tmp_path: Path, stand_in, name: str,
                                                                  damaged: str) -> None:
    out = tmp_path / "nodes.parquet"
    fail_after_first_chunk(out, stand_in)
    (chunk_directory(out) / name).write_text(damaged)
    again = stand_in()
    run_stage(out)
    assert again.searched == [p.problem_id for p in PROBLEMS]


def test_a_run_without_chunks_clears_an_earlier_attempts_chunks(tmp_path: Path, stand_in) -> None:
    out = tmp_path / "nodes.parquet"
    fail_after_first_chunk(out, stand_in)
    stand_in()
    rollout_stage(PROBLEMS, model="policy-a", out=out, config=RolloutStageConfig())
    assert out.is_file() and not chunk_directory(out).exists()


@pytest.mark.parametrize("change", [{"timeout_s": 60.0}, {"memory_mb": 4096}])
def test_a_sandbox_setting_is_part_of_what_chunks_were_searched_with(change: dict) -> None:
    from dataclasses import replace

    changed = replace(CHUNKED, sandbox=replace(CHUNKED.sandbox, **change))
    assert _search_identity(PROBLEMS, "m", None, changed, "r", 1) != _search_identity(PROBLEMS, "m", None, CHUNKED, "r", 1)


@pytest.mark.parametrize("change", [{"sandbox": {"workers": 9}}, {"backend": {"batch_size": 7, "concurrency": 3}}])
def test_how_fast_a_search_runs_is_not_part_of_what_chunks_were_searched_with(change: dict) -> None:
    from dataclasses import replace

    changed = replace(CHUNKED, **{name: replace(getattr(CHUNKED, name), **values) for name, values in change.items()})
    assert _search_identity(PROBLEMS, "m", None, changed, "r", 1) == _search_identity(PROBLEMS, "m", None, CHUNKED, "r", 1)


def test_problems_with_the_same_text_share_a_chunk() -> None:
    twins = [Problem("a", "q1", "1"), Problem("b", "q2", "2"), Problem("c", "q3", "3"), Problem("d", "q1", "1")]
    assert [[p.problem_id for p in chunk] for chunk in problem_chunks(twins, 2)] == [["a", "b", "d"], ["c"]]


def test_progress_counts_the_nodes_and_tokens_of_earlier_chunks(tmp_path: Path, stand_in) -> None:
    stand_in()
    tokens: list[int] = []
    run_stage(tmp_path / "nodes.parquet", on_progress=lambda p: tokens.append(p.tokens_generated))
    assert tokens == [10, 30, 50]


def test_an_output_another_process_writes_is_refused(tmp_path: Path, stand_in, hold_lock_elsewhere) -> None:
    from data_store.home import RunBusyError

    out = tmp_path / "nodes.parquet"
    hold_lock_elsewhere(tmp_path / ".nodes.lock", "another rollout")
    stand_in()
    with pytest.raises(RunBusyError, match=f"{out} is in use by another rollout"):
        run_stage(out)


def test_chunk_sizes_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="chunk_problems must be >= 1"):
        RolloutStageConfig(chunk_problems=0)


@pytest.fixture(scope="module")
def step_policy(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A tiny policy that writes the step format (trained on `a plus b` solutions), so trees grow past one step."""
    from test_training import FAST_SFT, sft_rows, write_table

    from models.training import train_sft

    table = write_table(tmp_path_factory.mktemp("sft") / "sft.parquet", sft_rows())
    return train_sft([table], tmp_path_factory.mktemp("policy") / "policy", base_model=str(tiny_model),
                     overrides={**FAST_SFT, "num_train_epochs": 30})


@pytest.mark.slow
def test_chunking_does_not_change_what_the_search_finds(tmp_path: Path, step_policy: Path) -> None:
    """Each tree has its own RNG and samples are seeded per prompt: a real policy's trees are the
    same searched in chunks of 2 or all at once."""
    problems = [Problem(f"p{a}", f"What is {a} plus {a + 1}?", str(2 * a + 1)) for a in range(5)]
    mcts = MCTSConfig(rollouts=3, width=2, max_depth=4, max_step_tokens=32, temperature=1.0, seed=3)
    tables = {}
    for chunk_problems in (None, 2):
        out = tmp_path / f"nodes-{chunk_problems}.parquet"
        rollout_stage(problems, model=step_policy, out=out,
                      config=RolloutStageConfig(mcts=mcts, chunk_problems=chunk_problems))
        tables[chunk_problems] = pq.read_table(out).to_pylist()
    assert max(row["depth"] for row in tables[None]) >= 2 and tables[2] == tables[None]


def test_worked_examples_are_refused_for_a_coat_search() -> None:
    with pytest.raises(ValueError, match="worked examples are written in the rstar step format, not coat"):
        RolloutStageConfig(mcts=MCTSConfig(step_format="coat"), worked_examples=1)
