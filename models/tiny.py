"""Tiny models built locally: a byte-level BPE tokenizer and a randomly initialised causal LM.

Tests, benchmarks and the default demo need a policy without a model hub, so this module trains a
tokenizer on a small corpus in the rStar step format (plus the local training problems when they
are present) and pairs it with a few-million-parameter Llama or Qwen2 model. The same helpers load
real checkpoints (`load_causal_lm`) and give them the step-format tokens (`add_step_tokens`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_store.home import shared_data_dir
from data_store.parquet import check_output_directory
from search.arguments import OneLineParser, field_help
from search.steps import STEP_SPECIAL_TOKENS, SolutionStep, render_trajectory

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

# No roles, no markup: the step format's own prompt template carries the turn structure.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

# vLLM's CPU attention kernels need at least this head size.
MIN_HEAD_DIM = 32

ARCHITECTURES = ("llama", "qwen2")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message is one line naming the model."""


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of a tiny causal LM; the defaults give about 2M parameters, trainable on 2 CPU cores."""

    vocab_size: int = field(default=4096, metadata={"help": "target BPE vocabulary size (a small corpus may give fewer)"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    num_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=2, metadata={"help": f"attention heads; hidden_size / num_heads must be >= {MIN_HEAD_DIM}"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    max_positions: int = field(default=4096, metadata={"help": "longest sequence (prompt + solution) in tokens"})
    architecture: str = field(default="llama", metadata={"help": f"one of {', '.join(ARCHITECTURES)}"})
    initializer_range: float = field(
        default=0.1,
        metadata={"help": "std of the random weights; at the usual 0.02 greedy output is a constant newline stream, whatever the prompt"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the synthetic corpus and of the weight initialisation"})

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.initializer_range <= 1:
            raise ValueError(f"initializer_range must be in [0, 1], got {self.initializer_range}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size // self.num_heads < MIN_HEAD_DIM:
            raise ValueError(
                f"head size {self.hidden_size // self.num_heads} is below {MIN_HEAD_DIM} (vLLM's CPU attention needs it);"
                " use fewer heads or a wider model"
            )


# --- corpus ------------------------------------------------------------------------------------

_OBJECTS = ["apples", "marbles", "books", "eggs", "coins", "tickets", "pencils", "cookies", "cards", "stamps"]
_NAMES = ["Alice", "Ben", "Carla", "Dmitri", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal"]
_MATH_SNIPPETS = [
    "from sympy import symbols, solve, Rational, sqrt, simplify, factorial, binomial\nx = symbols('x')",
    "solutions = solve(x**2 - {a}*x + {b}, x)",
    "value = Rational({a}, {b}) + sqrt({c})",
    "import math\nangle = math.radians({a})\nresult = math.sin(angle) ** 2 + math.cos(angle) ** 2",
    "count = sum(1 for n in range(1, {a}) if n % {b} == 0)",
    "def f(n):\n    return n * (n + 1) // 2\ntotal = f({a})",
    "probability = Rational({b}, {a} + {b})",
    "area = Rational(1, 2) * {a} * {b}",
]
_LATEX_ANSWERS = ["\\frac{{{a}}}{{{b}}}", "{a}\\sqrt{{{c}}}", "{a}^{{{c}}}", "\\pi r^2 = {a}\\pi", "{a}"]


def _synthetic_trajectory(rng: random.Random) -> str:
    """One made-up problem with a solution in the step format: numbers, code idioms, LaTeX answers."""
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 9)
    name, thing = rng.choice(_NAMES), rng.choice(_OBJECTS)
    question = f"{name} has {a} {thing} and buys {b} boxes with {c} {thing} each. How many {thing} does {name} have now?"
    total = a + b * c
    snippet = rng.choice(_MATH_SNIPPETS).format(a=a, b=b, c=c)
    steps = [
        SolutionStep(f"# Step 1: Count the {thing} in the boxes\nbought = {b} * {c}\n<end_of_step>"),
        SolutionStep(f"# Step 2: Add the {thing} {name} already had\ntotal = {a} + bought\n<end_of_step>"),
        SolutionStep(f"# Step 3: Check with a second computation\n{snippet}\n<end_of_step>"),
        SolutionStep("# Now print the final answer\nprint(total)\n<end_of_code>", output=str(total)),
        SolutionStep(
            f"<answer>{name} has \\boxed{{{total}}} {thing}; in general ${rng.choice(_LATEX_ANSWERS).format(a=a, b=b, c=c)}$."
            "<end_of_answer>"
        ),
    ]
    return render_trajectory(question, steps)


def _shared_problem_texts(data_dir: Path) -> Iterator[str]:
    """Problems and reference solutions of the local *training* files (never the test sets)."""
    for path in sorted(data_dir.glob("*train*.jsonl")):
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                for key in ("problem", "solution"):
                    if isinstance(record.get(key), str):
                        yield record[key]


def default_corpus(
    *, seed: int = 0, synthetic_examples: int = 4000, include_shared: bool = True, data_dir: Path | None = None
) -> Iterator[str]:
    """Synthetic step-format trajectories, then (if wanted and present) the shared training problems."""
    rng = random.Random(seed)
    for _ in range(synthetic_examples):
        yield _synthetic_trajectory(rng)
    data_dir = shared_data_dir() if data_dir is None else data_dir
    if include_shared and data_dir.is_dir():
        yield from _shared_problem_texts(data_dir)


# --- tokenizer and model -----------------------------------------------------------------------


def _step_added_tokens(tokens: Iterable[str]) -> list[Any]:
    from tokenizers import AddedToken

    # Not `special`: decoders (vLLM's included) drop special tokens by default, which would erase the
    # step markers from generated text and stop strings would never match. Added tokens are still
    # matched before BPE, so each marker is always exactly one token.
    return [AddedToken(token, special=False, normalized=False) for token in tokens]


def train_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int,
    model_max_length: int,
    step_tokens: Sequence[str] = STEP_SPECIAL_TOKENS,
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (digits split one by one, as in Qwen) with bos/eos/pad and the step markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN])
    backend.add_tokens(_step_added_tokens(step_tokens))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return tokenizer


def _model_config(config: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[config.architecture]
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        initializer_range=config.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus: Iterable[str] | None = None,
    config: TinyModelConfig | None = None,
    step_tokens: Sequence[str] = STEP_SPECIAL_TOKENS,
    overwrite: bool = False,
    **shape: int | str,
) -> Path:
    """Train a tokenizer, initialise a model, and save both to `out_dir` in Hugging Face format.

    `shape` overrides fields of `config` (e.g. `hidden_size=256, seed=1`). The directory appears
    complete or not at all (written under a temporary name, then renamed). `corpus` defaults to
    `default_corpus(seed=config.seed)`.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = replace(config or TinyModelConfig(), **shape)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite, or overwrite=True, to replace it)")
    tokenizer = train_tokenizer(
        default_corpus(seed=config.seed) if corpus is None else corpus,
        vocab_size=config.vocab_size,
        model_max_length=config.max_positions,
        step_tokens=step_tokens,
    )
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(_model_config(config, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is swapped out first and deleted afterwards."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def add_step_tokens(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel | None = None,
    tokens: Sequence[str] = STEP_SPECIAL_TOKENS,
) -> int:
    """Give a tokenizer (and its model) every step-format marker (or `tokens`) as a single token; returns how many new ids.

    New embedding rows start at the mean of the existing ones. The embedding matrix only grows:
    real checkpoints (Qwen2.5) reserve spare rows, and shrinking them would change the model.
    """
    # A marker that is only a BPE merge can still be split in context: it must be an added token.
    registered = tokenizer.get_added_vocab()
    missing = [token for token in tokens if token not in registered]
    added = tokenizer.add_tokens(_step_added_tokens(missing)) if missing else 0
    if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return added


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PPM_SCORING_FILE = "ppm_scoring.json"
"""What marks a PPM checkpoint (models.ppm writes it)."""


def is_hub_name(name: str) -> bool:
    """Whether `name` has the `org/model` form of a hub name; anything else is taken as a local path."""
    return not name.startswith((".", "/", "~")) and bool(_HUB_NAME.fullmatch(name))


def is_missing_local_model(name_or_dir: str | Path) -> bool:
    """True when `name_or_dir` is meant as a local path (not an `org/model` hub name) and nothing is there."""
    name = str(name_or_dir)
    return not Path(name).expanduser().exists() and not is_hub_name(name)


def require_model_source(name_or_dir: str | Path, what: str = "model") -> None:
    """ModelLoadError for a path with nothing there that is not an `org/model` hub name either."""
    if is_missing_local_model(name_or_dir):
        raise ModelLoadError(
            f"cannot load {what} {str(name_or_dir)!r}: no such directory (and not an org/model hub name)")


def check_policy_source(name_or_dir: str | Path) -> None:
    """ModelLoadError, before anything loads, for what cannot be a policy: a path with nothing there, a
    directory without config.json, or a PPM checkpoint (a swapped --model / --ppm)."""
    name = str(name_or_dir)
    path = Path(name).expanduser()
    require_model_source(name)
    if path.is_dir() and (path / PPM_SCORING_FILE).is_file():
        raise ModelLoadError(f"{name} is a PPM checkpoint ({PPM_SCORING_FILE}); the policy is an SFT checkpoint")
    if path.exists() and not (path / "config.json").is_file():
        raise ModelLoadError(f"cannot load model {name!r}: not a Hugging Face model directory (no config.json)")


def load_causal_lm(
    name_or_dir: str | Path, *, device: str = "cpu", dtype: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (a local directory or a hub name) for inference.

    `dtype` defaults to float32 on CPU and bfloat16 elsewhere. Any failure becomes a ModelLoadError
    whose message is one line; the original exception stays chained for debugging.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_dir)
    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    check_policy_source(name)
    name = str(Path(name).expanduser()) if name.startswith("~") else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device)
    except Exception as err:  # noqa: BLE001 - the boundary where any loading failure becomes one message
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot load model {name!r}: {type(err).__name__}: {reason}") from err
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def parameter_count(model: PreTrainedModel) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


# --- CLI ---------------------------------------------------------------------------------------


def cli_tiny_model(argv: list[str]) -> int:
    """`kaizen tiny-model --out DIR`: build the tiny tokenizer and model."""
    defaults = TinyModelConfig()
    parser = OneLineParser(prog="kaizen tiny-model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to create (Hugging Face format)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    for option in fields(TinyModelConfig):
        default = getattr(defaults, option.name)
        parser.add_argument(
            f"--{option.name.replace('_', '-')}",
            type=type(default),
            default=default,
            choices=ARCHITECTURES if option.name == "architecture" else None,
            help=field_help(TinyModelConfig, option.name, show_default=True),
        )
    args = parser.parse_args(argv)
    try:
        check_output_directory(args.out)
        config = TinyModelConfig(**{option.name: getattr(args, option.name) for option in fields(TinyModelConfig)})
        out_dir = build_tiny_model(args.out, config=config, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        # build_tiny_model's refusal of an existing directory also names its Python argument.
        message = (f"{args.out} already exists (pass --overwrite to replace it)"
                   if isinstance(err, FileExistsError) else err)
        print(f"kaizen tiny-model: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}")
    return 0
