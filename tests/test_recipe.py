"""Recipes: every bundled recipe loads, and each kind of bad recipe is rejected naming its field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from models.recipe import RECIPES_DIR, RecipeError, cron_problem, load_recipe, parse_recipe
from search.mcts import SearchMode

MINIMAL = {
    "run": "unit",
    "model": {"base": "tiny"},
    "problems": {"source": "curriculum"},
    "eval": {"benchmarks": ["curriculum-test"], "modes": ["greedy"]},
    "gate": {"benchmark": "curriculum-test"},
}


def recipe_with(**changes: object) -> dict:
    """MINIMAL with dotted keys replaced, e.g. recipe_with(**{"search.mcts.width": 3})."""
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return data


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_bundled_recipes_load(path: Path) -> None:
    assert load_recipe(path).run


def test_the_deploy_build_step_checks_the_recipe_the_deployments_run() -> None:
    spec = yaml.safe_load((RECIPES_DIR.parent / "prefect.yaml").read_text())
    [step] = spec["build"]
    recipe = spec["definitions"]["recipe"]
    assert step["prefect.deployments.steps.run_shell_script"]["script"] == f"kaizen check-recipe {recipe} --print-cron"
    assert {deployment["parameters"].get("recipe") for deployment in spec["deployments"]} == {recipe, None}


def test_recipe_is_found_by_bundled_name() -> None:
    assert load_recipe("demo").source.endswith("demo.yaml")


def test_minimal_recipe_gets_defaults() -> None:
    recipe = parse_recipe(MINIMAL)
    assert (recipe.search.mcts.c_puct, recipe.mining.margin) == (2.0, 0.5)


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run: x\nsearch:\n  shards: 1\n    rollouts: 2\n")
    with pytest.raises(RecipeError, match=r"mapping values are not allowed here \(line 4, column 13\)"):
        load_recipe(path)


def test_yaml_exponent_strings_become_numbers() -> None:
    recipe = parse_recipe(recipe_with(**{"search.mcts.temperature": "7e-1"}))
    assert recipe.search.mcts.temperature == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search.mcts.widht": 3}, r"search\.mcts\.widht: unknown key \(did you mean 'width'\?\)"),
        ({"serach": {}}, r"serach: unknown key \(did you mean 'search'\?\)"),
        ({"search.mcts.width": "many"}, r"search\.mcts\.width: expected an integer"),
        ({"search.mcts.width": 0}, r"search\.mcts: MCTSConfig\.width must be >= 1"),
        ({"search.mcts.mode": "ppm"}, r"search\.mcts\.mode: set per round"),
        ({"search.round_overrides": {1: {"rolouts": 3}}}, r"search\.round_overrides\.1.*rolouts"),
        ({"backend.backend": "tgi"}, r"backend: unknown backend 'tgi'"),
        ({"execution.task_runner": "dask"}, r"execution\.task_runner: 'dask' is not one of thread, ray"),
        ({"backend.vllm": {"gpu_mem": 0.5}}, r"backend\.vllm\.gpu_mem: unknown key"),
        ({"backend.vllm": {"gpu_memory_utilization": 1.5}}, r"backend\.vllm: gpu_memory_utilization must be in"),
        ({"training": {"sft": {"lora_r": 8, "accelerate_config": "deployments/accelerate/fsdp_1node.yaml"}}},
         r"training\.sft: lora_r with an FSDP accelerate config"),
        ({"schedule.cron": "0 25 * * *"}, r"schedule\.cron: '25' .* outside 0-23"),
        ({"schedule.cron": "nightly"}, r"schedule\.cron: .* 1 fields"),
        ({"schedule.cron": "0 2 31 2,4 *"}, r"schedule\.cron: '0 2 31 2,4 \*' never fires"),
        ({"gate.benchmark": "math500"}, r"gate\.benchmark: 'math500' is not among eval\.benchmarks"),
        ({"gate.mode": "maj@8"}, r"gate\.mode: 'maj@8' is not among eval\.modes"),
        ({"eval.modes": ["best@3"]}, r"eval: .*best@3"),
        ({"eval.config": {"seed": 5}}, r"eval\.config\.seed: a round's evaluation takes it from the recipe's seed"),
        ({"eval.config": {"backend": {"backend": "vllm"}}}, r"eval\.config\.backend: .* from the backend section"),
        ({"bootstrap.teacher": "gpt"}, r"bootstrap\.teacher: 'gpt' is not a known teacher"),
        ({"run": "../escape"}, r"run: run name"),
        ({"training": {"sft": {"learning_rte": 1e-5}}}, r"learning_rte.*did you mean 'learning_rate'"),
        ({"training": {"sft": {"base_model": "/elsewhere"}}}, r"training\.sft\.base_model: the pipeline sets it"),
        ({"training": {"ppm": {"train_tables": ["a.parquet"]}}}, r"training\.ppm\.train_tables: the pipeline sets"),
        ({"bootstrap.training": {"output_dir": "/out"}}, r"bootstrap\.training\.output_dir: the pipeline sets"),
        ({"training": {"rl": {"init_from": "previous"}}}, r"training\.rl\.init_from: .* the round's SFT policy"),
        ({"problems.per_round": -1}, r"problems\.per_round: must be >= 1, got -1"),
        ({"problems.limit": 0}, r"problems\.limit: must be >= 1, got 0"),
        ({"eval.limit": 0}, r"eval\.limit: must be >= 1, got 0"),
        ({"search.mcts.temperature": -0.7}, r"search\.mcts: MCTSConfig\.temperature must be finite and >= 0"),
        ({"search.round_overrides": {1: {"temperature": -2}}}, r"search\.round_overrides\.1: .*temperature must be"),
        ({"search.mcts.rollouts": 2.7}, r"search\.mcts\.rollouts: expected an integer, got 2\.7"),
        ({"seed": 1.5}, r"seed: expected an integer, got 1\.5"),
        ({"problems.curriculum.train": -5}, r"problems\.curriculum\.train: must be >= 1, got -5"),
        ({"problems.curriculum.test": 0}, r"problems\.curriculum\.test: must be >= 1, got 0"),
        ({"bootstrap.teacher": "curriculum", "bootstrap.problems": 0}, r"bootstrap\.problems: must be >= 1, got 0"),
        ({"bootstrap.teacher": "curriculum", "bootstrap.worked_examples": 2},
         r"bootstrap\.worked_examples: only for a base model used as is \(teacher: null\)"),
        ({"bootstrap.worked_examples": 9}, r"bootstrap\.worked_examples: worked examples: 0 to 2, got 9"),
        ({"bootstrap.worked_examples": 1, "step_format": "coat"}, r"bootstrap\.worked_examples: .* rstar step format"),
        ({"eval.config": {"worked_examples": 2}}, r"eval\.config\.worked_examples: .* bootstrap\.worked_examples"),
        ({"search.unsolved_rollouts": {0: 64}}, r"search\.unsolved_rollouts: rounds are numbers from 1"),
        ({"search.unsolved_rollouts": {4: 0}}, r"search\.unsolved_rollouts\.4: must be >= 1, got 0"),
    ],
)
def test_bad_field_is_named(changes: dict, message: str) -> None:
    data = recipe_with(**{key: value for key, value in changes.items() if "." in key})
    data.update({key: value for key, value in changes.items() if "." not in key})
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


@pytest.mark.parametrize("missing", ["model", "problems", "gate", "run"])
def test_missing_required_section_is_named(missing: str) -> None:
    data = recipe_with()
    del data[missing]
    with pytest.raises(RecipeError, match=rf"{missing}"):
        parse_recipe(data)


def test_an_unknown_problem_field_mapping_key_is_named() -> None:
    from models.recipe import apply_overrides

    with pytest.raises(RecipeError, match=r"problems\.fields: unknown field mapping key\(s\) bogus"):
        parse_recipe(apply_overrides(MINIMAL, {"problems.fields": {"bogus": "x"}}))


def test_unknown_recipe_name_lists_the_bundled_ones() -> None:
    with pytest.raises(RecipeError, match="not found .*demo"):
        load_recipe("no-such-recipe")


def test_rounds_switch_to_ppm_search_at_ppm_from_round() -> None:
    search = parse_recipe(recipe_with(**{"search.ppm_from_round": 3})).search
    modes = [search.mcts_for_round(number, seed=0).mode for number in (1, 2, 3, 4)]
    assert modes == [SearchMode.TERMINAL, SearchMode.TERMINAL, SearchMode.PPM, SearchMode.PPM]


def test_round_overrides_apply_to_their_round_only() -> None:
    search = parse_recipe(recipe_with(**{"search.round_overrides": {1: {"rollouts": 3}}})).search
    assert [search.mcts_for_round(number, seed=0).rollouts for number in (1, 2)] == [3, search.mcts.rollouts]


def test_round_override_values_are_converted_like_the_section_they_override() -> None:
    search = parse_recipe(recipe_with(**{"search.round_overrides": {1: {"temperature": "1e-1"}}})).search
    assert search.mcts_for_round(1, seed=0).temperature == pytest.approx(0.1)


def test_overriding_one_field_of_a_round_keeps_its_other_overrides() -> None:
    from models.recipe import apply_overrides

    data = recipe_with(**{"search.round_overrides": {1: {"rollouts": 3, "width": 2}}})
    search = parse_recipe(apply_overrides(data, {"search.round_overrides.1.width": 4})).search
    round_one = search.mcts_for_round(1, seed=0)
    assert (round_one.rollouts, round_one.width) == (3, 4)


def test_digest_changes_only_with_its_sections() -> None:
    before = parse_recipe(recipe_with())
    after = parse_recipe(recipe_with(**{"gate.tolerance": 0.5}))
    assert before.digest("search") == after.digest("search") and before.digest("gate") != after.digest("gate")


@pytest.mark.parametrize("expression", ["0 2 * * *", "*/15 0-6 1,15 jan-mar mon-fri", "30 4 * * 7", "@daily"])
def test_valid_cron_expressions_pass(expression: str) -> None:
    assert cron_problem(expression) is None


def test_gate_mode_matches_an_eval_mode_written_differently() -> None:
    recipe = parse_recipe(recipe_with(**{"eval.modes": ["greedy", "maj@8"], "gate.mode": "maj@08"}))
    assert recipe.gate.metric.endswith("/maj@8")


def test_overrides_set_dotted_fields() -> None:
    from models.recipe import apply_overrides

    recipe = parse_recipe(apply_overrides(MINIMAL, {"seed": 7, "search.mcts.rollouts": 3}))
    assert (recipe.seed, recipe.search.mcts.rollouts) == (7, 3)


def test_bad_override_is_named_like_a_bad_recipe_field() -> None:
    from models.recipe import apply_overrides

    with pytest.raises(RecipeError, match=r"search\.mcts\.rolouts: unknown key"):
        parse_recipe(apply_overrides(MINIMAL, {"search.mcts.rolouts": 3}))


def test_run_command_rejects_a_bad_recipe_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe_with(**{"search.mcts.widht": 3})))
    code = main(["run", "--recipe", str(bad)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "search.mcts.widht: unknown key" in lines[0]


# --- the recipe's step format ---------------------------------------------------------------------


def test_satori_recipe_runs_every_stage_in_coat() -> None:
    recipe = load_recipe("satori")
    assert recipe.step_format == "coat" and recipe.rl.enabled
    assert (recipe.search.mcts_for_round(1, seed=0).step_format, recipe.mining.sft_format) == ("coat", "coat")
    assert {recipe.training.for_kind(kind)["step_format"] for kind in ("sft", "ppm", "rl")} == {"coat"}
    assert (recipe.rl.prompts.step_format, recipe.eval.config["step_format"]) == ("coat", "coat")
    assert recipe.training.rl["rewards"] == ["outcome", "reflection"]


def test_a_section_may_repeat_the_step_format() -> None:
    recipe = parse_recipe(recipe_with(step_format="coat", **{"training.sft.step_format": "coat"}))
    assert recipe.training.sft["step_format"] == "coat" and recipe.mining.sft_format == "coat"


@pytest.mark.parametrize(("changes", "where"), [
    ({"training.rl.step_format": "rstar"}, "training.rl.step_format"),
    ({"search.mcts.step_format": "rstar"}, "search.mcts.step_format"),
    ({"search.round_overrides": {2: {"step_format": "rstar"}}}, "search.round_overrides.2.step_format"),
    ({"eval.config": {"step_format": "rstar"}}, "eval.config.step_format"),
    ({"rl.prompts.step_format": "rstar"}, "rl.prompts.step_format"),
    ({"bootstrap.training": {"step_format": "rstar"}}, "bootstrap.training.step_format"),
    ({"mining.sft_format": "astro"}, "mining.sft_format"),
])
def test_a_section_contradicting_a_coat_recipe_fails_naming_the_field(changes: dict, where: str) -> None:
    with pytest.raises(RecipeError, match=rf"{re.escape(where)}: '\w+' contradicts the recipe's step_format 'coat'"):
        parse_recipe(recipe_with(step_format="coat", **changes))


def test_coat_mining_in_an_rstar_recipe_is_rejected() -> None:
    with pytest.raises(RecipeError, match=r"mining\.sft_format: 'coat' contradicts the recipe's step_format 'rstar'"):
        parse_recipe(recipe_with(**{"mining.sft_format": "coat"}))


def test_an_unknown_step_format_is_named() -> None:
    with pytest.raises(RecipeError, match=r"step_format: 'cot' is not one of rstar, coat"):
        parse_recipe(recipe_with(step_format="cot"))


def test_an_rl_stage_without_a_reward_fails_at_load() -> None:
    with pytest.raises(RecipeError, match=r"training\.rl: an RL stage needs at least one reward function"):
        parse_recipe(recipe_with(**{"rl.enabled": True, "training.rl.rewards": []}))


def test_a_bad_field_set_by_an_override_is_blamed_on_the_override() -> None:
    with pytest.raises(RecipeError, match=r"^override search\.mcts\.widht=3: search\.mcts\.widht: unknown key"):
        load_recipe("demo", {"search.mcts.widht": 3})


def test_an_error_in_the_recipe_file_is_not_blamed_on_a_valid_override(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_with(**{"search.mcts.width": 0})))
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: search\.mcts: MCTSConfig\.width must be >= 1"):
        load_recipe(path, {"search.mcts.temperature": 0.5})


def test_a_recipe_whose_problems_file_is_elsewhere_still_loads() -> None:
    """`kaizen status` and the deploy build step load recipes on machines without the data."""
    recipe = load_recipe("demo", {"problems.source": "/nowhere/pool.jsonl", "bootstrap.teacher": None})
    assert recipe.problems.source == "/nowhere/pool.jsonl"
