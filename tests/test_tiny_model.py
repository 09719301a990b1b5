"""The tiny-model builder: tokenizer with the step markers, a loadable model, atomic saves, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.tiny import (
    ModelLoadError,
    TinyModelConfig,
    add_step_tokens,
    build_tiny_model,
    check_policy_source,
    cli_tiny_model,
    default_corpus,
    load_causal_lm,
    parameter_count,
)
from search.steps import STEP_SPECIAL_TOKENS, SolutionStep, render_trajectory


def synthetic_corpus(seed: int = 0) -> list[str]:
    """The built-in corpus without the shared problems: fast, and the same on every machine."""
    return list(default_corpus(seed=seed, include_shared=False))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=synthetic_corpus())


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_causal_lm(tiny_dir)


def test_built_model_loads_with_a_matching_vocabulary(tiny) -> None:
    model, tokenizer = tiny
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)


def test_default_size_is_a_few_million_parameters(tiny) -> None:
    model, _ = tiny
    assert 500_000 < parameter_count(model) < 5_000_000


@pytest.mark.parametrize("marker", STEP_SPECIAL_TOKENS)
def test_each_step_marker_is_one_token_even_inside_text(tiny, marker: str) -> None:
    _, tokenizer = tiny
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [marker_id]
    assert marker_id in tokenizer(f"x = 1{marker}# Step 2", add_special_tokens=False)["input_ids"]


def test_step_format_text_round_trips_through_the_tokenizer(tiny) -> None:
    _, tokenizer = tiny
    text = render_trajectory(
        "What is 12 * 40?",
        [SolutionStep("# Step 1: multiply\ntotal = 12 * 40\n<end_of_code>", output="480"),
         SolutionStep("<answer>\\boxed{480}<end_of_answer>")],
    )  # fmt: skip
    # Decoders drop special tokens; the step markers must survive that.
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_bos_eos_pad_are_distinct_and_padding_is_left(tiny) -> None:
    _, tokenizer = tiny
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    assert tokenizer.padding_side == "left"


def test_chat_template_is_plain_concatenation(tiny) -> None:
    _, tokenizer = tiny
    messages = [{"role": "user", "content": "question "}, {"role": "assistant", "content": "answer"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "question answer"


def test_digits_are_split_one_by_one(tiny) -> None:
    _, tokenizer = tiny
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_qwen2_architecture_builds(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "qwen", corpus=synthetic_corpus(), architecture="qwen2", num_layers=1)
    model, _ = load_causal_lm(out)
    assert model.config.model_type == "qwen2"


def test_heads_narrower_than_32_are_rejected() -> None:
    with pytest.raises(ValueError, match="head size 16"):
        TinyModelConfig(hidden_size=64, num_heads=4)


def test_a_shape_of_zero_is_named() -> None:
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        TinyModelConfig(num_heads=0)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", corpus=synthetic_corpus(), num_layers=1)
    second = build_tiny_model(tmp_path / "b", corpus=synthetic_corpus(), num_layers=1)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_different_seed_gives_different_weights(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", corpus=synthetic_corpus(), num_layers=1, seed=0)
    second = build_tiny_model(tmp_path / "b", corpus=synthetic_corpus(), num_layers=1, seed=1)
    assert (first / "model.safetensors").read_bytes() != (second / "model.safetensors").read_bytes()


def test_existing_directory_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model(out, corpus=synthetic_corpus(), num_layers=1)
    assert (out / "keep.txt").exists()
    build_tiny_model(out, corpus=synthetic_corpus(), num_layers=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_build_leaves_no_temporary_directories(tmp_path: Path) -> None:
    build_tiny_model(tmp_path / "model", corpus=synthetic_corpus(), num_layers=1, overwrite=True)
    build_tiny_model(tmp_path / "model", corpus=synthetic_corpus(), num_layers=1, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_default_corpus_adds_shared_training_problems_but_not_test_sets(tmp_path: Path) -> None:
    (tmp_path / "mini_train.jsonl").write_text(json.dumps({"id": "t1", "problem": "TRAINPROBLEM", "answer": "1"}) + "\n")
    (tmp_path / "mini_test.jsonl").write_text(json.dumps({"id": "t2", "problem": "TESTPROBLEM", "answer": "2"}) + "\n")
    corpus = list(default_corpus(synthetic_examples=3, data_dir=tmp_path))
    assert "TRAINPROBLEM" in corpus
    assert "TESTPROBLEM" not in corpus


def test_add_step_tokens_adds_markers_and_grows_embeddings(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "bare", corpus=["plain text only"] * 10, step_tokens=(), num_layers=1)
    model, tokenizer = load_causal_lm(out)
    rows_before = model.get_input_embeddings().num_embeddings
    added = add_step_tokens(tokenizer, model)
    assert added == len(STEP_SPECIAL_TOKENS)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == rows_before + added
    assert all(len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1 for marker in STEP_SPECIAL_TOKENS)


def test_add_step_tokens_is_idempotent(tiny_dir: Path) -> None:
    model, tokenizer = load_causal_lm(tiny_dir)
    rows = model.get_input_embeddings().num_embeddings
    assert add_step_tokens(tokenizer, model) == 0
    assert model.get_input_embeddings().num_embeddings == rows


def test_add_step_tokens_never_shrinks_spare_embedding_rows(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "bare", corpus=["plain text only"] * 10, step_tokens=(), num_layers=1)
    model, tokenizer = load_causal_lm(out)
    spare_rows = len(tokenizer) + 64  # like Qwen2.5, whose matrix is larger than its vocabulary
    model.resize_token_embeddings(spare_rows)
    add_step_tokens(tokenizer, model)
    assert model.get_input_embeddings().num_embeddings == spare_rows


def test_loading_a_missing_directory_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory") as error:
        load_causal_lm(tmp_path / "missing")
    assert "\n" not in str(error.value)


def test_loading_a_broken_directory_raises_one_line_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as error:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_a_bare_name_with_nothing_there_is_a_missing_directory_not_a_hub_lookup(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="'nomodel': no such directory"):
        check_policy_source("nomodel")


def test_an_org_slash_model_name_is_left_to_the_hub() -> None:
    check_policy_source("Qwen/Qwen2.5-Math-7B")


def test_a_directory_without_config_json_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_policy_source(tmp_path)


def test_a_ppm_checkpoint_is_not_accepted_as_the_policy(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "ppm_scoring.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a PPM checkpoint"):
        check_policy_source(tmp_path)


def test_cli_builds_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KAIZEN_SHARED_DATA", str(tmp_path / "no-data"))
    assert cli_tiny_model(["--out", str(tmp_path / "m"), "--num-layers", "1", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_hidden_layers"] == 1
    assert "wrote" in capsys.readouterr().out


def test_cli_rejects_a_bad_shape_with_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_tiny_model(["--out", str(tmp_path / "m"), "--hidden-size", "64", "--num-heads", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kaizen tiny-model: error: head size 16") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
