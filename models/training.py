"""Policy SFT, PPM and RL training on TRL: recipe configs, pre-flight checks, and one subprocess per run.

`train_sft` / `train_ppm` / `train_rl` check everything that can be checked without a GPU (recipe
keys, the tables, the model to start from, the rewards) and then run
`python -m models.training sft|ppm|rl --config FILE`
(under `accelerate launch` when the recipe names an accelerate config), so GPU memory is returned
when a run ends and a hung run can be killed as a process group. The child trains into a hidden
staging directory next to the output, writes `provenance.json` last, and the parent renames the
directory into place only when the child succeeded: a directory at the output path is complete.

Long runs resume. With intermediate checkpoints on (`save_strategy: steps`, as the GPU recipes'
comments suggest), a run that fails, times out, is interrupted or dies with its machine leaves its staging
directory behind; the next run of the same request (the same data and start model by content, the
same training settings; RUN_ONLY_KEYS and the paths of the tables and of a start model Kaizen trained
may differ, so a home moved or mounted elsewhere keeps its checkpoints) adopts it and continues
from its last complete checkpoint (model, optimizer, scheduler, RNG and data position, via the Trainer's `resume_from_checkpoint`; measured on CPU, SFT
and PPM runs so resumed end bit for bit as uninterrupted ones, GRPO's sampling does not continue the
same stream). A checkpoint counts only once every process has written it and `ResumableCheckpoints`
has synced and marked it. A resumed run that fails by itself before it ends its first step from the
checkpoint (not stopped, killed by a signal, or refused for bad input) drops it, so a damaged
checkpoint cannot fail every retry. A staging directory whose model was finished when its run died
while publishing is published by the next run instead of trained again. Any other run for that
output deletes such leftovers. One run works on an output at a time: it holds `.{output}.lock`
next to it from its look at the leftovers until it has published. The intermediate checkpoints are
removed before the output is published; the published provenance's `train_loss` and
`train_runtime` cover the steps after `resumed_from_step`.

Each round trains from the base model on all verified data so far (`init_from: base`, as
rStar-Math does) unless the recipe says `init_from: previous`. The PPM starts from this round's
SFT policy with a one-label head; see `models.ppm` for how its value is defined. The optional RL
stage (GRPO with verifiable rewards, `models.rl`) also starts from this round's SFT policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import GRPOConfig, RewardConfig, SFTConfig

from data_store.home import RunBusyError, hold_lock, output_lock
from data_store.parquet import atomic_path, fsync_path, write_json
from models.attention import register_training_attention
from models.lifetime import process_identity, process_is_running, stop_when_parent_gone, watch_environment
from models.ppm import SCORING_FILE, ScoringContract, attach_value_squash, encode_texts, ensure_distinct_pad_token
from models.rl import (
    OPTIONAL_COLUMNS,
    STEP_FORMATS,
    RewardFields,
    RLSettingsError,
    check_rl_settings,
    require_coat_tokens,
)
from models.tiny import is_hub_name

KINDS = ("sft", "ppm", "rl")
SAVE_DTYPES = ("float32", "bfloat16", "float16")
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"), "ppm": ("prompt", "chosen", "rejected"), "rl": ("prompt", "answer")
}
PROVENANCE_FILE = "provenance.json"
LOG_DIR = "logs"
REQUEST_FILE = "request.json"
FAILURE_FILE = "failure.txt"
RUNNER_FILE = "runner.pid"  # which process trains into a staging directory (models.lifetime.process_identity)
INPUT_ERROR_EXIT = 2  # the child's exit status for bad input it found before training
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's intermediate checkpoints, inside the staging directory
RESUMABLE_FILE = "kaizen-resumable"  # written (and synced) after the Trainer saved a whole checkpoint
RESUMED_FILE = "kaizen-resumed"  # written by a resumed run once it has ended a step from its checkpoint
RUN_ONLY_KEYS = ("timeout_s", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "logging_steps",
                 "logging_strategy", "logging_first_step", "report_to", "disable_tqdm", "log_level")
"""Training settings that say how a run is watched and kept, not what it computes: they leave cache
keys alone, and a run may resume another's checkpoint when only these differ."""
REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingError(Exception):
    """A training run could not be done; the message is one line."""


class TrainingInputError(TrainingError):
    """Bad recipe, tables or model, found before any training started."""


class TrainingRunError(TrainingError):
    """The training subprocess failed, was killed, or timed out."""


# --- configs -----------------------------------------------------------------------------------


@dataclass
class RunFields:
    """Kaizen's fields and defaults, mixed into the SFT, PPM and RL configs (the rest are TRL's and transformers')."""

    base_model: str = field(
        default="",
        metadata={"help": "model to start from: a local Hugging Face directory or a hub name; for the PPM, "
                  "this round's SFT policy (the caller usually passes it)"},
    )
    init_from: str = field(
        default="base",
        metadata={"help": "'base': every round trains base_model on all data so far (rStar-Math); 'previous': "
                  "continue from the previous round's checkpoint when the caller passes one",
                  "choices": ["base", "previous"]},
    )
    train_tables: list[str] = field(
        default_factory=list,
        metadata={"help": "Parquet tables to train on (sft: prompt, completion; ppm: prompt, chosen, rejected; "
                  "rl: prompt, answer); usually passed by the caller"},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "examples (SFT) or pairs (PPM) per optimizer step across all processes; sets "
                  "gradient_accumulation_steps from per_device_train_batch_size and the process count"},
    )
    add_step_tokens: bool = field(
        default=True,
        metadata={"help": "add the step-format markers to the tokenizer as single tokens (embeddings grow)"},
    )
    step_format: str = field(
        default="rstar",
        metadata={"help": "rstar (code-augmented steps) or coat (steps led by Satori's meta-action tokens; SFT and "
                  "PPM add the tokens, RL requires the policy to have them)", "choices": list(STEP_FORMATS)},
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights. Adapters are merged on save"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path"})
    lora_target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "modules that get adapters: 'all-linear' or a list of names"}
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "accelerate config file (multi-GPU DDP or FSDP); relative paths resolve against the "
                  "working directory, then the repository. Unset: one process"},
    )
    timeout_s: float | None = field(
        default=None, metadata={"help": "kill the run (whole process group) after this many seconds"}
    )

    # Defaults that differ from TRL's: bf16 and gradient checkpointing follow the device (TRL turns
    # both on, and with bf16 on CPU the reward model did not learn), loss curves go to TensorBoard,
    # the output holds only the final model, and token counts exclude padding (they feed tokens/s).
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; None: on when a CUDA device is present, off on CPU"}
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute activations in backward; None: on when a CUDA device is present, off on CPU"},
    )
    save_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the saved weights: float32, bfloat16 or float16; None: the mixed-precision dtype "
                  "(bfloat16 with bf16, float16 with fp16), else float32. Training precision is unchanged; a 7B "
                  "checkpoint takes 15 GB in bfloat16 against 30 in float32"},
    )
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "loss-curve loggers"})
    save_strategy: str = field(
        default="no",
        metadata={"help": "intermediate checkpoints, kept while the run lasts: 'steps' (every save_steps) lets a run "
                  "that died resume from the last one when its stage runs again; 'no': final model only"},
    )
    include_num_input_tokens_seen: str | bool = field(
        default="non_padding", metadata={"help": "count tokens seen: 'non_padding', 'all' or 'no'"}
    )

    def __post_init__(self) -> None:
        _resolve_run_fields(self)
        super().__post_init__()  # the TRL config this mixin is combined with


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_run_fields(config: Any) -> None:
    """Fill the settings that depend on the machine: bf16 and checkpointing on GPU only, accumulation."""
    on_gpu = _cuda_available()
    if config.bf16 is None:
        config.bf16 = on_gpu and not config.fp16
    if config.gradient_checkpointing is None:
        config.gradient_checkpointing = on_gpu
    if config.save_dtype is None:
        config.save_dtype = "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"
    if config.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {config.save_dtype!r}")
    if config.global_batch_size is not None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = config.per_device_train_batch_size * world_size
        if config.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"{config.per_device_train_batch_size} x {world_size} processes"
            )
        config.gradient_accumulation_steps = config.global_batch_size // per_step


@dataclass
class SFTTrainingConfig(RunFields, SFTConfig):
    """Policy SFT: TRL's `SFTConfig` plus Kaizen's run fields and defaults."""


@dataclass
class PPMTrainingConfig(RunFields, RewardConfig):
    """PPM: TRL's `RewardConfig` plus Kaizen's run fields and defaults (Bradley-Terry loss on tanh values)."""


@dataclass
class RLTrainingConfig(RunFields, RewardFields, GRPOConfig):
    """RL with verifiable rewards: TRL's `GRPOConfig` plus Kaizen's run fields and the rewards of `models.rl`.

    The GRPO settings include generation with vLLM on GPU: `use_vllm`, `vllm_mode` ('colocate', or
    'server' with `vllm_server_base_url` pointing at `trl vllm-serve`), `vllm_gpu_memory_utilization`.
    """


CONFIG_CLASSES: dict[str, type] = {"sft": SFTTrainingConfig, "ppm": PPMTrainingConfig, "rl": RLTrainingConfig}


@dataclass(frozen=True)
class TrainingSettings:
    """The `training` section of a recipe: config fields per stage, checked against the config classes."""

    sft: dict[str, Any] = field(default_factory=dict, metadata={"help": "SFTTrainingConfig fields"})
    ppm: dict[str, Any] = field(default_factory=dict, metadata={"help": "PPMTrainingConfig fields"})
    rl: dict[str, Any] = field(default_factory=dict, metadata={"help": "RLTrainingConfig fields (the optional RL stage)"})

    def for_kind(self, kind: str) -> dict[str, Any]:
        return dict(getattr(self, kind))


def _unknown_keys_message(where: str, unknown: Sequence[str], known: Sequence[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: {', '.join(hints)}"


def _coerce(where: str, config_field: dataclasses.Field, value: Any) -> Any:
    """YAML reads `7e-6` as a string; turn such strings into the field's scalar type, and check choices."""
    type_text = getattr(config_field.type, "__name__", str(config_field.type))
    if isinstance(value, str) and "str" not in type_text:
        for scalar in (int, float):
            if re.search(rf"\b{scalar.__name__}\b", type_text):
                try:
                    return scalar(value)
                except ValueError:
                    continue
        raise TrainingInputError(f"{where}: {value!r} is not a valid {type_text}")
    choices = config_field.metadata.get("choices")
    if choices and isinstance(value, str) and value not in choices:
        raise TrainingInputError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


# Fields the TRL config has that Kaizen cannot honour, and why.
_EVERY_KIND_UNSUPPORTED = {
    "output_dir": "the checkpoint goes where the caller says (--out, or the round's checkpoint directory), "
    "written to a staging directory first",
    "resume_from_checkpoint": "a run starts from its model; to continue from an earlier checkpoint, pass it "
    "as the base model or use init_from: previous",
}
UNSUPPORTED_KEYS: dict[str, dict[str, str]] = {
    "sft": _EVERY_KIND_UNSUPPORTED,
    "ppm": {
        **_EVERY_KIND_UNSUPPORTED,
        **{key: "the PPM encodes its texts with its tokenizer's own EOS and pad tokens, the ones the scorer uses "
           "(RewardTrainer would swap them after encoding)" for key in ("eos_token", "pad_token")},
    },
    "rl": _EVERY_KIND_UNSUPPORTED,
}


def check_config_keys(kind: str, values: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """The values with known keys only (scalars coerced); TrainingInputError naming every unknown key."""
    where = where or f"training.{kind}"
    fields_by_name = {f.name: f for f in dataclasses.fields(CONFIG_CLASSES[kind]) if f.init}
    unknown = sorted(set(values) - set(fields_by_name))
    if unknown:
        raise TrainingInputError(_unknown_keys_message(where, unknown, list(fields_by_name)))
    for key in sorted(set(values) & set(UNSUPPORTED_KEYS.get(kind, {}))):
        raise TrainingInputError(f"{where}.{key} is not supported: {UNSUPPORTED_KEYS[kind][key]}")
    checked = {key: _coerce(f"{where}.{key}", fields_by_name[key], value) for key, value in values.items()}
    _check_ranges(where, checked)
    return checked


# Values that type-check but cannot train: (lowest allowed, whether the bound itself is allowed).
_RANGES: dict[str, tuple[float, bool]] = {
    "learning_rate": (0.0, False), "num_train_epochs": (0.0, False), "per_device_train_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True), "global_batch_size": (1, True), "max_length": (1, True),
    "timeout_s": (0.0, False), "warmup_steps": (0.0, True), "weight_decay": (0.0, True),
}


def _check_ranges(where: str, values: Mapping[str, Any]) -> None:
    """TrainingInputError for a value out of its range (a negative learning rate, a batch of 0, no epochs)."""
    for key in (*_RANGES, "max_steps"):  # compared below: a list or a mapping would raise TypeError there
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TrainingInputError(f"{where}.{key} must be a number, got {value!r}")
    for key, (lowest, inclusive) in _RANGES.items():
        value = values.get(key)
        if value is None or (key == "num_train_epochs" and (values.get("max_steps") or -1) > 0):
            continue  # unset, or max_steps decides the length
        if value < lowest or (value == lowest and not inclusive):
            raise TrainingInputError(f"{where}.{key} must be {'>=' if inclusive else '>'} {lowest}, got {value}")


def load_training_config(source: str | Path | Mapping[str, Any] | TrainingSettings | None) -> TrainingSettings:
    """Read the training section of a recipe (a YAML path or a mapping; a full recipe's `training` key is used).

    Raises TrainingInputError naming unknown keys (with the closest known key) or values of the wrong type.
    """
    if source is None:
        return TrainingSettings()
    if isinstance(source, TrainingSettings):
        return source
    what = "a training recipe"
    if isinstance(source, (str, Path)):
        from models.recipe import RecipeError, read_recipe_yaml, resolve_recipe_path  # it builds on this module

        try:  # a YAML path, or a bundled recipe's name
            path = resolve_recipe_path(source)
            source = read_recipe_yaml(path)
        except RecipeError as err:
            raise TrainingInputError(str(err)) from None
        # An empty file too: it is no recipe to `kaizen check-recipe`, so training must not run on defaults.
        what = f"{path}: a recipe"
    if not isinstance(source, Mapping):
        raise TrainingInputError(f"{what} must be a mapping of sections")
    section = source.get("training", source)
    if not isinstance(section, Mapping):
        raise TrainingInputError("recipe key 'training' must be a mapping")
    unknown = sorted(set(section) - set(KINDS))
    if unknown:
        raise TrainingInputError(_unknown_keys_message("training", unknown, KINDS))
    # A full recipe's top-level step_format applies to every kind (models.recipe threads it the same way).
    recipe_wide = {"step_format": source["step_format"]} if "training" in source and "step_format" in source else {}
    checked = {}
    for kind in KINDS:
        values = section.get(kind) or {}
        if not isinstance(values, Mapping):
            raise TrainingInputError(f"training.{kind} must be a mapping")
        checked[kind] = check_config_keys(kind, {**recipe_wide, **values})
        _check_lora_placement(kind, checked[kind])
    return TrainingSettings(**checked)


# --- pre-flight checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class TableInfo:
    """One training table as provenance records it."""

    path: str
    rows: int
    sha256: str


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_tables(kind: str, paths: Sequence[str | Path]) -> list[TableInfo]:
    """Check that the tables exist, are Parquet, have the kind's text columns without nulls or empty strings,
    and hold at least one row between them. Raises TrainingInputError with one line naming the problem."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not paths:
        raise TrainingInputError(f"no {kind} tables given")
    required = REQUIRED_COLUMNS[kind]
    infos = []
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise TrainingInputError(f"{kind} table not found: {path}")
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise TrainingInputError(f"{path} is not a Parquet file: {str(err).splitlines()[0]}") from err
        missing = [name for name in required if name not in schema.names]
        if missing:
            raise TrainingInputError(
                f"{path} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"(a {kind} table needs {', '.join(required)})"
            )
        table = pq.read_table(path, columns=list(required))
        for name in required:
            column = table.column(name)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise TrainingInputError(f"{path}: column {name} holds {column.type}, not text")
            empty = pc.sum(pc.equal(pc.utf8_length(column), 0)).as_py() or 0  # None when every value is null
            blank = column.null_count + empty
            if blank:
                raise TrainingInputError(f"{path}: {blank} row(s) with a null or empty {name}")
        infos.append(TableInfo(str(path.resolve()), table.num_rows, file_sha256(path)))
    if not sum(info.rows for info in infos):
        raise TrainingInputError(f"the {kind} tables are empty: {', '.join(str(p) for p in paths)}")
    return infos


def describe_model_source(name: str, what: str = "model") -> dict[str, Any]:
    """Provenance of the model a run starts from; TrainingInputError, naming it `what`, if it is neither a model
    directory nor a hub name."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TrainingInputError(f"{name} is not a Hugging Face model directory (no config.json)")
        record: dict[str, Any] = {
            "name": name, "path": str(path.resolve()), "config_sha256": file_sha256(path / "config.json")
        }
        if (path / PROVENANCE_FILE).is_file():
            # Checkpoints chain: a PPM names the SFT run it came from, which names its data and base.
            record["provenance_sha256"] = file_sha256(path / PROVENANCE_FILE)
        return record
    if is_hub_name(name):
        return {"name": name, "hub": True}
    raise TrainingInputError(f"{what} not found: {name!r} (no such directory, and not a hub name)")


def _model_content(record: Mapping[str, Any]) -> dict[str, Any]:
    """A `describe_model_source` record as a resume identity holds it: a hub model by its name; a model
    Kaizen trained (it has provenance.json, which names its data, base and settings) by the digests of its
    config and provenance, wherever the home is mounted; any other local model also by its resolved
    path, since two of those can share a config.json and differ only in their weights."""
    if record.get("hub"):
        return dict(record)
    where = ("name", "path") if "provenance_sha256" in record else ("name",)
    return {key: value for key, value in record.items() if key not in where}


def _resolve_file(name: str) -> Path:
    for candidate in (Path(name).expanduser(), REPO_ROOT / name):
        if candidate.is_file():
            return candidate.resolve()
    raise TrainingInputError(f"accelerate config not found: {name}")


# --- launching ---------------------------------------------------------------------------------


@dataclass
class RunRequest:
    """Everything a training subprocess needs, written as JSON into its staging directory."""

    kind: str
    config: dict[str, Any]
    start_model: str
    base_model: dict[str, Any]
    start_model_record: dict[str, Any]
    tables: list[TableInfo]
    output_dir: str
    overwrite: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def resume_identity(self) -> str:
        """What must match for this run to continue another's checkpoint: the kind, the settings but
        RUN_ONLY_KEYS, and the tables and start model by content (`_model_content`). The tables' paths are
        left out (the staging directory is found next to the output), so a home moved or mounted
        elsewhere keeps its checkpoints; whether to overwrite an existing output is not how to train it."""
        by_path = ("train_tables", "base_model")  # their content is in `tables` and `start_model_record`
        config = {key: value for key, value in self.config.items() if key not in (*RUN_ONLY_KEYS, *by_path)}
        identity = {
            "kind": self.kind,
            "config": config,
            "tables": [(table.rows, table.sha256) for table in self.tables],  # in order: it is the data order
            "start_model": _model_content(self.start_model_record),
        }
        return json.dumps(identity, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunRequest:
        data = json.loads(text)
        data["tables"] = [TableInfo(**table) for table in data["tables"]]
        return cls(**data)


def prepare_run(
    kind: str,
    recipe: str | Path | Mapping[str, Any] | TrainingSettings | None = None,
    *,
    tables: Sequence[str | Path] | None = None,
    output_dir: str | Path,
    base_model: str | None = None,
    previous_checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> RunRequest:
    """Merge recipe, call arguments and overrides, and check all of it; nothing is trained or written.

    `previous_checkpoint` is last round's output of the same kind, the starting point under
    `init_from: previous`; given under `init_from: base` it is refused. Raises TrainingInputError.
    """
    if kind not in KINDS:
        raise TrainingInputError(f"unknown training kind {kind!r} (expected one of {', '.join(KINDS)})")
    config = load_training_config(recipe).for_kind(kind)
    config.update(check_config_keys(kind, overrides or {}, where="overrides"))
    init_from = config.get("init_from", "base")
    if previous_checkpoint is not None and init_from != "previous":
        # Ignored, it would leave a run from the base model where the caller asked to continue one.
        raise TrainingInputError(f"previous checkpoint {previous_checkpoint} given, but training.{kind}.init_from "
                                 f"is {init_from!r} (start from the base model): set init_from: previous to continue "
                                 "from it")
    if tables is not None:
        config["train_tables"] = [str(Path(table)) for table in tables]
    if base_model is not None:
        config["base_model"] = str(base_model)
    if not config.get("base_model"):
        raise TrainingInputError(f"no base model: pass one or set training.{kind}.base_model in the recipe")
    output = Path(output_dir).expanduser().resolve()
    if output.exists() and not overwrite:
        raise TrainingInputError(f"output directory already exists: {output}")
    if config.get("accelerate_config"):
        config["accelerate_config"] = str(_resolve_file(config["accelerate_config"]))
    _check_lora_placement(kind, config)
    _check_liger_installed(config)
    base_record = describe_model_source(config["base_model"])
    start = config["base_model"] if previous_checkpoint is None else str(previous_checkpoint)
    start_record = (base_record if start == config["base_model"]
                    else describe_model_source(start, "previous checkpoint"))
    if kind != "ppm" and (Path(start).expanduser() / SCORING_FILE).is_file():
        # It would load as a causal LM with only a warning, its score head dropped and, on models whose
        # LM head is not tied to the embeddings, a random LM head in its place.
        raise TrainingInputError(f"{start} is a PPM checkpoint ({SCORING_FILE}); {kind} trains a policy")
    table_infos = check_tables(kind, config.get("train_tables", []))
    if kind == "rl":
        _check_rl_run(config, table_infos)
    _check_coat_tokens(kind, config, start)
    return RunRequest(kind, config, start, base_record, start_record, table_infos, str(output), overwrite)


def _check_liger_installed(config: Mapping[str, Any]) -> None:
    """`use_liger_kernel` needs the optional liger-kernel package; the Trainer would only say so after loading the model."""
    import importlib.util

    if config.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise TrainingInputError("use_liger_kernel: true needs the liger-kernel package: pip install -e '.[gpu]'")


def _check_rl_run(config: Mapping[str, Any], tables: Sequence[TableInfo]) -> None:
    """The RL checks that need no training process: rewards and their inputs."""
    import pyarrow.parquet as pq

    try:
        check_rl_settings(config, [pq.read_schema(table.path).names for table in tables])
        if config.get("ppm_model"):
            describe_model_source(config["ppm_model"])
    except RLSettingsError as err:
        raise TrainingInputError(str(err)) from None


def _check_coat_tokens(kind: str, config: Mapping[str, Any], start_model: str) -> None:
    """A COAT run on a local model that lacks the meta-action tokens and would not get them: RL never adds
    tokens, SFT and PPM do unless add_step_tokens is off."""
    adds_tokens = kind != "rl" and config.get("add_step_tokens", True)
    if adds_tokens:
        return
    from models.backends import require_policy_tokens

    try:
        require_policy_tokens(start_model, config.get("step_format", "rstar"))
    except RLSettingsError as err:
        remedy = "" if kind == "rl" else " (or leave add_step_tokens on)"
        raise TrainingInputError(f"{err}{remedy}") from None


def _check_lora_placement(kind: str, config: dict[str, Any]) -> None:
    """LoRA adapters are merged into the saved model on rank 0, which needs every weight on that rank:
    under FSDP the other ranks would wait at a collective rank 0 never joins, until NCCL times out."""
    if not (config.get("lora_r") and config.get("accelerate_config")):
        return
    import yaml

    accelerate = yaml.safe_load(_resolve_file(config["accelerate_config"]).read_text()) or {}
    if str(accelerate.get("distributed_type", "")).upper() == "FSDP":
        raise TrainingInputError(
            f"training.{kind}: lora_r with an FSDP accelerate config ({config['accelerate_config']}) is not "
            "supported (merging the adapters needs the whole model on one rank); use a DDP config such as "
            "deployments/accelerate/ddp_1node.yaml, or lora_r: 0"
        )


def _launch_command(request: RunRequest, request_path: Path) -> list[str]:
    entry = ["-m", "models.training", request.kind, "--config", str(request_path)]
    if request.config.get("accelerate_config"):
        config_file = request.config["accelerate_config"]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, *entry]
    return [sys.executable, *entry]


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The child imports `models.training` by module name wherever the caller's working directory is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(watch_environment())  # the child stops itself when this process is killed outright
    return env


def _publish(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished staging directory to `target`; an old `target` is swapped out, then deleted."""
    if target.exists() and overwrite:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_path(target.parent)  # the rename itself survives a lost machine (the child synced the files)


class TrainingRun:
    """A training subprocess in flight; `wait()` publishes its checkpoint or raises TrainingRunError.

    From its first look at the leftovers until `wait()` ends it holds the output's lock, so that two
    runs for one output cannot adopt the same staging directory or delete each other's.
    """

    def __init__(self, request: RunRequest) -> None:
        self.request = request
        self.output_dir = Path(request.output_dir)
        self.output_dir.parent.mkdir(parents=True, exist_ok=True)
        self.resumed_from: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None  # stays None when an earlier attempt finished training
        with ExitStack() as held:  # released here if starting fails, else by wait()
            try:
                held.enter_context(hold_lock(output_lock(self.output_dir),
                                             f"{request.kind} training", f"training output {self.output_dir}"))
            except RunBusyError as err:
                raise TrainingRunError(str(err)) from None
            self.staging_dir = self._adopt_or_create()
            if not (self.staging_dir / PROVENANCE_FILE).is_file():
                self._start()
            self._lock = held.pop_all()

    def _adopt_or_create(self) -> Path:
        """The staging directory of an earlier attempt at this request that left a checkpoint or a finished
        model, else a new one."""
        staging_prefix = f".{self.output_dir.name}.partial-"
        # A run that failed or was killed outright leaves its staging directory, and one that died
        # while publishing the retired old checkpoint: a 7B checkpoint's worth of disk each. The run
        # replacing it owns the output now; it keeps only a staging directory it can continue.
        leftovers = sorted(self.output_dir.parent.glob(f"{staging_prefix}*"), key=lambda p: p.stat().st_mtime)
        _wait_for_runners(leftovers)
        adopted = next((d for d in reversed(leftovers) if _continues(d, self.request)), None)
        for leftover in [*leftovers, *self.output_dir.parent.glob(f".{self.output_dir.name}.old-*")]:
            if leftover != adopted:
                shutil.rmtree(leftover, ignore_errors=True)
        if adopted is None:
            return Path(tempfile.mkdtemp(prefix=staging_prefix, dir=self.output_dir.parent))
        if not (adopted / PROVENANCE_FILE).is_file():  # else its model is finished: only publishing is left
            self.resumed_from = _prepare_resume(adopted)
        return adopted

    def _start(self) -> None:
        request_path = self.staging_dir / REQUEST_FILE
        request_path.write_text(self.request.to_json(), encoding="utf-8")
        # A session of its own: killing the group also ends accelerate's worker processes. Not tied
        # to this thread by a preexec_fn as the vLLM server is (with it, a SIGTERM to `kaizen` during
        # bootstrap training was sometimes lost); the child watches this process instead (main()).
        # Its stdout (the Trainer prints log dicts there) goes to stderr: stdout is the caller's
        # (`kaizen train` prints the checkpoint path on it, for `$(kaizen train ...)`).
        self.process = subprocess.Popen(
            _launch_command(self.request, request_path), env=_child_environment(), start_new_session=True,
            stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else subprocess.DEVNULL,
        )
        (self.staging_dir / RUNNER_FILE).write_text(process_identity(self.process.pid), encoding="utf-8")

    def kill(self, grace_s: float = 10.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after `grace_s`."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            if self.process is None:
                return
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self, timeout_s: float | None = None) -> Path:
        """Block until the run ends; return the published checkpoint directory. The output's lock is
        released however this ends."""
        with self._lock:
            if self.process is not None:
                self._wait_for_child(timeout_s)
            for checkpoint in self.staging_dir.glob(f"{CHECKPOINT_PREFIX}*"):
                # Unmarked first: one half deleted when this process dies must not pass for a whole one.
                (checkpoint / RESUMABLE_FILE).unlink(missing_ok=True)
                shutil.rmtree(checkpoint)  # optimizer states and all: several times the model's size
            # The request last: while it is there, the next run publishes this model if this process dies.
            for name in (RESUMED_FILE, RUNNER_FILE, REQUEST_FILE):
                (self.staging_dir / name).unlink(missing_ok=True)
            _publish(self.staging_dir, self.output_dir, self.request.overwrite)
            return self.output_dir

    def _wait_for_child(self, timeout_s: float | None) -> None:
        """Return once the child has finished the model; raise, keeping or deleting its checkpoint, if not."""
        timeout_s = timeout_s if timeout_s is not None else self.request.config.get("timeout_s")
        try:
            returncode = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            kept = self._discard(suspect_checkpoint=False)
            raise TrainingRunError(
                f"{self.request.kind} training timed out after {timeout_s:g} s and was killed{kept}"
            ) from None
        except BaseException:
            self.kill()
            self._discard(suspect_checkpoint=False)
            raise
        if returncode != 0 or not (self.staging_dir / PROVENANCE_FILE).is_file():
            reason = self._failure_reason(returncode)
            # A signal came from outside (the OOM killer, a stop), and bad input is no checkpoint's fault.
            kept = self._discard(suspect_checkpoint=returncode >= 0 and returncode != INPUT_ERROR_EXIT)
            if returncode == INPUT_ERROR_EXIT:
                raise TrainingInputError(f"{reason}{kept}")
            raise TrainingRunError(f"{self.request.kind} training failed: {reason}{kept}")

    def _failure_reason(self, returncode: int) -> str:
        failure = self.staging_dir / FAILURE_FILE
        if failure.is_file():
            return failure.read_text(encoding="utf-8").strip()
        if returncode < 0:
            return f"killed by signal {signal.Signals(-returncode).name}"
        return f"exit status {returncode}" if returncode else "no provenance.json was written"

    def _discard(self, suspect_checkpoint: bool) -> str:
        """Delete the staging directory unless it holds a checkpoint to resume from; say which in words
        for the error message. `suspect_checkpoint`: the child failed by itself, so a checkpoint it
        resumed from and never got past (no RESUMED_FILE) may be the cause."""
        checkpoints = complete_checkpoints(self.staging_dir)
        if suspect_checkpoint and self.resumed_from is not None and not (self.staging_dir / RESUMED_FILE).is_file():
            # Kept, a damaged checkpoint would fail every retry the same way.
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            return (f"; it failed while resuming from its checkpoint at step {checkpoint_step(self.resumed_from)}, "
                    "so its checkpoints were deleted and the next run starts afresh")
        if not checkpoints:
            shutil.rmtree(self.staging_dir, ignore_errors=True)
            return ""
        return (f"; its checkpoint at step {checkpoint_step(checkpoints[-1])} is kept in {self.staging_dir}, and "
                "running the same stage again resumes from it")


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint directory (`checkpoint-N`) was saved at."""
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def complete_checkpoints(staging: Path) -> list[Path]:
    """The Trainer's intermediate checkpoints in a staging directory that a run can resume from, oldest
    first: whole (ResumableCheckpoints marked them after the Trainer's save, on disk) and with their
    optimizer state (`save_only_model` checkpoints have none)."""
    found = [path for path in staging.glob(f"{CHECKPOINT_PREFIX}*")
             if path.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (path / RESUMABLE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def _sync_tree(root: Path, leave_out_prefix: str | None = None) -> None:
    """fsync the files under `root` and the directories listing them (the Trainer and `save_pretrained`
    write in place and sync nothing), so that what a marker or a rename vouches for survives a lost
    machine. `root`'s subdirectories named `leave_out_prefix*` are skipped."""
    for directory, subdirectories, files in os.walk(root):
        if leave_out_prefix and Path(directory) == root:
            subdirectories[:] = [name for name in subdirectories if not name.startswith(leave_out_prefix)]
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def _wait_for_every_process() -> None:
    """A barrier across the processes of a multi-GPU run; nothing to wait for in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class ResumableCheckpoints(TrainerCallback):
    """Marks each intermediate checkpoint resumable once the Trainer has saved all of it, and syncs it to
    disk first: a checkpoint cut off by a lost machine must not be taken for a whole one (the Trainer's
    own files are written in place and not synced). Every process writes its part (its RNG state, its
    optimizer shard), so all of them meet before and after the sync, and the first marks it."""

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if args.save_only_model:
            return  # nothing to resume from; the same setting in every process, so none waits below
        checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        _wait_for_every_process()  # every process has written its files
        if state.is_local_process_zero:  # one per machine, for what its processes wrote
            _sync_tree(checkpoint)
        _wait_for_every_process()  # every machine has synced them
        if not state.is_world_process_zero or not checkpoint.is_dir():
            return
        with open(checkpoint / RESUMABLE_FILE, "w", encoding="utf-8") as marker:
            marker.write(f"{state.global_step}\n")
            marker.flush()
            os.fsync(marker.fileno())
        fsync_path(checkpoint)


class ResumeConfirmation(TrainerCallback):
    """Writes RESUMED_FILE once a resumed run has ended its first step, by when the Trainer has loaded all of
    the checkpoint (weights, optimizer, scheduler, RNG, data position): a run that fails after that did
    not fail for its checkpoint, which the launcher then keeps (`TrainingRun._discard`)."""

    def __init__(self) -> None:
        self.confirmed = False

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        if not self.confirmed and state.is_world_process_zero:
            (Path(args.output_dir) / RESUMED_FILE).write_text(f"{state.global_step}\n", encoding="utf-8")
        self.confirmed = True

    on_train_end = on_step_end  # a checkpoint saved at the last step resumes into no step at all


def _wait_for_runners(stagings: Sequence[Path], timeout_s: float = 30.0) -> None:
    """Wait for the training processes of earlier attempts to end: the output's lock is free as soon as
    the process holding it dies, but a `kaizen` killed outright leaves its child writing for a few
    seconds more, until it notices (`models.lifetime`). TrainingRunError if one still runs then."""
    deadline = time.monotonic() + timeout_s
    for staging in stagings:
        try:
            runner = (staging / RUNNER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        while runner and process_is_running(runner):
            if time.monotonic() > deadline:
                raise TrainingRunError(f"another training process (pid {runner.partition(':')[0]}) is still writing "
                                       f"{staging}; stop it or wait for it to end")
            time.sleep(0.5)


def _continues(staging: Path, request: RunRequest) -> bool:
    """Whether a leftover staging directory is an earlier attempt at this request that left something to
    continue: a finished model (its launcher died while publishing) or a checkpoint."""
    try:
        earlier = RunRequest.from_json((staging / REQUEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return False
    finished = (staging / PROVENANCE_FILE).is_file()  # written last, after the model was synced
    return earlier.resume_identity() == request.resume_identity() and (finished or bool(complete_checkpoints(staging)))


def _prepare_resume(staging: Path) -> Path:
    """Clear what the failed attempt left besides its checkpoints; return the checkpoint to resume from."""
    (staging / FAILURE_FILE).unlink(missing_ok=True)
    (staging / RESUMED_FILE).unlink(missing_ok=True)  # that attempt's, from an earlier checkpoint
    complete = complete_checkpoints(staging)
    for path in staging.glob(f"{CHECKPOINT_PREFIX}*"):
        if path not in complete:  # cut off while saving: the Trainer would sort it among the real ones
            shutil.rmtree(path, ignore_errors=True)
    return complete[-1]


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a capture (pytest, a notebook)
        return False
    return True


def start_run(request: RunRequest) -> TrainingRun:
    """Start the training subprocess of a prepared request."""
    return TrainingRun(request)


def _train(kind: str, tables: Sequence[str | Path] | None, output_dir: str | Path, **options: Any) -> Path:
    timeout_s = options.pop("timeout_s", None)
    if timeout_s is not None and timeout_s <= 0:
        raise TrainingInputError(f"the timeout must be > 0 seconds, got {timeout_s:g}")
    return start_run(prepare_run(kind, tables=tables, output_dir=output_dir, **options)).wait(timeout_s)


def train_sft(
    tables: Sequence[str | Path] | None,
    output_dir: str | Path,
    *,
    recipe: str | Path | Mapping[str, Any] | TrainingSettings | None = None,
    base_model: str | None = None,
    previous_checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    timeout_s: float | None = None,
) -> Path:
    """Fine-tune the policy on `sft` tables (loss on completions only) in a subprocess; returns the checkpoint.

    Raises TrainingInputError before starting anything, TrainingRunError if the run fails.
    """
    return _train(
        "sft", tables, output_dir, recipe=recipe, base_model=base_model, previous_checkpoint=previous_checkpoint,
        overrides=overrides, overwrite=overwrite, timeout_s=timeout_s,
    )


def train_rl(
    prompt_tables: Sequence[str | Path] | None,
    output_dir: str | Path,
    *,
    recipe: str | Path | Mapping[str, Any] | TrainingSettings | None = None,
    base_model: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    rewards: Sequence[str] | None = None,
    overwrite: bool = False,
    timeout_s: float | None = None,
) -> Path:
    """Improve `base_model` (this round's SFT policy) with GRPO on prompt tables (prompt, answer[, prefix_kind]).

    `rewards` replaces the recipe's `training.rl.rewards` (see `models.rl`). Returns the checkpoint.
    Raises TrainingInputError before starting anything (no reward, no prompts, a COAT run whose
    policy lacks the meta-action tokens), TrainingRunError if the run fails.
    """
    overrides = {**(overrides or {}), **({"rewards": list(rewards)} if rewards is not None else {})}
    return _train(
        "rl", prompt_tables, output_dir, recipe=recipe, base_model=base_model, overrides=overrides,
        overwrite=overwrite, timeout_s=timeout_s,
    )


def train_ppm(
    tables: Sequence[str | Path] | None,
    output_dir: str | Path,
    *,
    recipe: str | Path | Mapping[str, Any] | TrainingSettings | None = None,
    base_model: str | None = None,
    previous_checkpoint: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    timeout_s: float | None = None,
) -> Path:
    """Train the PPM on `pairs` tables, starting from `base_model` (this round's SFT policy); returns the checkpoint.

    Raises TrainingInputError before starting anything, TrainingRunError if the run fails.
    """
    return _train(
        "ppm", tables, output_dir, recipe=recipe, base_model=base_model, previous_checkpoint=previous_checkpoint,
        overrides=overrides, overwrite=overwrite, timeout_s=timeout_s,
    )


# --- inside the training subprocess ------------------------------------------------------------


class ThroughputCallback(TrainerCallback):
    """Steady-state training tokens/s: from the end of optimizer step `skip_steps` to the end of training."""

    def __init__(self, skip_steps: int = 2) -> None:
        self.skip_steps = skip_steps
        self.tokens_per_second: float | None = None
        self._start: tuple[float, int] | None = None
        self._first_step = 0

    @staticmethod
    def _now() -> float:
        import torch

        # Kernels run asynchronously: only a synchronised clock says when the work was done.
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        self.tokens_per_second, self._start = None, None
        self._first_step = state.global_step  # a resumed run starts past 0

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == self._first_step + self.skip_steps:
            self._start = (self._now(), state.num_input_tokens_seen)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self._start is not None and state.global_step > self._first_step + self.skip_steps:
            started_at, tokens_before = self._start
            self.tokens_per_second = (state.num_input_tokens_seen - tokens_before) / (self._now() - started_at)


class _ChildInputError(Exception):
    """Bad input only the training process can detect (config values, an unloadable model)."""


def _load_dataset(kind: str, table_paths: Sequence[str]) -> Any:
    """The tables' text columns as one in-memory `datasets.Dataset` (other columns are provenance only,
    except those the RL rewards read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    optional = OPTIONAL_COLUMNS if kind == "rl" else ()
    in_all = set.intersection(*(set(pq.read_schema(path).names) for path in table_paths))
    columns = [*REQUIRED_COLUMNS[kind], *(name for name in optional if name in in_all)]
    parts = [pq.read_table(path, columns=columns).cast(pa.schema([(name, pa.large_string()) for name in columns]))
             for path in table_paths]
    return Dataset.from_dict(pa.concat_tables(parts).to_pydict())


def _load_model(kind: str, config: Any, start_model: str) -> tuple[Any, Any, int]:
    """Tokenizer and model (causal LM for SFT and RL, one-label classifier for the PPM) with the step tokens
    added, and how many of those tokens were new to the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from models.tiny import add_step_tokens
    from search.coat import COAT_TOKENS
    from search.steps import STEP_SPECIAL_TOKENS

    # GRPO left-pads its prompts, so RL needs the padding mask that Kaizen's training attention drops.
    attention = "sdpa" if kind == "rl" else register_training_attention()
    model_kwargs = {"attn_implementation": attention, "dtype": torch.float32, **(config.model_init_kwargs or {})}
    # Kaizen loads the model itself (the step tokens must go in first); TRL would only warn about these.
    config.model_init_kwargs = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(start_model)
        if kind == "rl" and config.step_format == "coat":
            require_coat_tokens(tokenizer, start_model)
        if kind in ("sft", "rl"):
            model = AutoModelForCausalLM.from_pretrained(start_model, **model_kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(start_model, num_labels=1, **model_kwargs)
    except RLSettingsError as err:
        raise _ChildInputError(str(err)) from err
    except (OSError, ValueError) as err:
        raise _ChildInputError(f"cannot load model {start_model!r}: {str(err).strip().splitlines()[0]}") from err
    # Format tuning (SFT) brings in the meta-action tokens; RL only uses them (checked above).
    tokens = STEP_SPECIAL_TOKENS + (COAT_TOKENS if config.step_format == "coat" and kind != "rl" else [])
    new_tokens = add_step_tokens(tokenizer, model, tokens) if config.add_step_tokens else 0
    if kind == "ppm":
        ensure_distinct_pad_token(tokenizer, model)
        if not (Path(start_model) / SCORING_FILE).is_file():
            _zero_value_head(model)
    return tokenizer, model, new_tokens


def _zero_value_head(model: Any) -> None:
    """Start a new value head at 0 so every step begins at tanh(0) = 0, where the squash is steepest.

    With a random head, the body's first Adam updates (sign-like, all weights at once) moved every
    value together far into tanh's flat tails (seen on a random-init 0.5B model on GPU), where the
    gradient vanishes and training stalls with all values at +-1. A zero head gives the body no
    gradient until the head has learnt a direction, so values grow from 0 as the ranking is learnt.
    """
    import torch

    with torch.no_grad():
        model.score.weight.zero_()


def _apply_lora(kind: str, config: Any, model: Any, new_tokens: int) -> Any:
    """Wrap the model in LoRA adapters; new step-marker embeddings (and their output rows) train in full.

    New markers start as the mean embedding, all alike, so frozen they could not be told apart.
    PEFT's per-token training (`trainable_token_indices`) would be lighter, but its wrapper hides
    the LM head's `bias`, which TRL's fused LM head reads; whole-matrix `modules_to_save` works.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import set_seed

    set_seed(config.seed)  # the adapters' initialisation; the Trainer seeds only after this
    causal = kind in ("sft", "rl")
    embeddings = ["embed_tokens", "lm_head"] if causal else ["embed_tokens"]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
        modules_to_save=embeddings if new_tokens else None,
        ensure_weight_tying=bool(new_tokens) and causal and model.config.get_text_config().tie_word_embeddings,
    )
    return get_peft_model(model, lora)


def _build_trainer(kind: str, config: Any, tokenizer: Any, model: Any, new_tokens: int, dataset: Any,
                   callbacks: list[Any]) -> Any:
    from trl import RewardTrainer, SFTTrainer

    if config.lora_r:
        model = _apply_lora(kind, config, model, new_tokens)
    if kind == "sft":
        return SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)
    if kind == "rl":
        from models.rl import build_grpo_trainer

        return build_grpo_trainer(config, tokenizer, model, dataset, callbacks)
    # After any LoRA wrapping, so the squash sits on the head that is actually called.
    attach_value_squash(model)
    if config.use_liger_kernel:
        # Liger's fused linear cross-entropy replaces the forward with one that projects through an LM
        # head, which the one-output PPM does not have; its layer kernels apply as they are.
        config.liger_kernel_config = {**(config.liger_kernel_config or {}), "fused_linear_cross_entropy": False}
    group_by_length = config.train_sampling_strategy == "group_by_length"
    if group_by_length:
        # RewardTrainer keeps only its signature columns, which would drop the lengths the sampler
        # reads; its collator ignores extra columns, so keeping them all is safe.
        config.remove_unused_columns = False
    max_length = config.max_length
    # Encoded here with the scorer's own function rather than by RewardTrainer, so that training and
    # scoring cannot drift apart (same EOS, same truncation side).

    def encode_pairs(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        prompts = batch["prompt"]
        chosen = encode_texts(tokenizer, [p + c for p, c in zip(prompts, batch["chosen"], strict=True)], max_length)
        rejected = encode_texts(tokenizer, [p + r for p, r in zip(prompts, batch["rejected"], strict=True)], max_length)
        encoded: dict[str, list[Any]] = {"chosen_ids": chosen, "rejected_ids": rejected}
        if group_by_length:
            encoded[config.length_column_name] = [len(c) + len(r) for c, r in zip(chosen, rejected, strict=True)]
        return encoded

    dataset = dataset.map(
        encode_pairs, batched=True, remove_columns=list(REQUIRED_COLUMNS["ppm"]), num_proc=config.dataset_num_proc
    )
    return RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)


def _save(trainer: Any, config: Any, tokenizer: Any, staging: Path) -> None:
    if not config.lora_r:
        trainer.save_model(str(staging))
    elif trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    if trainer.is_world_process_zero() and config.save_dtype != "float32":
        cast_saved_weights(staging, config.save_dtype)


def cast_saved_weights(checkpoint: Path, dtype_name: str) -> None:
    """Rewrite a saved checkpoint's floating-point weights in `dtype_name`, one safetensors file at a time.

    The trainers keep float32 master weights and save them as they are; cast afterwards, so the same
    code serves plain, FSDP-gathered and LoRA-merged saves. Each file is replaced atomically, and
    the whole checkpoint is still in its staging directory, invisible to readers, while this runs.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    total = 0
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: (t.to(dtype) if (t := handle.get_tensor(name)).is_floating_point() else t)
                       for name in handle.keys()}
        total += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=metadata)
    _rewrite_json(checkpoint / "config.json", lambda config: {**config, "dtype": dtype_name})
    # A sharded checkpoint's index records the weights' total size in bytes.
    _rewrite_json(
        checkpoint / "model.safetensors.index.json",
        lambda index: {**index, "metadata": {**index.get("metadata", {}), "total_size": total}},
    )


def _rewrite_json(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    if path.is_file():
        write_json(path, change(json.loads(path.read_text(encoding="utf-8"))), indent=2)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("kaizen", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _hardware() -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "platform": platform.platform()}
    if torch.cuda.is_available():
        record["device"] = torch.cuda.get_device_name(0)
        record["cuda"] = torch.version.cuda
    else:
        record["device"] = "cpu"
    return record


def _write_provenance(request: RunRequest, config: Any, trainer: Any, train_metrics: dict[str, Any],
                      throughput: ThroughputCallback, staging: Path, resumed_from_step: int | None) -> None:
    import torch

    state = trainer.state
    metrics = {**train_metrics, "global_step": state.global_step, "num_input_tokens_seen": state.num_input_tokens_seen}
    metrics["tokens_per_second"] = throughput.tokens_per_second
    if torch.cuda.is_available():
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    record = {
        "kind": request.kind,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": request.base_model,
        "start_model": request.start_model_record,
        "init_from": request.config.get("init_from", "base"),
        "tables": [dataclasses.asdict(table) for table in request.tables],
        "config": request.config,
        "training_args": json.loads(config.to_json_string()),
        "metrics": metrics,
        "resumed_from_step": resumed_from_step,  # None: trained in one go
        "log_history": state.log_history,
        "versions": _versions(),
        "hardware": _hardware(),
    }
    if request.kind == "ppm":
        record["value"] = ScoringContract.load(staging).value
    # Written last and atomically: its presence marks the checkpoint complete.
    write_json(staging / PROVENANCE_FILE, record, indent=2, default=str)


def run_training(request: RunRequest, staging: Path) -> None:
    """Train, save into `staging` and write provenance there (the body of the subprocess)."""
    # Loss curves live inside the checkpoint, next to the weights they describe.
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(staging / LOG_DIR)
    values = {**request.config, "output_dir": str(staging)}
    try:
        config = CONFIG_CLASSES[request.kind](**values)
    except (TypeError, ValueError) as err:
        raise _ChildInputError(f"invalid {request.kind} config: {str(err).strip().splitlines()[0]}") from err
    tokenizer, model, new_tokens = _load_model(request.kind, config, request.start_model)
    if request.kind == "ppm" and config.max_length is None:
        # The scorer needs a bound; RewardTrainer's `None` means the model's own limit.
        config.max_length = model.config.max_position_embeddings
    dataset = _load_dataset(request.kind, [table.path for table in request.tables])
    checkpoints = complete_checkpoints(staging)  # left by an earlier attempt at this request (TrainingRun)
    resume_from = checkpoints[-1] if checkpoints else None
    throughput = ThroughputCallback()
    callbacks = [throughput, ResumableCheckpoints(), *([ResumeConfirmation()] if resume_from else [])]
    trainer = _build_trainer(request.kind, config, tokenizer, model, new_tokens, dataset, callbacks)
    train_metrics = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).metrics
    _save(trainer, config, tokenizer, staging)
    if trainer.is_world_process_zero():
        if request.kind == "ppm":
            ScoringContract(max_length=config.max_length).save(staging)
        # On disk before the provenance says the model is finished: a launcher that dies before
        # publishing leaves it to the next run to publish as it is (TrainingRun).
        _sync_tree(staging, leave_out_prefix=CHECKPOINT_PREFIX)
        resumed_step = checkpoint_step(resume_from) if resume_from else None
        _write_provenance(request, config, trainer, train_metrics, throughput, staging, resumed_step)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the training subprocess: `python -m models.training sft|ppm|rl --config REQUEST.json`."""
    parser = argparse.ArgumentParser(prog="python -m models.training", description="Run one training job (internal).")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--config", required=True, type=Path, help="request JSON written by the launcher")
    args = parser.parse_args(argv)
    stop_when_parent_gone()
    request = RunRequest.from_json(args.config.read_text(encoding="utf-8"))
    staging = args.config.parent
    try:
        run_training(request, staging)
    except _ChildInputError as err:  # the launcher reports it, in its own one line
        (staging / FAILURE_FILE).write_text(f"{err}\n", encoding="utf-8")
        return INPUT_ERROR_EXIT
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        (staging / FAILURE_FILE).write_text(f"{type(err).__name__}: {first_line}\n", encoding="utf-8")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
