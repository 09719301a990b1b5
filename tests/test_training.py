"""Policy SFT and PPM training on a tiny model: learning, the scorer contract, atomic checkpoints, resuming a killed run, bad input.

Resuming is also tested from the launcher's side, with a stand-in for the training process: what a run that ends
early keeps, one run per output at a time, a model finished but not published, a home moved elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.lifetime import process_identity, process_is_running
from models.ppm import PPMScorer, ScoringContract, cli_score, encode_texts
from models.training import (
    PROVENANCE_FILE,
    RESUMABLE_FILE,
    RESUMED_FILE,
    RUN_ONLY_KEYS,
    ResumableCheckpoints,
    PPMTrainingConfig,
    RLTrainingConfig,
    RunRequest,
    SFTTrainingConfig,
    TrainingInputError,
    TrainingRun,
    TrainingRunError,
    cast_saved_weights,
    complete_checkpoints,
    file_sha256,
    load_training_config,
    prepare_run,
    start_run,
    train_ppm,
    train_sft,
)
from models.training_cli import cli_train
from search.steps import END_OF_STEP, StepKind, parse_step, render_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]

RECIPES = Path(__file__).resolve().parents[1] / "deployments" / "recipes"

# Settings that make a 2-layer model learn a handful of rows in seconds on CPU.
FAST_SFT = {"learning_rate": 3e-3, "lr_scheduler_type": "constant", "per_device_train_batch_size": 8, "logging_steps": 5}
FAST_PPM = {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "logging_steps": 3, "max_length": 256}


def write_table(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def sft_rows(count: int = 8) -> list[dict]:
    """Step-format solutions of `a + b`, small enough to memorise."""
    rows = []
    for a in range(count):
        total = 2 * a + 1
        completion = (
            f"# Step 1: add the numbers\nx = {a} + {a + 1}\n{END_OF_STEP}\n"
            "# Now print the final answer\nprint(x)\n<end_of_code>\n"
            f"<output>{total}<end_of_output>\n<answer>\\boxed{{{total}}}<end_of_answer>"
        )
        rows.append({"prompt": render_prompt(f"What is {a} plus {a + 1}?"), "completion": completion,
                     "problem_id": f"p{a}", "round": 1, "mean_q": 1.0, "min_q": 1.0})
    return rows


def pair_rows(seed: int, count: int) -> list[dict]:
    """Same-prefix step pairs where the rejected step divides by zero: a rule a tiny model can learn."""
    rng = random.Random(seed)
    names = ["total", "count", "value", "area", "result", "speed", "price", "width"]
    rows = []
    for index in range(count):
        a, b, name = rng.randint(2, 99), rng.randint(2, 99), rng.choice(names)
        prefix = render_prompt(f"Find the {name} when a={a} and b={b}.")
        prefix += f"# Step 1: set up\na = {a}\nb = {b}\n{END_OF_STEP}\n"
        offset = rng.randint(1, 9)
        rows.append({
            "prompt": prefix,
            "chosen": f"# Step 2: compute the {name}\n{name} = a * b + {offset}\n{END_OF_STEP}",
            "rejected": f"# Step 2: compute the {name}\n{name} = a * b / 0 + {offset}\n{END_OF_STEP}",
            "problem_id": f"q{index}", "round": 1, "q_chosen": 1.0, "q_rejected": -1.0, "margin": 2.0,
        })
    return rows


@pytest.fixture(scope="module")
def sft_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(tmp_path_factory.mktemp("tables") / "sft.parquet", sft_rows())


@pytest.fixture(scope="module")
def pairs_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(tmp_path_factory.mktemp("tables") / "pairs.parquet", pair_rows(seed=0, count=48))


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sft_table: Path) -> Path:
    out = tmp_path_factory.mktemp("sft") / "policy"
    return train_sft([sft_table], out, base_model=str(tiny_model), overrides={**FAST_SFT, "num_train_epochs": 30})


@pytest.fixture(scope="module")
def ppm_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, pairs_table: Path) -> Path:
    out = tmp_path_factory.mktemp("ppm") / "ppm"
    return train_ppm([pairs_table], out, base_model=str(tiny_model), overrides={**FAST_PPM, "num_train_epochs": 4})


def losses(checkpoint: Path) -> list[float]:
    history = json.loads((checkpoint / PROVENANCE_FILE).read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


# --- recipes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda path: path.stem)
def test_training_recipes_load(recipe: Path) -> None:
    settings = load_training_config(recipe)
    assert settings.sft and settings.ppm


@pytest.mark.parametrize("name", ["rstar-qwen2.5-math-1.5b", "rstar-qwen2.5-math-7b"])
def test_gpu_recipes_use_the_paper_hyperparameters(name: str) -> None:
    settings = load_training_config(RECIPES / f"{name}.yaml")
    paper = {
        "sft": {"num_train_epochs": 2, "learning_rate": 7e-6, "global_batch_size": 128, "max_length": 4096, "bf16": True},
        "ppm": {"num_train_epochs": 1, "learning_rate": 7e-6, "global_batch_size": 512, "bf16": True},
    }
    for kind, expected in paper.items():
        section = settings.for_kind(kind)
        assert {key: section[key] for key in expected} == expected


def test_unknown_recipe_keys_are_all_named_with_suggestions() -> None:
    with pytest.raises(TrainingInputError, match="'learning_rte' \\(did you mean 'learning_rate'\\?\\), 'lora_rr'"):
        load_training_config({"training": {"sft": {"learning_rte": 1e-5, "lora_rr": 8}}})


def test_unknown_training_section_is_named() -> None:
    with pytest.raises(TrainingInputError, match="unknown key in training: 'policy'"):
        load_training_config({"training": {"policy": {}}})


def test_yaml_exponent_strings_become_floats() -> None:
    assert load_training_config({"sft": {"learning_rate": "7e-6"}}).sft["learning_rate"] == 7e-6


def test_config_values_outside_their_choices_are_rejected() -> None:
    with pytest.raises(TrainingInputError, match="init_from: 'last' is not one of base, previous"):
        load_training_config({"sft": {"init_from": "last"}})


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": -1.0}, "training.sft.learning_rate must be > 0.0, got -1.0"),
    ({"per_device_train_batch_size": 0}, "training.sft.per_device_train_batch_size must be >= 1, got 0"),
    ({"num_train_epochs": 0}, "training.sft.num_train_epochs must be > 0.0, got 0"),
    ({"learning_rate": [1]}, "training.sft.learning_rate must be a number, got [1]"),
    ({"max_steps": {"a": 1}}, "training.sft.max_steps must be a number, got {'a': 1}"),
])
def test_values_that_cannot_train_are_rejected(values: dict, message: str) -> None:
    with pytest.raises(TrainingInputError, match=re.escape(message)):
        load_training_config({"sft": values})


def test_no_epochs_is_fine_when_max_steps_sets_the_length() -> None:
    assert load_training_config({"sft": {"num_train_epochs": 0, "max_steps": 10}}).sft["max_steps"] == 10


def test_a_recipe_can_be_named_like_everywhere_else() -> None:
    assert load_training_config("demo").for_kind("sft")["learning_rate"] == 1e-3


def test_an_unknown_recipe_name_is_one_clear_error() -> None:
    with pytest.raises(TrainingInputError, match="recipe 'no-such-recipe' not found"):
        load_training_config("no-such-recipe")


@pytest.mark.parametrize("kind", ["sft", "ppm", "rl"])
@pytest.mark.parametrize("key", ["output_dir", "resume_from_checkpoint"])
def test_settings_a_run_would_ignore_are_refused(kind: str, key: str) -> None:
    with pytest.raises(TrainingInputError, match=f"training.{kind}.{key} is not supported"):
        load_training_config({kind: {key: "/somewhere"}})


def test_a_policy_does_not_train_from_a_ppm_checkpoint(tmp_path: Path, sft_table: Path) -> None:
    ppm = tmp_path / "ppm"
    ppm.mkdir()
    (ppm / "config.json").write_text("{}")
    (ppm / "ppm_scoring.json").write_text("{}")
    with pytest.raises(TrainingInputError, match="is a PPM checkpoint .* sft trains a policy"):
        prepare_run("sft", {}, tables=[sft_table], output_dir=tmp_path / "out", base_model=str(ppm))


def test_ppm_refuses_a_different_eos_or_pad_token() -> None:
    with pytest.raises(TrainingInputError, match="training.ppm.eos_token is not supported"):
        load_training_config({"ppm": {"eos_token": "<end_of_answer>"}})


def test_a_full_recipes_step_format_reaches_every_kind() -> None:
    settings = load_training_config({"step_format": "coat", "training": {"sft": {}, "rl": {"step_format": "coat"}}})
    assert [settings.for_kind(kind)["step_format"] for kind in ("sft", "ppm", "rl")] == ["coat"] * 3


# --- bad input fails before training -----------------------------------------------------------


def test_empty_table_fails_before_anything_is_written(tmp_path: Path, tiny_model: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
    empty = write_table(tmp_path / "sft.parquet", [], schema=schema)
    with pytest.raises(TrainingInputError, match="tables are empty"):
        train_sft([empty], tmp_path / "out", base_model=str(tiny_model))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sft.parquet"]


def test_table_without_required_columns_names_them(tmp_path: Path, tiny_model: Path) -> None:
    table = write_table(tmp_path / "pairs.parquet", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(TrainingInputError, match="lacks column rejected"):
        prepare_run("ppm", tables=[table], output_dir=tmp_path / "out", base_model=str(tiny_model))


def test_null_or_empty_completions_are_rejected(tmp_path: Path, tiny_model: Path) -> None:
    table = write_table(tmp_path / "sft.parquet", [{"prompt": "p", "completion": ""}, {"prompt": "p", "completion": None}])
    with pytest.raises(TrainingInputError, match="2 row\\(s\\) with a null or empty completion"):
        prepare_run("sft", tables=[table], output_dir=tmp_path / "out", base_model=str(tiny_model))


def test_a_column_of_nulls_only_is_rejected(tmp_path: Path, tiny_model: Path) -> None:
    schema = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
    table = write_table(tmp_path / "sft.parquet", [{"prompt": "p", "completion": None}] * 2, schema)
    with pytest.raises(TrainingInputError, match="2 row\\(s\\) with a null or empty completion"):
        prepare_run("sft", tables=[table], output_dir=tmp_path / "out", base_model=str(tiny_model))


def test_a_file_that_is_not_parquet_is_rejected(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "sft.parquet").write_text("prompt,completion\n")
    with pytest.raises(TrainingInputError, match="is not a Parquet file"):
        prepare_run("sft", tables=[tmp_path / "sft.parquet"], output_dir=tmp_path / "out", base_model=str(tiny_model))


def test_missing_base_model_is_rejected(tmp_path: Path, sft_table: Path) -> None:
    with pytest.raises(TrainingInputError, match="model not found"):
        prepare_run("sft", tables=[sft_table], output_dir=tmp_path / "out", base_model=str(tmp_path / "no-model"))


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")
def test_liger_without_its_package_fails_before_anything_is_written(tmp_path: Path, tiny_model: Path,
                                                                    sft_table: Path) -> None:
    with pytest.raises(TrainingInputError, match=r"liger-kernel package: pip install -e '\.\[gpu\]'"):
        train_sft([sft_table], tmp_path / "out", base_model=str(tiny_model), overrides={"use_liger_kernel": True})
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten_by_default(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(TrainingInputError, match="already exists"):
        prepare_run("sft", tables=[sft_table], output_dir=tmp_path / "out", base_model=str(tiny_model))


def test_init_from_previous_starts_from_the_previous_checkpoint(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    previous = tmp_path / "round1"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    request = prepare_run("sft", {"sft": {"init_from": "previous"}}, tables=[sft_table], output_dir=tmp_path / "out",
                          base_model=str(tiny_model), previous_checkpoint=previous)
    assert (request.start_model, request.base_model["name"]) == (str(previous), str(tiny_model))


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_train(["sft", "--tables", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out"),
                      "--base-model", str(tiny_model)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("kaizen train: error: sft table not found") and error.count("\n") == 1


def test_cli_rejects_unknown_setting(
    tmp_path: Path, sft_table: Path, tiny_model: Path, capsys: pytest.CaptureFixture
) -> None:
    code = cli_train(["sft", "--tables", str(sft_table), "--out", str(tmp_path / "out"), "--base-model",
                      str(tiny_model), "--set", "epochs=3"])
    assert code == 2
    assert "unknown key in overrides: 'epochs'" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_config_value_fails_in_the_child_before_training(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    with pytest.raises(TrainingInputError, match="invalid sft config"):
        train_sft([sft_table], tmp_path / "out", base_model=str(tiny_model), overrides={"lr_scheduler_type": "bogus"})
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_reports_bad_input_the_training_process_finds_in_one_line(
    tmp_path: Path, tiny_model: Path, sft_table: Path
) -> None:
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "sft", "--tables", str(sft_table), "--out",
                             str(tmp_path / "out"), "--base-model", str(tiny_model), "--set", "lr_scheduler_type=bogus"],
                            capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_cli_prints_only_the_checkpoint_path_on_stdout(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    """So that `CHECKPOINT=$(kaizen train ...)` works: the training process's log lines go to stderr."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", "train", "sft", "--tables", str(sft_table), "--out",
                             str(tmp_path / "out"), "--base-model", str(tiny_model), "--set", "max_steps=3",
                             "--set", "logging_steps=1"], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.splitlines() == [str(tmp_path / "out")]


# --- the PPM's encoding and attention ----------------------------------------------------------


def test_encoding_appends_eos_and_cuts_the_start(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "# Step 1: compute\nx = 12345 * 678\n"
    full = encode_texts(tokenizer, [text], max_length=10_000)[0]
    cut = encode_texts(tokenizer, [text], max_length=5)[0]
    assert full[-1] == tokenizer.eos_token_id
    assert cut == full[-5:]


def test_encoding_nothing_gives_nothing(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    assert encode_texts(AutoTokenizer.from_pretrained(tiny_model), [], max_length=16) == []


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"), ("cuda:999", "device 'cuda:999': torch sees")])
def test_cli_score_reports_a_device_it_cannot_use_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, device: str, message: str
) -> None:
    texts = tmp_path / "texts.jsonl"
    texts.write_text('"a text"\n')
    assert cli_score(["--ppm", str(tmp_path), "--jsonl", str(texts), "--device", device]) == 2
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith(f"kaizen score: error: {message}")


@pytest.mark.parametrize("contract, message", [
    ({"max_length": 64, "value": "sigmoid(logit)"}, "is not what this scorer implements"),
    ({"max_length": 64, "temperature": 2.0}, "not a scoring contract"),
])
def test_a_scoring_contract_the_scorer_does_not_implement_is_refused(tmp_path: Path, contract: dict,
                                                                     message: str) -> None:
    (tmp_path / "ppm_scoring.json").write_text(json.dumps(contract))
    with pytest.raises(ValueError, match=message):
        ScoringContract.load(tmp_path)


def test_cli_score_reports_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_score(["--ppm", str(tmp_path), "--jsonl", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == (f"kaizen score: error: cannot read {tmp_path / 'none.jsonl'}: "
                                       "No such file or directory\n")


def test_cli_train_help_states_the_defaults_that_apply_without_a_recipe(capsys: pytest.CaptureFixture) -> None:
    """The help writes them out (it does not import TRL): they must be the config classes' own."""
    with pytest.raises(SystemExit):
        cli_train(["sft", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    configs = {"sft": SFTTrainingConfig, "ppm": PPMTrainingConfig, "rl": RLTrainingConfig}
    stated = {kind: float(rate) for rate, kind in re.findall(r"(\d[\d.e+-]*) \((sft|ppm|rl)\)", text)}
    assert stated == {kind: config.learning_rate for kind, config in configs.items()}
    assert all(f"num_train_epochs {config.num_train_epochs:g};" in text
               and f"per_device_train_batch_size {config.per_device_train_batch_size} " in text
               for config in configs.values())


# --- training (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_lowers_the_loss(sft_checkpoint: Path) -> None:
    curve = losses(sft_checkpoint)
    assert curve[-1] < 0.3 * curve[0]


@pytest.mark.slow
def test_packed_padding_free_sft_lowers_the_loss(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    packed = {**FAST_SFT, "packing": True, "packing_strategy": "bfd", "max_length": 256,
              "per_device_train_batch_size": 1, "num_train_epochs": 30}
    curve = losses(train_sft([sft_table], tmp_path / "packed", base_model=str(tiny_model), overrides=packed))
    assert curve[-1] < 0.3 * curve[0]


@pytest.mark.slow
def test_sft_policy_generates_the_step_format(sft_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sft_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    inputs = tokenizer(sft_rows()[3]["prompt"], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:])
    first_step = text[: text.index(END_OF_STEP) + len(END_OF_STEP)]
    assert parse_step(first_step).kind is StepKind.CODE
    assert first_step.startswith("# Step 1:")


@pytest.mark.slow
def test_checkpoint_records_its_data_base_model_and_loss_curves(
    sft_checkpoint: Path, sft_table: Path, tiny_model: Path
) -> None:
    provenance = json.loads((sft_checkpoint / PROVENANCE_FILE).read_text())
    assert provenance["tables"] == [{"path": str(sft_table.resolve()), "rows": 8, "sha256": file_sha256(sft_table)}]
    assert provenance["base_model"]["config_sha256"] == file_sha256(tiny_model / "config.json")
    assert {"torch", "transformers", "trl"} <= provenance["versions"].keys()
    assert list((sft_checkpoint / "logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ppm_ranks_held_out_pairs(ppm_checkpoint: Path) -> None:
    scorer = PPMScorer(ppm_checkpoint, device="cpu")
    held_out = pair_rows(seed=1, count=40)
    chosen = scorer.score([row["prompt"] + row["chosen"] for row in held_out])
    rejected = scorer.score([row["prompt"] + row["rejected"] for row in held_out])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(held_out)
    assert accuracy >= 0.85


@pytest.mark.slow
def test_scores_are_tanh_of_the_checkpoints_raw_logit(ppm_checkpoint: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [row["prompt"] + row["chosen"] for row in pair_rows(seed=2, count=3)]
    texts.append(texts[0][:40])  # a shorter one, so the scorer's batch has padding
    scores = PPMScorer(ppm_checkpoint, device="cpu").score(texts)
    tokenizer = AutoTokenizer.from_pretrained(ppm_checkpoint)
    plain = AutoModelForSequenceClassification.from_pretrained(ppm_checkpoint).eval()
    for text, score in zip(texts, scores, strict=True):
        ids = torch.tensor([encode_texts(tokenizer, [text], max_length=256)[0]])
        with torch.no_grad():
            logit = plain(input_ids=ids).logits[0, 0].item()
        assert -1.0 <= score <= 1.0
        assert score == pytest.approx(math.tanh(logit), abs=1e-5)


@pytest.mark.slow
def test_scores_do_not_depend_on_batch_composition(ppm_checkpoint: Path) -> None:
    texts = [row["prompt"] + row["rejected"] for row in pair_rows(seed=3, count=6)]
    scorer = PPMScorer(ppm_checkpoint, device="cpu", max_batch_tokens=256)
    alone = [scorer.score([text])[0] for text in texts]
    assert scorer.score(texts) == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
def test_cli_score_prints_one_value_per_row(ppm_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"text": row["prompt"] + row["chosen"], "id": index} for index, row in enumerate(pair_rows(seed=4, count=3))]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli_score(["--ppm", str(ppm_checkpoint), "--jsonl", str(tmp_path / "in.jsonl"), "--device", "cpu"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in printed] == [0, 1, 2]
    assert all(-1.0 <= row["ppm_score"] <= 1.0 for row in printed)


@pytest.mark.slow
def test_killed_run_leaves_no_checkpoint_that_looks_complete(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    output = tmp_path / "policy"
    run = start_run(prepare_run("sft", tables=[sft_table], output_dir=output, base_model=str(tiny_model),
                                overrides={**FAST_SFT, "num_train_epochs": 10_000}))
    deadline = time.monotonic() + 120
    while not list(run.staging_dir.glob("logs/events.out.tfevents.*")):  # training has started
        assert run.process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(run.process.pid, signal.SIGKILL)
    run.process.wait()
    assert not output.exists() and not (run.staging_dir / PROVENANCE_FILE).exists()
    with pytest.raises(TrainingRunError, match="SIGKILL"):
        run.wait()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".policy.lock"]


@pytest.mark.slow
def test_a_run_clears_what_a_run_killed_while_publishing_left(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    output = tmp_path / "policy"
    for leftover in (".policy.partial-dead", ".policy.old-dead"):
        (tmp_path / leftover / "policy").mkdir(parents=True)
    run = start_run(prepare_run("sft", tables=[sft_table], output_dir=output, base_model=str(tiny_model),
                                overrides=FAST_SFT))
    run.kill()
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith("-dead")] == []


# --- resuming a run that died ------------------------------------------------------------------

# Saves every 2 steps; long enough that the test's kill lands while it trains.
CHECKPOINTED_SFT = {**FAST_SFT, "max_steps": 60, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1}


def sft_request(output: Path, tiny_model: Path, sft_table: Path, **overrides: object):
    return prepare_run("sft", tables=[sft_table], output_dir=output, base_model=str(tiny_model),
                       overrides={**CHECKPOINTED_SFT, **overrides})


def kill_after_first_checkpoint(output: Path, tiny_model: Path, sft_table: Path) -> Path:
    """Start a checkpointing run, SIGKILL it once it has saved a checkpoint; return its staging directory."""
    run = start_run(sft_request(output, tiny_model, sft_table))
    deadline = time.monotonic() + 120
    while not list(run.staging_dir.glob(f"checkpoint-*/{RESUMABLE_FILE}")):
        assert run.process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(run.process.pid, signal.SIGKILL)
    with pytest.raises(TrainingRunError, match="is kept in .* resumes from it"):
        run.wait()
    return run.staging_dir


@pytest.mark.parametrize("key", sorted(RUN_ONLY_KEYS))
def test_settings_that_only_watch_a_run_do_not_stop_it_resuming(tmp_path: Path, tiny_model: Path, sft_table: Path,
                                                                  key: str) -> None:
    value = {"report_to": "none", "save_strategy": "epoch"}.get(key, 7)
    first = sft_request(tmp_path / "policy", tiny_model, sft_table)
    assert sft_request(tmp_path / "policy", tiny_model, sft_table, **{key: value}).resume_identity() \
        == first.resume_identity()


def test_a_training_setting_stops_a_run_resuming(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    first = sft_request(tmp_path / "policy", tiny_model, sft_table)
    changed = sft_request(tmp_path / "policy", tiny_model, sft_table, learning_rate=1e-4)
    assert changed.resume_identity() != first.resume_identity()


def test_whether_to_overwrite_an_output_does_not_stop_a_run_resuming(tmp_path: Path, tiny_model: Path,
                                                                    sft_table: Path) -> None:
    first = sft_request(tmp_path / "policy", tiny_model, sft_table)
    again = prepare_run("sft", tables=[sft_table], output_dir=tmp_path / "policy", base_model=str(tiny_model),
                        overrides=CHECKPOINTED_SFT, overwrite=True)
    assert again.resume_identity() == first.resume_identity()


def save_checkpoint_as_the_trainer_does(staging: Path, step: int, save_only_model: bool = False) -> Path:
    from types import SimpleNamespace

    checkpoint = staging / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    ResumableCheckpoints().on_save(SimpleNamespace(output_dir=str(staging), save_only_model=save_only_model),
                                   SimpleNamespace(global_step=step, is_world_process_zero=True,
                                                   is_local_process_zero=True), None)
    return checkpoint


def test_a_saved_checkpoint_is_resumable(tmp_path: Path) -> None:
    checkpoint = save_checkpoint_as_the_trainer_does(tmp_path, 4)
    assert complete_checkpoints(tmp_path) == [checkpoint]


def test_a_checkpoint_cut_off_before_its_save_ended_is_not_resumable(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")  # the Trainer's own last file
    assert complete_checkpoints(tmp_path) == []


def test_a_checkpoint_without_optimizer_state_is_not_resumable(tmp_path: Path) -> None:
    save_checkpoint_as_the_trainer_does(tmp_path, 4, save_only_model=True)
    assert complete_checkpoints(tmp_path) == []


def test_an_output_another_process_still_trains_is_refused(tmp_path: Path) -> None:
    from models.training import RUNNER_FILE, _wait_for_runners

    (tmp_path / RUNNER_FILE).write_text(process_identity(os.getpid()))
    with pytest.raises(TrainingRunError, match=rf"another training process \(pid {os.getpid()}\) is still writing"):
        _wait_for_runners([tmp_path], timeout_s=0.2)


@pytest.mark.slow
def test_a_checkpoint_that_fails_to_resume_is_dropped_after_one_attempt(tmp_path: Path, tiny_model: Path,
                                                                        sft_table: Path) -> None:
    output = tmp_path / "policy"
    staging = kill_after_first_checkpoint(output, tiny_model, sft_table)
    for optimizer in staging.glob("checkpoint-*/optimizer.pt"):
        optimizer.write_bytes(optimizer.read_bytes()[:100])  # damaged after its save was marked whole
    with pytest.raises(TrainingRunError, match="failed while resuming from its checkpoint at step [0-9]+, so its "
                       "checkpoints were deleted and the next run starts afresh"):
        start_run(sft_request(output, tiny_model, sft_table)).wait()
    assert not staging.exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    output = tmp_path / "policy"
    kill_after_first_checkpoint(output, tiny_model, sft_table)
    run = start_run(sft_request(output, tiny_model, sft_table, timeout_s=600))
    run.wait()
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["resumed_from_step"] >= 2 and provenance["metrics"]["global_step"] == 60


@pytest.mark.slow
def test_a_resumed_run_measures_its_own_throughput(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    output = tmp_path / "policy"
    kill_after_first_checkpoint(output, tiny_model, sft_table)
    start_run(sft_request(output, tiny_model, sft_table)).wait()
    assert json.loads((output / PROVENANCE_FILE).read_text())["metrics"]["tokens_per_second"] > 0


@pytest.mark.slow
def test_a_resumed_run_publishes_no_intermediate_checkpoints(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    output = tmp_path / "policy"
    kill_after_first_checkpoint(output, tiny_model, sft_table)
    start_run(sft_request(output, tiny_model, sft_table)).wait()
    assert not list(output.glob("checkpoint-*"))
    assert sorted(path.name for path in tmp_path.iterdir()) == [".policy.lock", "policy"]


@pytest.mark.slow
def test_a_changed_run_starts_afresh_and_deletes_the_old_attempt(tmp_path: Path, tiny_model: Path,
                                                                 sft_table: Path) -> None:
    output = tmp_path / "policy"
    old_staging = kill_after_first_checkpoint(output, tiny_model, sft_table)
    start_run(sft_request(output, tiny_model, sft_table, learning_rate=1e-3)).wait()
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["resumed_from_step"] is None and not old_staging.exists()


# --- the launcher's side of resuming, with a stand-in for the training process ----------------

# Ends as argv[2] says, without loading anything: what the launcher does about each ending is what is tested.
STAND_IN_CHILD = """
import os, signal, sys, time
from pathlib import Path
staging, ending, resumed_file = Path(sys.argv[1]).parent, sys.argv[2], sys.argv[3]
if ending == "finishes":
    (staging / "model.safetensors").write_bytes(b"weights")
    (staging / "provenance.json").write_text("{}")
elif ending == "fails after its first step":
    (staging / resumed_file).write_text("5")
    sys.exit(1)
elif ending == "fails while resuming":
    sys.exit(1)
elif ending == "finds bad input":
    (staging / "failure.txt").write_text("cannot load model 'm': no weights")
    sys.exit(2)
elif ending == "is killed by a signal":  # the OOM killer
    os.kill(os.getpid(), signal.SIGKILL)
else:
    time.sleep(120)
"""


@pytest.fixture
def stand_in_child(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    def use(ending: str) -> None:
        monkeypatch.setattr("models.training._launch_command", lambda request, request_path: [
            sys.executable, "-c", STAND_IN_CHILD, str(request_path), ending, RESUMED_FILE])
    return use


def earlier_attempt(request: RunRequest, finished: bool = False) -> Path:
    """The staging directory an attempt at `request` left when its launcher was killed: a checkpoint at
    step 4 and, when `finished`, the final model."""
    output = Path(request.output_dir)
    staging = output.parent / f".{output.name}.partial-earlier"
    staging.mkdir(parents=True)
    (staging / "request.json").write_text(request.to_json())
    save_checkpoint_as_the_trainer_does(staging, 4)
    if finished:
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / PROVENANCE_FILE).write_text("{}")
    return staging


def stop(run: TrainingRun) -> None:
    run.kill()
    with pytest.raises(TrainingRunError):
        run.wait()


class Interrupted(BaseException):
    """Ctrl-C, a SIGTERM turned into an exception, or a cancelled flow run, in the launcher's process."""


@contextmanager
def interrupted_after(seconds: float) -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("ending", ["times out", "is interrupted", "is killed by a signal", "finds bad input",
                                    "fails after its first step"])
def test_a_resumed_run_that_ends_early_keeps_its_checkpoint(tmp_path: Path, tiny_model: Path, sft_table: Path,
                                                           stand_in_child: Callable[[str], None], ending: str) -> None:
    request = sft_request(tmp_path / "policy", tiny_model, sft_table)
    staging = earlier_attempt(request)
    stand_in_child(ending)
    run = start_run(request)
    assert run.resumed_from == staging / "checkpoint-4"
    error = {"is interrupted": Interrupted, "finds bad input": TrainingInputError}.get(ending, TrainingRunError)
    with pytest.raises(error) as raised, interrupted_after(0.5) if ending == "is interrupted" else nullcontext():
        run.wait(timeout_s=0.5 if ending == "times out" else None)
    assert complete_checkpoints(staging) == [staging / "checkpoint-4"]
    if error is not Interrupted:
        assert "its checkpoint at step 4 is kept in" in str(raised.value)


def test_a_resumed_run_that_fails_before_its_first_step_drops_its_checkpoint(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None]
) -> None:
    request = sft_request(tmp_path / "policy", tiny_model, sft_table)
    staging = earlier_attempt(request)
    stand_in_child("fails while resuming")
    with pytest.raises(TrainingRunError, match="it failed while resuming from its checkpoint at step 4, so its "
                       "checkpoints were deleted and the next run starts afresh"):
        start_run(request).wait()
    assert not staging.exists()


LOCK_TAKER = """
import sys
from pathlib import Path
from data_store.home import RunBusyError, hold_lock
try:
    with hold_lock(Path(sys.argv[1]), "a test", "test"):
        print("free")
except RunBusyError:
    print("busy")
"""


def lock_is_free(lock: Path) -> bool:
    """Whether another process could take the lock (this one may take the locks it holds again)."""
    taker = subprocess.run([sys.executable, "-c", LOCK_TAKER, str(lock)], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return taker.stdout.strip() == "free"


def test_an_output_another_process_trains_is_refused_in_one_line(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None],
    capsys: pytest.CaptureFixture, hold_lock_elsewhere: Callable[..., subprocess.Popen]
) -> None:
    staging = earlier_attempt(sft_request(tmp_path / "policy", tiny_model, sft_table))
    stand_in_child("runs until stopped")
    holder = hold_lock_elsewhere(tmp_path / ".policy.lock", "another sft training")
    settings = [argument for key, value in CHECKPOINTED_SFT.items() for argument in ("--set", f"{key}={value}")]
    code = cli_train(["sft", "--tables", str(sft_table), "--out", str(tmp_path / "policy"), "--base-model",
                      str(tiny_model), *settings])
    error = capsys.readouterr().err
    assert code == 1 and error.count("\n") == 1
    assert error.startswith(f"kaizen train: error: training output {tmp_path / 'policy'} is in use by another sft "
                            f"training (pid {holder.pid} ")
    assert complete_checkpoints(staging) == [staging / "checkpoint-4"]  # the holder's to resume, not deleted


@pytest.mark.parametrize("ending", ["finishes", "times out", "cannot start"])
def test_a_run_holds_its_output_until_it_ends_however_it_ends(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch, ending: str
) -> None:
    request = sft_request(tmp_path / "policy", tiny_model, sft_table)
    lock = tmp_path / ".policy.lock"
    if ending == "cannot start":
        monkeypatch.setattr("models.training._launch_command", lambda *_: [str(tmp_path / "no-such-python")])
        with pytest.raises(FileNotFoundError):
            start_run(request)
    else:
        stand_in_child(ending)
        run = start_run(request)
        assert not lock_is_free(lock)
        with pytest.raises(TrainingRunError, match="timed out") if ending == "times out" else nullcontext():
            run.wait(timeout_s=0.5 if ending == "times out" else None)
    assert lock_is_free(lock)


class LauncherDied(BaseException):
    """The launcher's process ending where it stands, as a `kill -9` would end it."""


def test_a_checkpoint_half_deleted_while_publishing_is_not_resumable(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    request = sft_request(tmp_path / "policy", tiny_model, sft_table)
    staging = earlier_attempt(request)
    stand_in_child("finishes")
    run = start_run(request)

    def dies_half_way(path: Path, *args: object, **kwargs: object) -> None:
        for file in sorted(Path(path).iterdir()):
            if file.name != RESUMABLE_FILE:  # ext4 lists (and so deletes) the big files before the marker
                file.unlink()
        raise LauncherDied

    with monkeypatch.context() as patch, pytest.raises(LauncherDied):
        patch.setattr(shutil, "rmtree", dies_half_way)
        run.wait()
    assert complete_checkpoints(staging) == []


def test_a_model_finished_by_a_run_killed_while_publishing_is_published_as_it_is(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None]
) -> None:
    request = sft_request(tmp_path / "policy", tiny_model, sft_table)
    earlier_attempt(request, finished=True)
    stand_in_child("runs until stopped")
    run = start_run(request)
    try:
        assert run.process is None  # nothing trained again
    finally:
        run.kill()
    output = run.wait()
    assert (output / "model.safetensors").read_bytes() == b"weights" and not list(output.glob("checkpoint-*"))
    assert sorted(path.name for path in output.iterdir()) == ["model.safetensors", PROVENANCE_FILE]


def test_a_published_model_stays_published_when_the_machine_is_lost(
    tmp_path: Path, tiny_model: Path, sft_table: Path, stand_in_child: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.training

    synced: list[Path] = []
    real_fsync = models.training.fsync_path
    monkeypatch.setattr(models.training, "fsync_path", lambda path: (synced.append(Path(path)), real_fsync(path)))
    stand_in_child("finishes")
    start_run(sft_request(tmp_path / "policy", tiny_model, sft_table)).wait()
    assert synced[-1] == tmp_path  # the directory holding the renamed output, after the rename


def test_a_home_moved_elsewhere_keeps_its_checkpoints(tmp_path: Path, tiny_model: Path, sft_table: Path,
                                                      stand_in_child: Callable[[str], None]) -> None:
    import shutil

    def request_in(home: Path) -> RunRequest:
        return prepare_run("sft", tables=[home / "sft.parquet"], output_dir=home / "policy",
                           base_model=str(home / "model"), overrides=CHECKPOINTED_SFT)

    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "model")
    (home / "model" / PROVENANCE_FILE).write_text('{"kind": "sft"}')  # a model Kaizen trained: the start of a PPM
    shutil.copy(sft_table, home / "sft.parquet")
    earlier_attempt(request_in(home))
    moved = home.rename(tmp_path / "mounted-elsewhere")
    stand_in_child("runs until stopped")
    run = start_run(request_in(moved))
    try:
        assert run.resumed_from == moved / ".policy.partial-earlier" / "checkpoint-4"
    finally:
        stop(run)


def test_two_local_base_models_with_one_config_are_told_apart(tmp_path: Path, tiny_model: Path,
                                                               sft_table: Path) -> None:
    """A downloaded model has no provenance: its config.json alone cannot tell two fine-tunes apart."""
    import shutil

    for name in ("a", "b"):
        shutil.copytree(tiny_model, tmp_path / name)
    identities = {sft_request(tmp_path / "policy", tmp_path / name, sft_table).resume_identity() for name in "ab"}
    assert len(identities) == 2


def test_a_table_rewritten_in_place_stops_a_run_resuming(tmp_path: Path, tiny_model: Path) -> None:
    table = write_table(tmp_path / "sft.parquet", sft_rows())
    first = sft_request(tmp_path / "policy", tiny_model, table)
    write_table(table, sft_rows(count=6))
    assert sft_request(tmp_path / "policy", tiny_model, table).resume_identity() != first.resume_identity()


# Two processes save their parts of one checkpoint, the second last; the first says whether the second's
# part was on disk once the checkpoint was marked resumable.
TWO_PROCESS_SAVE = """
import os, sys, time
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from models.training import ResumableCheckpoints, complete_checkpoints
staging, rank = Path(sys.argv[1]), int(os.environ["RANK"])
dist.init_process_group("gloo")
checkpoint = staging / "checkpoint-4"
checkpoint.mkdir(parents=True, exist_ok=True)
if rank == 1:
    time.sleep(2)
(checkpoint / f"rng_state_{rank}.pth").write_bytes(b"state")
ResumableCheckpoints().on_save(SimpleNamespace(output_dir=str(staging), save_only_model=False), SimpleNamespace(
    global_step=4, is_world_process_zero=rank == 0, is_local_process_zero=rank == 0), None)
if rank == 0:
    print(complete_checkpoints(staging) == [checkpoint] and (checkpoint / "rng_state_1.pth").exists(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_checkpoint_is_resumable_only_once_every_process_has_saved_its_part(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "WORLD_SIZE": "2"}
    processes = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SAVE, str(tmp_path)], stdout=subprocess.PIPE,
                                  text=True, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in (0, 1)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert outputs[0].strip() == "True"


@pytest.mark.slow
def test_a_finished_model_is_on_disk_before_its_provenance_says_so(tmp_path: Path, tiny_model: Path, sft_table: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher killed after the training process finished leaves the model to be published by the next run."""
    import models.training

    staging = tmp_path / "staging"
    staging.mkdir()
    synced_before_provenance: set[Path] = set()
    real_fsync = models.training.fsync_path

    def recording_fsync(path: Path) -> None:
        if not (staging / PROVENANCE_FILE).exists():
            synced_before_provenance.add(Path(path))
        real_fsync(path)

    monkeypatch.setattr(models.training, "fsync_path", recording_fsync)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")  # set by the training process; put back after the test
    request = prepare_run("sft", tables=[sft_table], output_dir=tmp_path / "policy", base_model=str(tiny_model),
                          overrides={**FAST_SFT, "max_steps": 2, "report_to": "none", "dataloader_pin_memory": False})
    models.training.run_training(request, staging)
    model_files = {path for path in staging.iterdir() if path.is_file() and path.name != PROVENANCE_FILE}
    assert {staging / "model.safetensors", staging / "config.json"} <= model_files <= synced_before_provenance


# Starts a run as a flow run's worker does and prints the training process's pid once it trains.
ORPHANING_LAUNCHER = """
import sys, time
from pathlib import Path
from models.training import prepare_run, start_run
table, model, output = sys.argv[1:4]
run = start_run(prepare_run("sft", tables=[table], output_dir=output, base_model=model,
                            overrides={"num_train_epochs": 10_000, "logging_steps": 5}))
while not list(run.staging_dir.glob("logs/events.out.tfevents.*")):
    time.sleep(0.2)
print(run.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_run_stops_when_the_process_that_started_it_is_killed_outright(
    tmp_path: Path, tiny_model: Path, sft_table: Path
) -> None:
    import subprocess
    import sys

    launcher = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_LAUNCHER, str(sft_table), str(tiny_model), str(tmp_path / "policy")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(RECIPES.parents[1])},
    )
    training_pid = int(launcher.stdout.readline())
    training = process_identity(training_pid)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while process_is_running(training) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        assert not process_is_running(training)
    finally:
        if process_is_running(training):  # not left training for hours after a failure
            os.killpg(training_pid, signal.SIGKILL)


@pytest.mark.slow
def test_lora_training_saves_a_plain_merged_model(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = train_sft([sft_table], tmp_path / "lora", base_model=str(tiny_model),
                    overrides={**FAST_SFT, "max_steps": 3, "lora_r": 4})
    assert not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(out)


# --- saved precision ---------------------------------------------------------------------------


def test_saved_weights_follow_the_mixed_precision_dtype(tmp_path: Path) -> None:
    assert SFTTrainingConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True).save_dtype == "bfloat16"
    assert SFTTrainingConfig(output_dir=str(tmp_path)).save_dtype == "float32"  # CPU: no mixed precision


def test_an_unknown_save_dtype_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_dtype must be one of float32, bfloat16, float16"):
        SFTTrainingConfig(output_dir=str(tmp_path), save_dtype="int8")


@pytest.mark.parametrize("shard_size", [None, "200KB"], ids=["one_file", "sharded"])
def test_a_cast_checkpoint_loads_with_the_rounded_weights(tmp_path: Path, tiny_model: Path, shard_size: str | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    original.save_pretrained(tmp_path, **({"max_shard_size": shard_size} if shard_size else {}))
    cast_saved_weights(tmp_path, "bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in original.state_dict().items()}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


@pytest.mark.slow
def test_training_saves_in_the_asked_dtype(tmp_path: Path, tiny_model: Path, sft_table: Path) -> None:
    from safetensors import safe_open

    out = train_sft([sft_table], tmp_path / "bf16", base_model=str(tiny_model),
                    overrides={**FAST_SFT, "max_steps": 2, "save_dtype": "bfloat16"})
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {str(weights.get_slice(name).get_dtype()) for name in weights.keys()} == {"BF16"}
