"""The process preference model (PPM): how its inputs are encoded, what its value means, and a batched scorer.

A PPM checkpoint is a one-label sequence-classification model (Hugging Face format) trained with the
pairwise Bradley-Terry loss. Its value for a text is `tanh(logit)`, in [-1, 1] like a Q-value, and
that squash is part of the model during training too: `attach_value_squash` hooks `tanh` onto the
classification head, so TRL's `RewardTrainer` computes `-log sigmoid(v_chosen - v_rejected)` on the
very values the search later reads. (rStar-Math's official code trained on raw logits and squashed
only at inference; the loss ignores any offset common to all logits, so tanh of them is anchored
nowhere and can put every step near +1 or -1.)

Texts are encoded one way for training and scoring (`encode_texts`): tokenizer defaults, EOS
appended, and, when longer than `max_length`, cut from the left so the step being judged and the
EOS the head reads survive. The checkpoint's `ppm_scoring.json` records that contract.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.tiny import PPM_SCORING_FILE
from search.arguments import OneLineParser
from search.jsonl import iter_jsonl

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCORING_FILE = PPM_SCORING_FILE
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class ScoringContract:
    """How a PPM checkpoint turns text into a value; written next to the weights at training time."""

    max_length: int = field(metadata={"help": "longest input in tokens; longer texts lose their start"})
    value: str = field(default="tanh(logit)", metadata={"help": "the value a text gets from the head's one logit"})
    truncation_side: str = field(default="left", metadata={"help": "which end of an over-long text is cut"})
    eos_appended: bool = field(default=True, metadata={"help": "an EOS token closes every text; the head reads it"})

    def save(self, checkpoint_dir: str | Path) -> None:
        Path(checkpoint_dir, SCORING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> ScoringContract:
        """The checkpoint's contract; ValueError, in one line, for one this scorer does not implement
        (it always applies tanh, cuts the start and appends EOS: anything else would score silently wrong)."""
        path = Path(checkpoint_dir, SCORING_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint_dir} is not a Kaizen PPM checkpoint (no {SCORING_FILE})")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            contract = cls(**data)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a scoring contract ({str(err).splitlines()[0]})") from None
        implemented = cls(max_length=contract.max_length)
        if contract != implemented:
            raise ValueError(f"{path}: {contract} is not what this scorer implements ({implemented})")
        return contract


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text as the PPM sees it: EOS-terminated, at most `max_length` tokens, start cut first."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the PPM tokenizer has no EOS token")
    if not texts:  # tokenizers refuse an empty batch, and a reward batch may have nothing to score
        return []
    encoded = []
    for ids in tokenizer(list(texts))["input_ids"]:
        if not ids or ids[-1] != eos_id:
            ids = [*ids, eos_id]
        encoded.append(ids[-max_length:])
    return encoded


def ensure_distinct_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token that differs from EOS, and tell the model which it is.

    A sequence-classification head reads the last token that is not padding. With pad == EOS (the
    Qwen2.5 base models) it would skip the EOS we append and read the token before it.
    """
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id


def squash(logits: torch.Tensor) -> torch.Tensor:
    """The PPM value of a raw head logit, in float32 (bf16 rounds tanh to exactly +-1 from |logit| ~ 3.5 on,
    where its gradient is exactly zero and the head can never recover)."""
    import torch

    return torch.tanh(logits.float())


def attach_value_squash(model: PreTrainedModel) -> Any:
    """Make the model's classification head output `squash(logit)`; returns the hook handle.

    A forward hook rather than a new module keeps the saved weights a standard one-label
    classifier that vLLM, TRL and transformers load as is.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None)
    if head is None:
        raise TypeError(f"{type(base).__name__} has no `score` head; expected a sequence-classification model")
    return head.register_forward_hook(lambda _module, _inputs, logits: squash(logits))


def _token_budget_batches(lengths: Sequence[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Indices grouped longest first so that (longest in batch) x (batch size) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batch: list[int] = []
    for index in order:
        # The first (longest) element of a batch sets the padded width of all of it.
        width = lengths[batch[0]] if batch else lengths[index]
        if batch and width * (len(batch) + 1) > max_batch_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


class PPMScorer:
    """Scores (prompt + partial solution) texts with a PPM checkpoint; implements `search.policy.StepScorer`."""

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_tokens: int = 32768,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from models.backends import resolve_device

        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")

        self.device = resolve_device(device)
        self.contract = ScoringContract.load(checkpoint_dir)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if self.device == "cpu" else torch.bfloat16)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(checkpoint_dir, dtype=torch_dtype)
        self.model.to(self.device).eval()
        attach_value_squash(self.model)
        self.max_batch_tokens = max_batch_tokens

    def score(self, texts: Sequence[str]) -> list[float]:
        """One value in [-1, 1] per text, in order."""
        import torch

        encoded = encode_texts(self.tokenizer, texts, self.contract.max_length)
        values = [0.0] * len(encoded)
        pad_id = self.tokenizer.pad_token_id
        for batch in _token_budget_batches([len(ids) for ids in encoded], self.max_batch_tokens):
            width = len(encoded[batch[0]])
            # Right padding, as the training collator does.
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = encoded[index]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            with torch.inference_mode():
                output = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            for index, value in zip(batch, output.logits[:, 0].float().tolist(), strict=True):
                values[index] = value
        return values

    def release(self) -> None:
        """Free the model's memory now: a long-lived flow process would keep it cached on the GPU
        through the training stages that follow."""
        import torch

        self.model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _read_jsonl_texts(path: str, text_field: str) -> tuple[list[Any], list[str]]:
    """Rows of a JSONL file (`-`: stdin, as `kaizen grade` reads it) and the text of each: the row itself when
    it is a string, else `row[text_field]`."""
    rows, texts = [], []
    try:
        stream = sys.stdin.buffer if path == "-" else Path(path).open("rb")
    except OSError as err:  # the reason in words: "No such file or directory", "Is a directory"
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    with stream as lines:
        for where, row in iter_jsonl(lines, path):
            text = row if isinstance(row, str) else row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{where}: expected a string or an object with a string {text_field!r}")
            rows.append(row)
            texts.append(text)
    return rows, texts


def cli_score(argv: list[str]) -> int:
    """`kaizen score --ppm DIR --jsonl FILE`: print each row with its PPM value as JSON lines."""
    parser = OneLineParser(prog="kaizen score", description="Score texts with a PPM checkpoint.")
    parser.add_argument("--ppm", required=True, type=Path, help="PPM checkpoint directory (from `kaizen train ppm`)")
    parser.add_argument("--jsonl", required=True, metavar="FILE",
                        help="input: one JSON string or object per line; - for stdin")
    parser.add_argument("--field", default="text", help="object field holding the text (default: text)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--max-batch-tokens", type=int, default=32768, help="padded tokens per forward pass")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"kaizen score: error: {message}", file=sys.stderr)
        return 2

    try:
        rows, texts = _read_jsonl_texts(args.jsonl, args.field)
        scorer = PPMScorer(args.ppm, device=args.device, max_batch_tokens=args.max_batch_tokens)
    except (ValueError, OSError) as err:
        return fail(str(err).splitlines()[0])
    for row, value in zip(rows, scorer.score(texts), strict=True):
        record = {"text": row, "ppm_score": value} if isinstance(row, str) else {**row, "ppm_score": value}
        print(json.dumps(record, ensure_ascii=False))
    return 0
