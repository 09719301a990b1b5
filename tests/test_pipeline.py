"""The pipeline's data stages on a curriculum run: pools as problems tables, per-round selection, the SFT set."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_store.home import Layout
from data_store.parquet import write_table
from data_store.problems import load_problems
from data_store.views import connect
from models.pipeline import Artifact, Current, MissingInputError, Pipeline, RoundRecord, artifacts_current
from models.recipe import load_recipe
from tasks.stages import KEY_LEAVES_OUT, STAGE_SECTIONS


def load_table_rows(path: Path, table: str) -> int:
    """Rows of a Parquet file, after checking it has `table`'s columns."""
    from data_store.schema import check_schema

    check_schema(pq.read_schema(path), table)
    return pq.read_metadata(path).num_rows


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


def search_budgets(pipeline: Pipeline, round_number: int) -> dict[str, int | None]:
    from models.rollout import search_problems

    pools = pipeline.prepare_problems()
    first = load_problems(pools.train.path).column("problem_id")[0].as_py()
    solved_in_round(pipeline.layout, 1, first)
    problems = search_problems(load_problems(pipeline.select_problems(round_number, pools.train).path))
    return {problem.problem_id: problem.rollouts for problem in problems} | {"solved": first}


def test_a_round_with_unsolved_rollouts_gives_them_to_the_problems_no_round_solved(tmp_path: Path) -> None:
    budgets = search_budgets(curriculum_pipeline(tmp_path, **{"search.unsolved_rollouts": {2: 64}}), 2)
    solved = budgets.pop("solved")
    assert budgets.pop(solved) is None and set(budgets.values()) == {64}


def test_a_round_without_unsolved_rollouts_searches_every_problem_alike(tmp_path: Path) -> None:
    budgets = search_budgets(curriculum_pipeline(tmp_path, **{"search.unsolved_rollouts": {4: 64}}), 2)
    budgets.pop("solved")
    assert set(budgets.values()) == {None}


def test_a_bad_search_budget_in_a_problems_metadata_is_refused() -> None:
    from models.rollout import search_problems

    table = pa.table({"problem_id": ["p1"], "problem": ["1+1?"], "answer": ["2"], "metadata": ['{"search_rollouts": "many"}']})
    with pytest.raises(ValueError, match="problem p1: metadata search_rollouts must be an integer >= 1, got 'many'"):
        search_problems(table)


def test_the_unsolved_rollouts_budget_is_part_of_that_rounds_select_key(tmp_path: Path) -> None:
    def key(rollouts: int) -> str:
        return stage_key("select", curriculum_pipeline(tmp_path, **{"search.unsolved_rollouts": {4: rollouts}}),
                         round_number=4, pool=Artifact("pool", "d"), never_solved=["p1"])

    assert key(64) != key(128)


def test_unsolved_rollouts_leave_the_keys_of_other_rounds_and_of_the_search_alone(tmp_path: Path) -> None:
    assert rollout_key(tmp_path, 4, **{"search.unsolved_rollouts": {4: 64}}) == rollout_key(tmp_path, 4)
    with_setting = curriculum_pipeline(tmp_path, **{"search.unsolved_rollouts": {4: 64}})
    select = {"round_number": 3, "pool": Artifact("pool", "d"), "never_solved": []}
    assert stage_key("select", with_setting, **select) == stage_key("select", curriculum_pipeline(tmp_path), **select)


@pytest.mark.parametrize(("content", "message"), [("", "has no problems"), ('{"problem": "1+1?"}\n', "no answer"),
                                                 (None, "does not exist")])
def test_a_bad_problems_file_is_refused_before_any_stage(tmp_path: Path, content: str | None, message: str) -> None:
    from data_store.problems import ProblemsError

    source = tmp_path / "pool.jsonl"
    if content is not None:
        source.write_text(content)
    pipeline = curriculum_pipeline(tmp_path, **{"problems.source": str(source), "bootstrap.teacher": None})
    with pytest.raises(ProblemsError, match=message):
        pipeline.check_problems()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"round": 0}'])
def test_an_unreadable_promotion_record_is_named(tmp_path: Path, content: str) -> None:
    from models.pipeline import RunStateError

    pipeline = curriculum_pipeline(tmp_path)
    record = pipeline.layout.round_dir("demo", 0) / "promoted.json"
    record.parent.mkdir(parents=True)
    record.write_text(content)
    with pytest.raises(RunStateError, match=str(record)):
        pipeline.promotion(0)


def test_shards_beyond_the_recipes_count_are_dropped(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"search.shards": 2})
    shard = {index: pipeline.layout.table_path("demo", 1, "nodes", shard=index) for index in range(3)}
    for path in shard.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    pipeline.drop_stale_shards(1)
    assert [path.exists() for path in shard.values()] == [True, True, False]


def test_saved_chunks_of_shards_beyond_the_recipes_count_are_dropped(tmp_path: Path) -> None:
    from models.rollout import chunk_directory

    pipeline = curriculum_pipeline(tmp_path, **{"search.shards": 2})
    chunks = [chunk_directory(pipeline.layout.table_path("demo", 1, "nodes", shard=index)) for index in range(3)]
    for path in chunks:
        path.mkdir(parents=True)
    pipeline.drop_stale_shards(1)
    assert [path.exists() for path in chunks] == [True, True, False]


def test_ppm_under_init_from_previous_is_given_the_last_rounds_ppm(tmp_path: Path, monkeypatch) -> None:
    import models.training

    pipeline = curriculum_pipeline(tmp_path, **{"training.ppm.init_from": "previous"})
    pair = {"prompt": "q", "chosen": "a", "rejected": "b", "run": "demo", "round": 2, "problem_id": "p",
            "pair_kind": "step", "node_id": 0, "chosen_id": 1, "rejected_id": 2, "q_chosen": 1.0,
            "q_rejected": -1.0, "margin": 2.0}
    pairs = write_table(pa.Table.from_pylist([pair]), pipeline.layout.table_path("demo", 2, "pairs"), table="pairs")
    calls = []
    (tmp_path / models.training.PROVENANCE_FILE).write_text("{}")
    monkeypatch.setattr(models.training, "train_ppm", lambda *args, **kwargs: calls.append(kwargs) or tmp_path)
    previous = tmp_path / "round-1-ppm"
    previous.mkdir()
    pipeline.train_ppm(2, [Artifact.of(pairs)], Artifact.of(tmp_path), Artifact.of(previous))
    assert calls[0]["previous_checkpoint"] == previous


def test_a_new_tiny_shape_or_seed_gets_a_new_base_model(tmp_path: Path, monkeypatch) -> None:
    import models.tiny

    monkeypatch.setattr(models.tiny, "build_tiny_model", lambda out, **kwargs: Path(out).mkdir(parents=True))
    bases = [curriculum_pipeline(tmp_path, **overrides).base_model()
             for overrides in ({}, {}, {"model.tiny.num_heads": 2}, {"seed": 7})]
    assert bases[0] == bases[1] and len(set(bases)) == 3


def promoted_round_zero(home: Path) -> Pipeline:
    pipeline = curriculum_pipeline(home)
    pipeline.promote(RoundRecord(0, Artifact.of(home), None, {}, {}, True, []))
    return pipeline


def test_a_round_with_a_stage_rerun_after_its_gate_is_next_again(tmp_path: Path) -> None:
    pipeline = promoted_round_zero(tmp_path)
    pipeline.mark_stale(0, "bootstrap", ["evaluate", "gate", "promote"])
    assert pipeline.next_round() == 0


def test_no_round_starts_from_a_stale_one(tmp_path: Path) -> None:
    pipeline = promoted_round_zero(tmp_path)
    pipeline.mark_stale(0, "bootstrap", ["evaluate", "gate", "promote"])
    with pytest.raises(MissingInputError, match="round 0 of run 'demo' is stale: its bootstrap stage was re-run after its gate"):
        pipeline.starting_point(1)


def test_no_round_starts_from_a_promoted_round_that_is_being_run_again(tmp_path: Path) -> None:
    """A re-run rewrites the checkpoints the promotion names; dying before its gate must not leave them in use."""
    pipeline = promoted_round_zero(tmp_path)
    pipeline.mark_rerunning(0)
    with pytest.raises(MissingInputError, match="round 0 of run 'demo' is stale: it was run again and has not reached"):
        pipeline.starting_point(1)


def test_judging_a_round_again_clears_its_staleness(tmp_path: Path) -> None:
    pipeline = promoted_round_zero(tmp_path)
    pipeline.mark_stale(0, "bootstrap", ["evaluate", "gate", "promote"])
    pipeline.promote(RoundRecord(0, Artifact.of(tmp_path), None, {}, {}, True, []))
    assert pipeline.next_round() == 1


def promoted_rounds(home: Path, count: int) -> Pipeline:
    pipeline = curriculum_pipeline(home)
    for number in range(count):
        pipeline.promote(RoundRecord(number, Artifact.of(home), None, {}, {}, True, []))
    return pipeline


def test_a_stage_rerun_in_an_earlier_round_makes_it_next_and_later_rounds_stale(tmp_path: Path) -> None:
    pipeline = promoted_rounds(tmp_path, 4)
    pipeline.mark_stale(1, "ppm", ["evaluate", "gate", "promote"])
    assert pipeline.next_round() == 1
    assert pipeline.stale_since(3) == "the ppm stage of round 1, which it builds on, was re-run"


def test_a_round_whose_rerun_failed_its_gate_is_next_even_with_later_rounds_promoted(tmp_path: Path) -> None:
    pipeline = promoted_rounds(tmp_path, 4)
    pipeline.promote(RoundRecord(1, Artifact.of(tmp_path), None, {}, {}, False, ["worse"]))
    assert pipeline.next_round() == 1




def test_a_home_moved_elsewhere_is_refused_naming_where_it_was(tmp_path: Path) -> None:
    import shutil

    from models.pipeline import RunStateError

    (tmp_path / "home").mkdir()
    promoted_rounds(tmp_path / "home", 1)
    shutil.move(tmp_path / "home", tmp_path / "moved")
    with pytest.raises(RunStateError, match=f"written in the home {tmp_path / 'home'}, and this home .* is a move"):
        curriculum_pipeline(tmp_path / "moved").promotion(0)

def test_a_round_left_out_of_order_is_told_the_round_to_run_next(tmp_path: Path) -> None:
    pipeline = promoted_rounds(tmp_path, 2)
    with pytest.raises(MissingInputError, match="the latest promoted round is 1[)]; run round 2 first"):
        pipeline.starting_point(4)


def test_a_crash_while_a_failed_rerun_withdraws_its_promotion_leaves_the_round_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = promoted_rounds(tmp_path, 3)
    pipeline.mark_rerunning(1)
    real_unlink = Path.unlink

    def crash_at_the_promotion(path: Path, missing_ok: bool = False) -> None:
        if path.name == "promoted.json":
            raise KeyboardInterrupt  # the process dies here
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_at_the_promotion)
    with pytest.raises(KeyboardInterrupt):
        pipeline.promote(RoundRecord(1, Artifact.of(tmp_path), None, {}, {}, False, ["worse"]))
    monkeypatch.undo()
    with pytest.raises(MissingInputError, match="round 1 of run 'demo' is stale"):
        pipeline.starting_point(2)

def checkpoint(home: Path, name: str) -> Artifact:
    path = home / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(name)
    return Artifact.of(path)


def rounds_promoted_with(home: Path, policy: Artifact, count: int) -> Pipeline:
    pipeline = curriculum_pipeline(home)
    for number in range(count):
        pipeline.promote(RoundRecord(number, policy, None, {}, {}, True, []))
    return pipeline


def test_a_round_run_again_with_another_outcome_makes_later_rounds_stale(tmp_path: Path) -> None:
    pipeline = rounds_promoted_with(tmp_path, checkpoint(tmp_path, "policy"), 4)
    pipeline.promote(RoundRecord(1, checkpoint(tmp_path, "other-policy"), None, {}, {}, True, []))
    assert pipeline.stale_since(3) == "round 1, which it builds on, was run again and its promotion changed"


def test_a_round_run_again_to_the_same_checkpoints_leaves_later_rounds_alone(tmp_path: Path) -> None:
    policy = checkpoint(tmp_path, "policy")
    pipeline = rounds_promoted_with(tmp_path, policy, 4)
    pipeline.promote(RoundRecord(1, policy, None, {}, {}, True, []))
    assert pipeline.next_round() == 4


def test_no_round_starts_after_a_round_whose_rerun_failed_its_gate(tmp_path: Path) -> None:
    pipeline = promoted_rounds(tmp_path, 3)
    pipeline.promote(RoundRecord(1, Artifact.of(tmp_path), None, {}, {}, False, ["worse"]))
    with pytest.raises(MissingInputError, match="round 2 of run 'demo' is stale: round 1"):
        pipeline.starting_point(3)


def test_continuing_from_a_hub_policy_hands_the_hub_name_to_training(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training

    pipeline = curriculum_pipeline(tmp_path, **{"model.base": "org/base-model", "bootstrap.teacher": None,
                                                "problems.source": "org/problems"})
    received: dict = {}

    def train(*args: object, **kwargs: object) -> None:
        received.update(kwargs)
        raise SystemExit

    monkeypatch.setattr(models.training, "train_sft", train)
    monkeypatch.setattr(pipeline, "sft_set", lambda round_number, tables: [])
    with pytest.raises(SystemExit):  # init_from: previous (the demo recipe), from round 0's hub policy
        pipeline.train_sft(1, [], Artifact("org/base-model", "org/base-model"))
    assert received["previous_checkpoint"] == "org/base-model"


def test_a_shard_without_problems_writes_an_empty_nodes_table(tmp_path: Path) -> None:
    from models.rollout import rollout_stage

    stats = rollout_stage([], model=str(tmp_path / "never-loaded"), out=tmp_path / "nodes.parquet")
    assert stats.trees == 0 and load_table_rows(tmp_path / "nodes.parquet", "nodes") == 0


def selected_ids(pipeline: Pipeline, round_number: int) -> list[str]:
    selected = pipeline.select_problems(round_number, pipeline.prepare_problems().train)
    return load_problems(selected.path).column("problem_id").to_pylist()


def test_selection_samples_across_a_pool_ordered_by_level(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"problems.curriculum.train": 50, "problems.per_round": 10})
    levels = {problem_id.split("-")[1] for problem_id in selected_ids(pipeline, 1)}
    assert len(levels) > 2


def test_selection_is_the_same_when_a_round_is_rerun(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"problems.curriculum.train": 50, "problems.per_round": 10})
    assert selected_ids(pipeline, 1) == selected_ids(pipeline, 1)


def sft_table(layout: Layout, round_number: int, rows: int) -> Artifact:
    table = pa.Table.from_pylist([
        {"prompt": f"q{round_number}-{row}", "completion": "c", "run": "demo", "round": round_number,
         "problem_id": f"p{round_number}-{row}", "sft_format": "rstar", "rank": 1, "leaf_id": 1, "mean_q": 1.0,
         "min_q": 1.0}
        for row in range(rows)
    ])
    return Artifact.of(write_table(table, layout.table_path("demo", round_number, "sft"), table="sft"))


def mixed_prompts(pipeline: Pipeline, round_number: int, tables: list[Artifact]) -> list[str]:
    (path,) = pipeline.sft_set(round_number, tables)
    return pq.read_table(path).column("prompt").to_pylist()


def test_sft_set_is_every_table_as_it_is_by_default(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, sft_data={})
    tables = [sft_table(pipeline.layout, 0, 10), sft_table(pipeline.layout, 1, 2)]
    assert pipeline.sft_set(2, tables) == [Path(table.path) for table in tables]


def test_sft_set_samples_teacher_rows_and_copies_verified_ones(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"sft_data.teacher_rows": 4, "sft_data.verified_copies": 3})
    prompts = mixed_prompts(pipeline, 2, [sft_table(pipeline.layout, 0, 10), sft_table(pipeline.layout, 1, 2)])
    assert sum(prompt.startswith("q0-") for prompt in prompts) == 4
    assert sorted(prompt for prompt in prompts if prompt.startswith("q1-")) == ["q1-0"] * 3 + ["q1-1"] * 3


def test_each_round_rehearses_its_own_teacher_sample(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"sft_data.teacher_rows": 4})
    teacher = sft_table(pipeline.layout, 0, 50)
    assert mixed_prompts(pipeline, 1, [teacher]) != mixed_prompts(pipeline, 2, [teacher])


# --- what cache keys and cache hits rest on ---------------------------------------------------------


def test_a_ppm_setting_leaves_the_policy_stages_digest_alone(tmp_path: Path) -> None:
    before = curriculum_pipeline(tmp_path).recipe
    after = curriculum_pipeline(tmp_path, **{"training.ppm.learning_rate": 1e-4}).recipe
    assert before.digest(*STAGE_SECTIONS["sft"]) == after.digest(*STAGE_SECTIONS["sft"])
    assert before.digest(*STAGE_SECTIONS["ppm"]) != after.digest(*STAGE_SECTIONS["ppm"])


def test_the_held_out_split_size_is_part_of_the_evaluation_digest(tmp_path: Path) -> None:
    before = curriculum_pipeline(tmp_path).recipe
    after = curriculum_pipeline(tmp_path, **{"problems.curriculum.test": 7}).recipe
    assert before.digest(*STAGE_SECTIONS["evaluate"]) != after.digest(*STAGE_SECTIONS["evaluate"])


@pytest.mark.parametrize("stage", ["bootstrap", "evaluate"])
def test_how_many_problems_a_round_searches_leaves_the_bootstrap_and_evaluation_alone(tmp_path: Path, stage: str) -> None:
    """A retrained bootstrap would cascade: training is not bit-reproducible, so every later round reruns."""
    before = curriculum_pipeline(tmp_path).recipe
    after = curriculum_pipeline(tmp_path, **{"problems.per_round": 4}).recipe
    assert before.digest(*STAGE_SECTIONS[stage]) == after.digest(*STAGE_SECTIONS[stage])


def stage_key(stage: str, pipeline: Pipeline, **inputs: object) -> str:
    from types import SimpleNamespace

    from tasks.stages import StageCache

    task_ctx = SimpleNamespace(task=SimpleNamespace(name=stage))
    return StageCache().compute_key(task_ctx, {"pipeline": pipeline, **inputs}, {})


def rollout_key(home: Path, round_number: int, **overrides: object) -> str:
    return stage_key("rollout", curriculum_pipeline(home, **overrides), round_number=round_number)


@pytest.mark.parametrize("setting", [{"sandbox.workers": 7}, {"backend.vllm_url": "http://10.0.0.2:8000"},
                                     {"search.grader_workers": 6}, {"backend.vllm.tensor_parallel_size": 4},
                                     {"backend.batch_size": 16}, {"backend.ppm_device": "cpu:0"}])
def test_where_a_search_runs_leaves_its_key_alone(tmp_path: Path, setting: dict) -> None:
    assert rollout_key(tmp_path, 1, **setting) == rollout_key(tmp_path, 1)


@pytest.mark.parametrize("setting", [{"search.mcts.rollouts": 9}, {"backend.vllm.dtype": "float16"},
                                     {"backend.vllm.extra_args": ["--quantization", "fp8"]}, {"backend.device": "cuda:1"}])
def test_what_a_search_computes_changes_its_key(tmp_path: Path, setting: dict) -> None:
    assert rollout_key(tmp_path, 1, **setting) != rollout_key(tmp_path, 1)


BASE = "org/base-model"


def base_model_pipeline(home: Path, worked_examples: int) -> Pipeline:
    return curriculum_pipeline(home, **{"model.base": BASE, "bootstrap.teacher": None,
                                        "bootstrap.worked_examples": worked_examples})


def test_round_zeros_base_model_is_shown_the_worked_examples(tmp_path: Path) -> None:
    assert base_model_pipeline(tmp_path, 2).worked_examples_for(Artifact(BASE, BASE)) == 2


def test_a_policy_trained_in_a_round_is_shown_no_worked_examples(tmp_path: Path) -> None:
    assert base_model_pipeline(tmp_path, 2).worked_examples_for(Artifact("/home/round-001/policy", "d1")) == 0


@pytest.mark.parametrize("stage", ["rollout", "evaluate"])
def test_worked_examples_change_the_key_of_a_stage_sampling_from_the_base_model(tmp_path: Path, stage: str) -> None:
    def key(worked_examples: int) -> str:
        return stage_key(stage, base_model_pipeline(tmp_path, worked_examples), round_number=1,
                         policy=Artifact(BASE, BASE), ppm=None)

    assert key(2) != key(0)


def test_worked_examples_leave_the_key_of_a_trained_policys_search_alone(tmp_path: Path) -> None:
    def key(worked_examples: int) -> str:
        return stage_key("rollout", base_model_pipeline(tmp_path, worked_examples), round_number=2,
                         policy=Artifact("/home/round-001/policy", "d1"), ppm=None)

    assert key(2) == key(0)


def sft_digest(pipeline: Pipeline) -> str:
    return pipeline.recipe.digest(*STAGE_SECTIONS["sft"], leave_out=KEY_LEAVES_OUT)


@pytest.mark.parametrize("setting", [{"training.sft.timeout_s": 600}, {"training.sft.save_strategy": "steps"},
                                     {"training.sft.save_steps": 50}, {"training.sft.logging_steps": 1}])
def test_settings_that_only_watch_and_keep_a_training_run_leave_its_key_alone(tmp_path: Path, setting: dict) -> None:
    assert sft_digest(curriculum_pipeline(tmp_path, **setting)) == sft_digest(curriculum_pipeline(tmp_path))


def test_settings_that_only_watch_the_bootstrap_training_leave_its_key_alone(tmp_path: Path) -> None:
    def digest(pipeline: Pipeline) -> str:
        return pipeline.recipe.digest(*STAGE_SECTIONS["bootstrap"], leave_out=KEY_LEAVES_OUT)

    assert digest(curriculum_pipeline(tmp_path, **{"bootstrap.training.timeout_s": 600})) \
        == digest(curriculum_pipeline(tmp_path))


def test_a_training_log_line_takes_figures_a_short_run_lacks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from models.pipeline import _log_training
    from models.training import PROVENANCE_FILE

    (tmp_path / PROVENANCE_FILE).write_text(json.dumps({"metrics": {"train_loss": 1.5, "tokens_per_second": None}}))
    with caplog.at_level("INFO", logger="models.pipeline"):
        _log_training("sft", 1, tmp_path)
    assert "(nan tokens/s)" in caplog.records[-1].getMessage()


def test_a_training_setting_changes_its_key(tmp_path: Path) -> None:
    changed = curriculum_pipeline(tmp_path, **{"training.sft.learning_rate": 1e-4})
    assert sft_digest(changed) != sft_digest(curriculum_pipeline(tmp_path))


def test_the_seed_changes_the_selection_key(tmp_path: Path) -> None:
    keys = [stage_key("select", curriculum_pipeline(tmp_path, **{"problems.per_round": 4, "seed": seed}),
                      round_number=2, never_solved=[]) for seed in (0, 1)]
    assert keys[0] != keys[1]


def test_a_problem_solved_since_changes_the_selection_key(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"problems.per_round": 4})
    pools = pipeline.prepare_problems()
    before = stage_key("select", pipeline, round_number=2, never_solved=pipeline.never_solved(2))
    solved_in_round(pipeline.layout, 1, load_problems(pools.train.path).column("problem_id")[0].as_py())
    assert stage_key("select", pipeline, round_number=2, never_solved=pipeline.never_solved(2)) != before


def test_the_evaluations_grader_workers_leave_its_key_alone(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"eval.config.grader_workers": 8})
    assert stage_key("evaluate", pipeline) == stage_key("evaluate", curriculum_pipeline(tmp_path))


def test_a_later_rounds_override_leaves_an_earlier_rounds_search_key_alone(tmp_path: Path) -> None:
    override = {"search.round_overrides": {3: {"rollouts": 9}}}
    assert rollout_key(tmp_path, 1, **override) == rollout_key(tmp_path, 1)
    assert rollout_key(tmp_path, 3, **override) != rollout_key(tmp_path, 3)


def test_moving_the_ppm_to_a_later_round_changes_only_the_rounds_whose_search_changes(tmp_path: Path) -> None:
    later = {"search.ppm_from_round": 4}  # the demo's PPM joins in round 3
    assert rollout_key(tmp_path, 2, **later) == rollout_key(tmp_path, 2)
    assert rollout_key(tmp_path, 3, **later) != rollout_key(tmp_path, 3)


def test_an_edited_benchmark_file_changes_the_evaluation_key(tmp_path: Path) -> None:
    benchmark = tmp_path / "bench.jsonl"
    benchmark.write_text('{"problem": "1+1?", "answer": "2"}\n')
    pipeline = curriculum_pipeline(tmp_path / "home", **{"eval.benchmarks": ["curriculum-test", f"mine={benchmark}"]})
    before = stage_key("evaluate", pipeline)
    benchmark.write_text('{"problem": "1+1?", "answer": "3"}\n')
    assert stage_key("evaluate", pipeline) != before


def test_an_edited_problems_file_changes_the_problems_key(tmp_path: Path) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text('{"problem": "1+1?", "answer": "2"}\n')
    pipeline = curriculum_pipeline(tmp_path / "home", **{"problems.source": str(source), "bootstrap.teacher": None})
    before = stage_key("problems", pipeline)
    source.write_text('{"problem": "1+2?", "answer": "3"}\n')
    assert stage_key("problems", pipeline) != before


def test_a_hub_benchmark_is_no_external_file(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path, **{"eval.benchmarks": ["curriculum-test", "mine=hf:someone/some-benchmark"]})
    assert pipeline.external_files("evaluate") == []  # (the held-out split is not written yet)


def test_terminal_guided_rounds_search_without_the_ppm(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path)  # ppm_from_round: 3
    ppm = Artifact("ppm", "digest")
    assert (pipeline.search_ppm(2, ppm), pipeline.search_ppm(3, ppm)) == (None, ppm)


def test_an_artifact_rewritten_after_it_was_recorded_is_not_current(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"seed 0")
    recorded = Artifact.of(path)
    assert artifacts_current({"pairs": [recorded]})
    path.write_bytes(b"seed 1")
    assert not artifacts_current({"pairs": [recorded]})


def _model_directory(path: Path, weights: bytes) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_copied_model_directory_keeps_its_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import time

    from models import pipeline

    monkeypatch.setattr(pipeline, "_CONTENT_HASH_LIMIT", 3 * 2**20)  # the weights are sampled, not read whole
    original = _model_directory(tmp_path / "model", bytes(range(256)) * 4 * 4096)
    time.sleep(0.01)
    copy = shutil.copytree(original, tmp_path / "copy", copy_function=shutil.copy)  # new modification times
    (copy / ".git").mkdir()
    (copy / ".git" / "FETCH_HEAD").write_text("fetched")
    assert pipeline.content_digest(copy, large_by_mtime=False) == pipeline.content_digest(original, large_by_mtime=False)


def test_weights_rewritten_only_in_the_middle_change_the_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models import pipeline

    monkeypatch.setattr(pipeline, "_CONTENT_HASH_LIMIT", 3 * 2**20)
    size = 16 * 2**20
    before = pipeline.content_digest(_model_directory(tmp_path / "a", b"\0" * size), large_by_mtime=False)
    middle_changed = b"\0" * (size // 2) + b"\1" * 2**20 + b"\0" * (size // 2 - 2**20)  # first and last MiB as before
    after = pipeline.content_digest(_model_directory(tmp_path / "b", middle_changed), large_by_mtime=False)
    assert after != before


def test_a_removed_artifact_is_not_current(tmp_path: Path) -> None:
    path = tmp_path / "policy"
    path.mkdir()
    recorded = Artifact.of(path)
    path.rmdir()
    assert not artifacts_current(recorded)


def recorded(pipeline: Pipeline, stats: dict, started_at: datetime, replayed: bool = False) -> dict:
    policy = Artifact(path="policy", digest="d")
    pipeline.record_round(RoundRecord(1, policy, None, {}, stats, True, []), started_at, replayed=replayed)
    return pq.read_table(pipeline.layout.table_path(pipeline.run, 1, "rounds")).to_pylist()[0]


def test_a_replayed_round_keeps_the_timing_of_the_run_that_computed_it(tmp_path: Path) -> None:
    pipeline = curriculum_pipeline(tmp_path)
    first = datetime(2026, 1, 1, tzinfo=timezone.utc)
    computed = recorded(pipeline, {"wall_s": 177.0}, first)
    replayed = recorded(pipeline, {"wall_s": 2.0}, first + timedelta(days=1), replayed=True)
    assert (json.loads(replayed["metrics"])["wall_s"], replayed["started_at"]) == (177.0, computed["started_at"])


def test_problems_whose_level_is_null_count_under_all(tmp_path: Path) -> None:
    from models.pipeline import solved_by_level

    problems = pa.table({"problem_id": ["a", "b"], "metadata": ['{"level": null}', '{"level": 2}']})
    status = pa.table({"problem_id": ["a", "b"], "solved": [True, False]})
    assert solved_by_level(status, problems) == {"2": [0, 1], "all": [1, 1]}


def test_a_training_stage_is_given_the_previous_checkpoint_only_when_it_continues_from_it(tmp_path: Path) -> None:
    """Otherwise the previous round's checkpoint (and its metrics) would be in the stage's cache key:
    an evaluation setting changed would retrain every later policy."""
    previous = Artifact("prev", "d")
    continuing = curriculum_pipeline(tmp_path, **{"training.sft.init_from": "previous"})
    fresh = curriculum_pipeline(tmp_path, **{"training.sft.init_from": "base"})
    assert (continuing.continued_from("sft", previous), fresh.continued_from("sft", previous)) == (previous, None)
