"""The flow commands' bad input: one error line naming the command and a non-zero exit, before any flow
starts where it can be found then, and without Prefect's tracebacks where a stage finds it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.cli import COMMANDS, main
from flows.demo import SUMMARY_COLUMNS, summary_table
from models.tiny import ModelLoadError
from models.training import TrainingInputError, TrainingRunError
from data_store.problems import ProblemsError
from models.vllm_server import VLLMServerError, VLLMSetupError
from search.sandbox import SandboxSetupError, SandboxUnavailable
from tasks.stages import worth_retrying

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """The exit status of a command line (a usage error's too) and its stderr lines."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_round_without_its_predecessor_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["round", "--recipe", "demo", "--round", "3", "--home", str(tmp_path)], capsys)
    assert code == 1 and err == [
        "kaizen round: error: round 3 of run 'demo' starts from round 2, which is not promoted "
        "(no round is promoted yet); run round 0 first"
    ]


def test_a_negative_round_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["round", "--recipe", "demo", "--round", "-1", "--home", str(tmp_path)], capsys)
    assert code == 1 and err == ["kaizen round: error: round must be >= 0, got -1"]


def test_a_stage_the_round_does_not_have_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["stage", "bootstrap", "--recipe", "demo", "--round", "1", "--home", str(tmp_path)], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("kaizen stage: error: round 1 has no stage 'bootstrap'")


@pytest.mark.parametrize("argv", [["round", "--round", "0"], ["run", "--rounds", "0:0"], ["demo", "--rounds", "0"],
                                  ["stage", "bootstrap", "--round", "0"]], ids=lambda argv: argv[0])
def test_a_run_another_process_has_is_refused_in_one_line(argv: list[str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture, hold_run_elsewhere) -> None:
    holder = hold_run_elsewhere(tmp_path, "demo")
    recipe = [] if argv[0] == "demo" else ["--recipe", "demo"]
    code, err = run([*argv, *recipe, "--home", str(tmp_path)], capsys)
    assert code == 1 and len(err) == 1 and f"in use by a test holder (pid {holder.pid} " in err[0]


@pytest.mark.parametrize("flow_name, arguments", [("round_flow", {"round_number": 0}), ("evolve_flow", {"end": 0}),
                                                   ("stage_flow", {"stage": "bootstrap", "round_number": 0})])
def test_a_deployed_flow_refuses_a_run_another_process_has(flow_name: str, arguments: dict, tmp_path: Path,
                                                           hold_run_elsewhere) -> None:
    """Deployments start the flows directly, without the CLI's check."""
    import flows.evolve
    from data_store.home import RunBusyError

    hold_run_elsewhere(tmp_path, "demo")
    with pytest.raises(RunBusyError, match="in use by a test holder"):
        getattr(flows.evolve, flow_name).fn("demo", home=str(tmp_path), **arguments)



def test_the_round_flow_runs_nothing_past_its_last_round(tmp_path: Path) -> None:
    import flows.evolve
    from models.pipeline import Artifact, RoundRecord

    pipeline = flows.evolve.open_pipeline("demo", str(tmp_path))
    for number in (0, 1):
        pipeline.promote(RoundRecord(number, Artifact.of(tmp_path), None, {}, {}, True, []))
    assert flows.evolve.round_flow.fn("demo", home=str(tmp_path), last_round=1) is None
    assert not pipeline.layout.round_dir("demo", 2).exists()

def test_an_empty_round_range_is_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--recipe", "demo", "--rounds", "5:3", "--home", str(tmp_path)])
    assert exit_info.value.code == 2 and "needs 0 <= START <= END" in capsys.readouterr().err


def test_a_single_round_number_runs_up_to_it_from_the_next_round() -> None:
    from flows.commands import _parse_rounds

    assert _parse_rounds("3") == _parse_rounds(":3") == (None, 3)


def test_a_home_that_cannot_be_created_is_refused_before_any_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    code, err = run(["run", "--recipe", "demo", "--rounds", "0:0", "--home", str(tmp_path / "file" / "home")], capsys)
    assert code == 1 and err == [f"kaizen run: error: data home {tmp_path / 'file' / 'home'} cannot be created: "
                                 f"{tmp_path / 'file'} is a file"]


@pytest.mark.parametrize(("argv", "message"), [
    (["rollout", "--run", "../x"], "run name '../x' must be"),
    (["rollout", "--round", "-1"], "--round must be >= 0, got -1"),
    (["train", "sft", "--tables", "t.parquet"], "cannot be created"),
    (["tiny-model", "--initializer-range", "-1"], "initializer_range must be in [0, 1], got -1.0"),
    (["score", "--max-batch-tokens", "0"], "max_batch_tokens must be >= 1, got 0"),
    (["eval", "--run", "a b/../c"], "run name 'a b/../c' must be"),
    (["eval", "--round", "-5"], "--round must be >= 0, got -5"),
], ids=["rollout-run-name", "rollout-round", "train-out", "tiny-init-range", "score-batch-tokens", "eval-run-name",
        "eval-round"])
def test_bad_command_options_are_refused_in_one_line(argv: list[str], message: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    required = {"rollout": ["--model", "m", "--problems", "p", "--out", str(tmp_path / "out")],
                "train": ["--out", str(tmp_path / "file" / "ckpt")], "tiny-model": ["--out", str(tmp_path / "tiny")],
                "score": ["--ppm", str(tmp_path), "--jsonl", str(tmp_path / "file")],
                "eval": ["--model", "m", "--benchmark", "aime24", "--out", str(tmp_path / "out")]}
    try:
        code = main([*argv, *required[argv[0]]])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_set_value_that_is_not_yaml_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--recipe", "demo", "--home", str(tmp_path), "--set", "search.shards=[1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--set search.shards: '[1' is not a YAML value" in err[0]


@pytest.mark.parametrize("value", [None, True, "text", "null", "a: b", 0.1, 1e-05, float("inf"), [1e-07, 2],
                                   {"a": 1}, {1: "a"}])
def test_the_suggested_command_sets_the_values_it_was_given(value: object) -> None:
    from flows.commands import _override, _override_text

    assert _override(_override_text("key", value)) == ("key", value)


def test_an_unknown_evaluation_mode_is_refused_before_the_flow(capsys: pytest.CaptureFixture) -> None:
    code, err = run(["evaluate", "--model", "tiny", "--benchmark", "aime24", "--mode", "bogus"], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("kaizen evaluate: error: unknown mode 'bogus'")


def test_an_out_of_range_generation_setting_is_refused_before_the_flow(capsys: pytest.CaptureFixture) -> None:
    code, err = run(["evaluate", "--model", "tiny", "--benchmark", "aime24", "--max-step-tokens", "0"], capsys)
    assert code == 2 and len(err) == 1 and "max_step_tokens must be >= 1, got 0" in err[0]


def test_evaluate_refuses_a_limit_below_one_before_the_flow(capsys: pytest.CaptureFixture) -> None:
    code, err = run(["evaluate", "--model", "tiny", "--benchmark", "aime24", "--limit", "0"], capsys)
    assert code == 2 and len(err) == 1 and "limit must be >= 1" in err[0]


def test_evaluate_refuses_a_missing_policy_before_the_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["evaluate", "--model", str(tmp_path / "none"), "--benchmark", "aime24"], capsys)
    assert code == 1 and err == [
        f"kaizen evaluate: error: cannot load model '{tmp_path / 'none'}': no such directory (and not an org/model hub name)"
    ]


def test_evaluate_refuses_a_missing_ppm_before_the_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, err = run(["evaluate", "--model", str(tmp_path), "--ppm", str(tmp_path / "none"), "--mode", "ppm@2",
                     "--benchmark", "aime24"], capsys)
    assert code == 1 and err == [
        f"kaizen evaluate: error: cannot load PPM '{tmp_path / 'none'}': no such directory (and not an org/model hub name)"
    ]


def test_evaluate_hands_its_generation_options_to_the_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.evolve

    received: dict = {}

    def flow(*args: object, **kwargs: object) -> None:
        received.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(flows.evolve, "evaluate_flow", flow)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tmp_path), "--benchmark", "aime24", "--temperature", "0.4",
              "--max-step-tokens", "99"])
    assert (received["temperature"], received["max_step_tokens"]) == (0.4, 99)


def test_the_evaluate_flow_takes_the_generation_settings_it_is_given() -> None:
    from flows.evolve import _evaluation_inputs

    config, _ = _evaluation_inputs(["aime24"], ["maj@4"], 1, "hf", 0, "rstar", {"temperature": 0.3, "max_depth": None})
    assert (config.temperature, config.max_depth) == (0.3, 16)  # None: EvalConfig's default


def test_a_home_that_is_a_file_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "afile"
    home.write_text("")
    code, err = run(["run", "--recipe", "demo", "--home", str(home)], capsys)
    assert code == 1 and err == [f"kaizen run: error: data home {home} exists and is not a directory"]


@pytest.mark.parametrize("error", [ValueError("bad recipe value"), ModelLoadError("no model at ./nomodel"),
                                   TrainingInputError("no rows"), FileNotFoundError("nodes.parquet"),
                                   SandboxSetupError("bubblewrap (bwrap) not found on PATH"),
                                   VLLMSetupError("no vLLM environment at /x/python")])
def test_bad_input_and_a_machine_set_up_wrong_are_not_retried(error: Exception) -> None:
    assert not worth_retrying(None, None, Failed(data=error))


@pytest.mark.parametrize("error", [TrainingRunError("the trainer was killed"), RuntimeError("CUDA error"),
                                   ConnectionError("vLLM server went away"),
                                   VLLMServerError("the vLLM server did not come up"),
                                   SandboxUnavailable("sandbox worker failed to start: timed out")])
def test_failures_that_may_pass_next_time_are_retried(error: Exception) -> None:
    assert worth_retrying(None, None, Failed(data=error))


def test_the_demo_table_of_no_rounds_is_its_header() -> None:
    assert summary_table([]).split() == [title for title, _, _ in SUMMARY_COLUMNS]


def test_a_subcommand_usage_error_is_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rollout", "--model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("kaizen rollout: error: ")


def test_rollout_refuses_a_limit_below_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "--model", "m", "--problems", "p.jsonl", "--out", str(tmp_path / "o"), "--limit", "0"])
    assert capsys.readouterr().err.strip() == "kaizen rollout: error: --limit must be >= 1, got 0"


def test_rollout_refuses_a_problems_file_without_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run(["rollout", "--model", "m", "--problems", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and err == [f"kaizen rollout: error: {empty} has no problems"]
    assert not (tmp_path / "o" / "nodes.parquet").exists()


def _failure_record(error: Exception, message: str | None = None) -> logging.LogRecord:
    try:
        raise error
    except Exception:
        return logging.getLogger("prefect.task_runs").makeRecord(
            "prefect.task_runs", logging.ERROR, __file__, 0,
            f"Task run failed with exception: {error!r}" if message is None else message, (), sys.exc_info()
        )


@pytest.mark.parametrize("error", [ProblemsError("problems.jsonl line 1: problem p has no answer"),
                                   FileNotFoundError(2, "No such file or directory", "nodes.parquet"),
                                   FileNotFoundError("ppm is not a Kaizen PPM checkpoint (no scoring.json)")])
def test_prefects_record_of_bad_input_carries_no_traceback(error: Exception) -> None:
    record = _failure_record(error)
    logging.getLogger("prefect.task_runs").filter(record)
    assert record.exc_info is None


def test_a_record_that_does_not_say_what_went_wrong_keeps_its_traceback() -> None:
    record = _failure_record(PermissionError("base/model.safetensors"), "Error encountered when computing cache key")
    logging.getLogger("prefect.task_runs").filter(record)
    assert record.exc_info is not None


def test_kaizen_debug_keeps_the_traceback_of_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIZEN_DEBUG", "1")
    record = _failure_record(ProblemsError("problems.jsonl line 1: problem p has no answer"))
    logging.getLogger("prefect.task_runs").filter(record)
    assert record.exc_info is not None


@pytest.mark.parametrize("error", [KeyError("step"), ValueError("math domain error"),
                                   PermissionError(13, "Permission denied"), ProblemsError("")])
def test_prefects_record_of_what_may_be_a_bug_keeps_its_traceback(error: Exception) -> None:
    record = _failure_record(error)
    logging.getLogger("prefect.task_runs").filter(record)
    assert record.exc_info is not None


@pytest.mark.slow
def test_bad_input_found_inside_a_flow_prints_no_traceback(tmp_path: Path) -> None:
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"problem": "What is 1+1?"}\n')  # no answer
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "round", "--recipe", "demo", "--home", str(tmp_path / "home"),
         "--round", "0", "--set", f"problems.source={problems}", "--set", "bootstrap.teacher=null"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("kaizen round: error:")]
    assert result.returncode == 1 and len(errors) == 1 and "has no answer" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr


HELP_COMMANDS = [[name] for name in COMMANDS if name not in ("vllm", "train")] + [
    ["vllm", "install"], ["vllm", "serve"], ["vllm", "check"], ["train", "sft"], ["train", "ppm"], ["train", "rl"],
]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_every_commands_help_is_shown(command: list[str], capsys: pytest.CaptureFixture) -> None:
    try:
        code = main([*command, "--help"])
    except SystemExit as exit_:  # argparse's own exit, where the command does not catch it
        code = exit_.code
    assert code == 0 and "usage:" in capsys.readouterr().out



# The flow commands' help and usage errors must answer at once, not after importing Prefect and torch.
@pytest.mark.parametrize("command", ["run", "round", "stage", "status", "evaluate", "demo"])
def test_a_flow_commands_help_imports_neither_prefect_nor_torch(command: str) -> None:
    probe = (
        "import contextlib, io, sys\n"
        "from flows.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    try: main([{command!r}, '--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted({'prefect', 'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_evaluate_refuses_a_ppm_mode_without_a_ppm_before_the_flow(capsys: pytest.CaptureFixture) -> None:
    code, err = run(["evaluate", "--model", "tiny", "--benchmark", "aime24", "--mode", "ppm@4"], capsys)
    assert code == 2 and err == ["kaizen evaluate: error: mode(s) ppm@4 need a PPM checkpoint (--ppm)"]


def test_evaluate_refuses_an_empty_benchmark_file_before_the_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    code, err = run(["evaluate", "--model", "tiny", "--benchmark", f"mine={tmp_path / 'empty.jsonl'}"], capsys)
    assert code == 2 and len(err) == 1 and "has no problems" in err[0]


def test_evaluate_refuses_a_ppm_that_is_not_one_before_the_flow(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, err = run(["evaluate", "--model", str(tmp_path), "--ppm", str(tmp_path), "--mode", "ppm@2",
                     "--benchmark", "aime24"], capsys)
    assert code == 1 and len(err) == 1 and "is not a PPM checkpoint" in err[0]


# --- the command line as a new user meets it -----------------------------------------------------


def option_help(command: str, option: str, capsys: pytest.CaptureFixture) -> str:
    """The help text of one option of `kaizen COMMAND --help`, on one line."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    lines = capsys.readouterr().out.splitlines()
    start = next(index for index, line in enumerate(lines) if line.lstrip().startswith(f"{option} "))
    end = next((index for index in range(start + 1, len(lines)) if lines[index].lstrip().startswith("-")), len(lines))
    return " ".join(" ".join(lines[start:end]).split())


def train_sft_argv(tmp_path: Path, *options: str) -> list[str]:
    return ["train", "sft", "--tables", str(tmp_path / "sft.parquet"), "--out", str(tmp_path / "out"),
            "--base-model", "org/model", *options]


def test_train_refuses_a_previous_checkpoint_the_run_would_not_start_from(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    code, err = run(train_sft_argv(tmp_path, "--previous", str(tmp_path)), capsys)
    assert code == 2 and err == [f"kaizen train: error: previous checkpoint {tmp_path} given, but training.sft."
                                 "init_from is 'base' (start from the base model): set init_from: previous to "
                                 "continue from it"]


def test_train_refuses_a_previous_checkpoint_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(train_sft_argv(tmp_path, "--set", "init_from=previous", "--previous",
                                           str(tmp_path / "none")), capsys)
    assert code == 2 and err == [f"kaizen train: error: previous checkpoint not found: '{tmp_path / 'none'}' "
                                 "(no such directory, and not a hub name)"]


def test_train_refuses_an_empty_recipe_as_check_recipe_does(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = run(train_sft_argv(tmp_path, "--recipe", str(empty)), capsys)
    assert code == 2 and err == [f"kaizen train: error: {empty}: a recipe must be a mapping of sections"]


def test_rollout_caps_steps_at_mctsconfigs_default_as_eval_and_recipes_do(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import models.rollout
    from search.mcts import MCTSConfig

    received: dict = {}

    def stage(*args: object, config: models.rollout.RolloutStageConfig, **kwargs: object) -> None:
        received["mcts"] = config.mcts
        raise SystemExit(0)

    monkeypatch.setattr(models.rollout, "rollout_stage", stage)
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"id": "p1", "problem": "What is 2 + 2?", "answer": "4"}\n')
    with pytest.raises(SystemExit):
        main(["rollout", "--model", "m", "--problems", str(problems), "--out", str(tmp_path / "out")])
    assert received["mcts"].max_step_tokens == MCTSConfig().max_step_tokens


@pytest.mark.parametrize(("command", "option"), [
    ("rollout", "--temperature"), ("rollout", "--seed"), ("rollout", "--max-step-tokens"),
    ("mine", "--margin"), ("mine", "--min-edit-distance"), ("mine", "--sft-per-problem"),
    *[("tiny-model", option) for option in ("--vocab-size", "--hidden-size", "--num-layers", "--num-heads",
                                            "--intermediate-size", "--max-positions", "--seed")],
])
def test_an_options_help_shows_its_default(command: str, option: str, capsys: pytest.CaptureFixture) -> None:
    assert "(default " in option_help(command, option, capsys)


OUT_OF_RANGE = [
    ("rollout", "--rollouts", "0", "must be >= 1, got 0"),
    ("rollout", "--width", "0", "must be >= 1, got 0"),
    ("rollout", "--max-depth", "-2", "must be >= 1, got -2"),
    ("rollout", "--max-step-tokens", "0", "must be >= 1, got 0"),
    ("rollout", "--temperature", "-0.5", "must be finite and >= 0, got -0.5"),
    ("rollout", "--temperature", "nan", "must be finite and >= 0, got nan"),
    ("mine", "--margin", "-1", "must be a finite number >= 0, got -1.0"),
    ("mine", "--min-edit-distance", "-1", "must be >= 0, got -1"),
    ("mine", "--sft-per-problem", "-1", "must be >= 0, got -1"),
]


@pytest.mark.parametrize(("command", "option", "value", "reason"), OUT_OF_RANGE,
                         ids=[" ".join(case[:3]) for case in OUT_OF_RANGE])
def test_a_search_or_mining_setting_out_of_range_is_a_usage_error_naming_the_flag(
    command: str, option: str, value: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    required = {"rollout": ["--model", "m", "--problems", "p.jsonl"],
                "mine": ["--nodes", "n.parquet", "--problems", "p.jsonl"]}
    code, err = run([command, *required[command], "--out", str(tmp_path / "out"), option, value], capsys)
    assert code == 2 and err == [f"kaizen {command}: error: {option} {reason}"]


def test_score_says_that_a_jsonl_path_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["score", "--ppm", str(tmp_path), "--jsonl", str(tmp_path)], capsys)
    assert code == 2 and err == [f"kaizen score: error: cannot read {tmp_path}: Is a directory"]


def test_score_reads_stdin_for_a_dash_as_grade_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import io
    import json

    import models.ppm

    class Scorer:  # a stand-in PPM: the test is about where the texts come from
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def score(self, texts: list[str]) -> list[float]:
            return [float(len(text)) for text in texts]

    monkeypatch.setattr(models.ppm, "PPMScorer", Scorer)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'"ab"\n{"text": "abc", "id": 7}\n')))
    assert main(["score", "--ppm", str(tmp_path), "--jsonl", "-"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == [{"text": "ab", "ppm_score": 2.0}, {"text": "abc", "id": 7, "ppm_score": 3.0}]


def test_tiny_model_refusing_an_existing_out_names_only_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run(["tiny-model", "--out", str(tmp_path)], capsys)
    assert code == 2 and err == [f"kaizen tiny-model: error: {tmp_path} already exists "
                                 "(pass --overwrite to replace it)"]
