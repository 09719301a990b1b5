"""In-process generation with transformers: the CPU default backend of the policy `Generator`.

One `generate` call serves many prompts: prompts are sorted by length and cut into left-padded
batches; every (prompt, sample) pair of a batch becomes a row of one `model.generate` with the KV
cache. Each prompt is prefilled once and its cache copied to its samples' rows, so n samples cost
one prompt's prefill, not n (in a search, prompts grow with depth and prefill is much of the
work). A row stops at the first stop string (kept at the end of its text, as vLLM's
`include_stop_str_in_output` does), at EOS, or after `max_tokens` tokens. Sampling is seeded per
call and batch, so a generator built with the same seed replays the same sequence of calls.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from models.tiny import load_causal_lm
from search.policy import Completion, Generator


def _stop_end(text: str, stop: Sequence[str]) -> int | None:
    """End index of the earliest-ending stop string in `text`, or None."""
    ends = [index + len(s) for s in stop if (index := text.find(s)) >= 0]
    return min(ends) if ends else None


class _StopStringsCriteria(StoppingCriteria):
    """Stops each row as soon as its generated text (never the prompt) contains a stop string.

    Only a window of the newest tokens is decoded per step: a stop string of b bytes spans at most
    b tokens, and anything older was already checked on an earlier step. `stopped_at[row]` records
    how many tokens the row had generated when it stopped.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int, batch: int) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.prompt_length = prompt_length
        self.window = max(len(s.encode()) for s in self.stop)
        self.stopped_at: list[int | None] = [None] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        start = max(self.prompt_length, input_ids.shape[1] - self.window)
        live = [row for row, stopped in enumerate(self.stopped_at) if stopped is None]
        tails = self.tokenizer.batch_decode(input_ids[live, start:].tolist(), skip_special_tokens=True)
        for row, tail in zip(live, tails):
            if _stop_end(tail, self.stop) is not None:
                self.stopped_at[row] = generated
        return torch.tensor([stopped is not None for stopped in self.stopped_at], device=input_ids.device)


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class HFGenerator:
    """A `Generator` running a causal LM in this process (CPU by default)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: Any = None,
        batch_size: int = 64,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        """Load `model_dir` (raises models.tiny.ModelLoadError with a one-line message if it does not load).

        `batch_size` counts sequences (prompt x sample rows) per forward batch (at least one
        prompt's samples, which always share a batch); `dtype` defaults to
        float32 on CPU and bfloat16 on GPU. `threads` sets torch's intra-op threads while generating
        (process-wide, restored afterwards). None: on CPU all of torch's threads but one, off CPU
        torch's setting. The spare core is for the sandbox and grader workers, which run while
        the search generates: an OpenMP thread that loses its core to them stalls every decoding
        step at the next barrier (on 2 cores, two threads made the search 5-8x slower than one).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model, self.tokenizer = load_causal_lm(model_dir, device=device, dtype=dtype)
        self.device = device
        self.batch_size = batch_size
        self.seed = seed
        if threads is None and device == "cpu":
            threads = max(1, torch.get_num_threads() - 1)
        self.threads = threads
        self._calls = 0
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self._eos_ids: set[int] = set(eos) if isinstance(eos, list) else {eos}

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        stop: Sequence[str],
        temperature: float,
        max_tokens: int,
    ) -> list[list[Completion]]:
        """For each prompt in order, its `n` completions; greedy (temperature 0) samples are computed once."""
        if n < 1 or max_tokens < 1 or temperature < 0:
            raise ValueError("n and max_tokens must be positive and temperature non-negative")
        call = self._calls
        self._calls += 1
        if not prompts:
            return []
        samples = 1 if temperature == 0 else n
        # Special tokens (a BOS for models that want one) are added exactly as vLLM's server adds them.
        encoded = self.tokenizer(list(prompts))["input_ids"]
        # Longest first: similar lengths share a batch (little padding) and memory peaks early.
        order = sorted(range(len(prompts)), key=lambda p: -len(encoded[p]))
        prompts_per_batch = max(1, self.batch_size // samples)
        results: dict[int, list[Completion]] = {}
        with torch.inference_mode(), _intra_op_threads(self.threads):
            for batch_index, start in enumerate(range(0, len(order), prompts_per_batch)):
                batch = order[start : start + prompts_per_batch]
                batch_seed = random.Random(f"{self.seed}/{call}/{batch_index}").getrandbits(63)
                completions = self._generate_batch(
                    [encoded[p] for p in batch], samples, batch_seed, stop, temperature, max_tokens
                )
                for position, p in enumerate(batch):
                    results[p] = completions[position * samples : (position + 1) * samples]
        # Greedy samples are all the same: computed once, repeated.
        return [results[p] * (n // samples) for p in range(len(prompts))]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        samples: int,
        seed: int,
        stop: Sequence[str],
        temperature: float,
        max_tokens: int,
    ) -> list[Completion]:
        """`samples` completions of each prompt, prompt by prompt."""
        width = max(len(ids) for ids in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device
        )
        cache = self._shared_prefill(input_ids, attention_mask, samples) if samples > 1 and width > 1 else None
        input_ids = input_ids.repeat_interleave(samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(samples, dim=0)
        # Plain temperature sampling, as vLLM does when asked for it: override the model's own
        # generation defaults (top-k 50, nucleus, repetition penalty of chat checkpoints).
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "typical_p": 1.0}
            if temperature > 0
            else {"do_sample": False}
        )
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            repetition_penalty=1.0,
            pad_token_id=pad,
            eos_token_id=sorted(self._eos_ids),
            use_cache=True,
            **sampling,
        )
        rows = len(input_ids)
        criteria = _StopStringsCriteria(self.tokenizer, stop, width, rows) if stop else None
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else [torch.device(self.device)]):
            torch.manual_seed(seed)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([criteria] if criteria else []),
            )
        generated = output[:, width:].tolist()
        stopped_at = criteria.stopped_at if criteria else [None] * rows
        return [self._completion(tokens, stopped, stop) for tokens, stopped in zip(generated, stopped_at)]

    def _shared_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> DynamicCache:
        """The KV cache of every prompt but its last token, computed once and repeated for each sample.
        `generate` then runs only the last token per row: it sees a cache shorter than its inputs."""
        cache = DynamicCache(config=self.model.config)
        # Left padding: positions count real tokens only, as `generate` counts them.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        self.model(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids[:, :-1],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(samples)
        return cache

    def _completion(self, tokens: list[int], stopped_at: int | None, stop: Sequence[str]) -> Completion:
        """Cut a row's generated tokens at its stop string, else at EOS, else it ran out of tokens."""
        if stopped_at is not None:
            text = self._decode(tokens[:stopped_at])
            return Completion(text[: _stop_end(text, stop)], stopped_at, "stop")
        eos_index = next((i for i, token in enumerate(tokens) if token in self._eos_ids), None)
        if eos_index is not None:
            # The EOS token counts as generated (vLLM counts it too) but is not part of the text.
            return Completion(self._decode(tokens[:eos_index]), eos_index + 1, "stop")
        return Completion(self._decode(tokens), len(tokens), "length")

    def _decode(self, tokens: list[int]) -> str:
        # Byte-level tokens can end inside a UTF-8 character; like vLLM's incremental detokenizer,
        # leave such an unfinished character out instead of writing replacement characters.
        return self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


@dataclass(frozen=True)
class Throughput:
    """Tokens generated per second by one backend on one workload (the median of several runs)."""

    tokens_per_s: float
    tokens: int
    seconds: float
    runs: int


def measure_throughput(
    generator: Generator,
    prompts: Sequence[str],
    *,
    n: int,
    max_tokens: int,
    temperature: float = 1.0,
    stop: Sequence[str] = (),
    runs: int = 3,
) -> Throughput:
    """Plain batched generation speed of any backend: one warm-up call, then the median of `runs` calls."""
    generator.generate(prompts[:1], n=1, stop=stop, temperature=temperature, max_tokens=max_tokens)
    measured = []
    for _ in range(runs):
        started = time.perf_counter()
        completions = generator.generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens)
        seconds = time.perf_counter() - started
        tokens = sum(completion.num_tokens for samples in completions for completion in samples)
        measured.append((tokens / seconds, tokens, seconds))
    tokens_per_s, tokens, seconds = sorted(measured)[len(measured) // 2]
    return Throughput(tokens_per_s, tokens, seconds, runs)
