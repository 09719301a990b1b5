"""In-process generation with transformers: the CPU default backend of the policy `Generator`.

One `generate` call serves many prompts: prompts are sorted by length and cut into left-padded
batches; every (prompt, sample) pair of a batch becomes a row of one decoding loop over the KV
cache. Each prompt is prefilled once and its cache copied to its samples' rows, so n samples cost
one prompt's prefill, not n (in a search, prompts grow with depth and prefill is much of the
work). The key/value states of recent prompts are also kept (`PrefixKVCache`): a search's next
prompts extend the ones it just sent by one step, so only that step is prefilled. A row stops at the first stop string (kept at the end of its text, as vLLM's
`include_stop_str_in_output` does), at EOS, or after `max_tokens` tokens, and leaves the batch
when it stops. Each sampled row draws from a stream of its own, seeded by its prompt
(`search.policy.PromptSeeds`) and its sample number; the global torch RNG is left alone. A prompt's
samples thus depend on the seed, the prompt and how often it was sampled before, not on the other
prompts of its call or batch.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from models.tiny import load_causal_lm
from search.policy import Completion, Generator, PromptSeeds, check_generation_request


def _stop_end(text: str, stop: Sequence[str]) -> int | None:
    """End index of the earliest-ending stop string in `text`, or None."""
    ends = [index + len(s) for s in stop if (index := text.find(s)) >= 0]
    return min(ends) if ends else None


def _sample_tokens(logits: torch.Tensor, temperature: float, streams: Sequence[random.Random]) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else plain temperature sampling (no top-k/top-p),
    row i drawing from `streams[i]`.

    Sampling inverts each row's cumulative distribution at one uniform draw (`torch.multinomial`
    took ~1 ms for 64 rows of a 919-token vocabulary on this CPU, a fifth of a decoding step;
    this takes ~0.1 ms).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.tensor([[stream.random()] for stream in streams], dtype=torch.float64, device=probabilities.device)
    return _invert_cdf(probabilities, draws)


def _invert_cdf(probabilities: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """For each row, the token at which its cumulative distribution passes `draws` (in [0, 1)) x its total.

    The sum runs in float64: in float32, a 150k-token vocabulary's running sum rounds away every
    token below ~3e-8. Scaling by the row's own total keeps rounding from running past the last
    token, and `right=True` never stops on a token of probability zero.
    """
    cumulative = probabilities.double().cumsum(dim=-1)
    totals = cumulative[:, -1:]
    if not bool((torch.isfinite(totals) & (totals > 0)).all()):
        raise ValueError("cannot sample: the logits have NaN or infinite values, or no token has any probability")
    return torch.searchsorted(cumulative, draws * totals, right=True).squeeze(-1)


class _AppendInPlaceLayer(DynamicLayer):
    """A KV cache layer that appends into spare room reserved up front instead of concatenating.

    `DynamicLayer` copies the whole cache on every decoding step (`torch.cat`): with 100-300 cached
    tokens a decoding step of the tiny model took 1.5-1.7x as long. Here a step writes one position;
    the buffer is reallocated only when the reserve runs out. `keys`/`values` are views of the
    filled part, as attention reads them.
    """

    def __init__(self, reserve: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reserve = reserve
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self._key_buffer is None or self.length + new > self._key_buffer.shape[-2]:
            self._key_buffer = self._grown(self._key_buffer, key_states, self.length + new + self.reserve)
            self._value_buffer = self._grown(self._value_buffer, value_states, self.length + new + self.reserve)
        assert self._value_buffer is not None
        self._key_buffer[:, :, self.length : self.length + new] = key_states
        self._value_buffer[:, :, self.length : self.length + new] = value_states
        self.length += new
        self._refresh_views()
        return self.keys, self.values

    def _grown(self, buffer: torch.Tensor | None, states: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, head_dim = states.shape
        grown = states.new_empty(batch, heads, capacity, head_dim)
        if buffer is not None and self.length:
            grown[:, :, : self.length] = buffer[:, :, : self.length]
        return grown

    def _refresh_views(self) -> None:
        assert self._key_buffer is not None and self._value_buffer is not None
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]

    def preload(self, like: torch.Tensor, batch: int, past: int, upcoming: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start with `past` zeroed positions for `batch` rows (dtype, device, heads and head_dim of
        `like`: heads x positions x head_dim), and room for `upcoming` positions (the prefill still to
        run) plus the reserve. Returns the keys and values of those positions, for the caller to fill."""
        heads, _, head_dim = like.shape
        empty = like.new_empty(batch, heads, 0, head_dim)
        self.lazy_initialization(empty, empty)
        self.length = 0
        self._key_buffer = self._grown(None, empty, past + upcoming + self.reserve)
        self._value_buffer = self._grown(None, empty, past + upcoming + self.reserve)
        self.length = past
        self._refresh_views()
        self.keys.zero_()  # padding columns must hold finite values: attention multiplies them by 0
        self.values.zero_()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._key_buffer, self._value_buffer = (self._rows_repeated(b, repeats) for b in self._buffers())
            self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor, leading: int = 0) -> None:
        """Keep the rows `indices`, and drop the first `leading` positions (padding in every kept row)."""
        if self.length:
            self._key_buffer, self._value_buffer = (self._rows_selected(b, indices, leading) for b in self._buffers())
            self.length -= leading
            self._refresh_views()

    # Row changes copy the filled positions only, into buffers that keep the unfilled reserve.
    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._key_buffer is not None and self._value_buffer is not None
        return self._key_buffer, self._value_buffer

    def _rows_repeated(self, buffer: torch.Tensor, repeats: int) -> torch.Tensor:
        batch, heads, capacity, head_dim = buffer.shape
        repeated = buffer.new_empty(batch * repeats, heads, capacity, head_dim)
        filled = buffer[:, None, :, : self.length]
        repeated.view(batch, repeats, heads, capacity, head_dim)[..., : self.length, :] = filled
        return repeated

    def _rows_selected(self, buffer: torch.Tensor, indices: torch.Tensor, leading: int) -> torch.Tensor:
        _, heads, capacity, head_dim = buffer.shape
        selected = buffer.new_empty(len(indices), heads, capacity - leading, head_dim)
        kept = self.length - leading
        torch.index_select(buffer[:, :, leading : self.length], 0, indices, out=selected[:, :, :kept])
        return selected


def _appends_in_place(cache: DynamicCache) -> bool:
    """Whether `_decoding_cache` could give every layer the in-place kind (prefix reuse and column
    trimming need it; other layer kinds take the plain path)."""
    return all(isinstance(layer, _AppendInPlaceLayer) for layer in cache.layers)


def _decoding_cache(config: Any, reserve: int) -> DynamicCache:
    """A cache with room for `reserve` more positions per layer without copying (full-attention layers;
    a model with other layer kinds, e.g. sliding windows, keeps transformers' own layers)."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_AppendInPlaceLayer(reserve) for _ in cache.layers]
    return cache


_HASH_MODULUS = (1 << 61) - 1


def _prefix_hashes(tokens: Sequence[int]) -> list[int]:
    """A polynomial hash of every prefix of `tokens` (entry i covers tokens[: i + 1]), in one pass."""
    hashes, value = [], 0
    for token in tokens:
        value = (value * 1_000_003 + token + 1) % _HASH_MODULUS
        hashes.append(value)
    return hashes


@dataclass
class _CachedPrefix:
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape (heads, len, head_dim)

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self.layers)


class PrefixKVCache:
    """Key/value states of recently prefilled token sequences, reused when a later prompt starts with one.

    In a search, the prompts of one expansion are the path to a node, and the next expansion of the
    same tree asks for the children of one of the nodes just generated: its prompt repeats the one
    before, token for token, plus one step (the step format's markers are special tokens, so the
    tokenizer splits at step boundaries the same way every time). Reusing those states leaves only
    the new step to prefill. Least recently used entries go first once `max_bytes` would be exceeded.
    Reused states equal freshly computed ones up to float rounding (batch shapes differ): in
    float32 completions came out identical in the tests; in bfloat16 (the GPU default) rounding can
    change a later token, so a completion may depend on which prompts came before it (sampling
    seeds do not: they follow the prompt). A generator still replays exactly when it sees the same
    sequence of calls; `prefix_cache_mb=0` makes every call independent of the ones before.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, int], _CachedPrefix] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(length, per-layer states) of the longest cached sequence that `tokens` starts with; (0, None) if none."""
        if not self._entries:
            return 0, None
        hashes = _prefix_hashes(tokens)
        for length in range(len(tokens), 0, -1):
            key = (length, hashes[length - 1])
            entry = self._entries.get(key)
            if entry is not None and entry.tokens == tuple(tokens[:length]):
                self._entries.move_to_end(key)
                return length, entry.layers
        return 0, None

    def put(self, tokens: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `layers` (per layer keys, values: heads x len(tokens) x head_dim) for `tokens`."""
        if not tokens:
            return
        key = (len(tokens), _prefix_hashes(tokens)[-1])
        entry = _CachedPrefix(tuple(tokens), layers)
        if entry.nbytes > self.max_bytes:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        while self.nbytes + entry.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes


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
        prefix_cache_mb: int = 1024,
    ) -> None:
        """Load `model_dir` (raises models.tiny.ModelLoadError with a one-line message if it does not load).

        `batch_size` counts sequences (prompt x sample rows) per forward batch (at least one
        prompt's samples, which always share a batch); `dtype` defaults to
        float32 on CPU and bfloat16 on GPU. `threads` sets torch's intra-op threads while generating
        (process-wide, restored afterwards). None: on CPU all of torch's threads but one, off CPU
        torch's setting. The spare core is for the sandbox and grader workers, which run while
        the search generates: an OpenMP thread that loses its core to them stalls every decoding
        step at the next barrier (on 2 cores, two threads made the search 5-8x slower than one).
        `prefix_cache_mb` bounds the key/value states kept for reuse by later prompts (0: none).
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
        self._prompt_seeds = PromptSeeds(seed)
        self.prefix_cache = PrefixKVCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        # As vLLM stops: at the generation config's EOS ids and at the tokenizer's.
        eos = self.model.generation_config.eos_token_id
        self._eos_ids: set[int] = set(eos) if isinstance(eos, list) else {eos} - {None}
        if self.tokenizer.eos_token_id is not None:
            self._eos_ids.add(self.tokenizer.eos_token_id)
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)

    def restart_seeds(self) -> None:
        self._prompt_seeds.restart()

    def release(self) -> None:
        """Free the model and its cached prompt states now: a long-lived flow process would keep them
        on the GPU through the training stages that follow (as `PPMScorer.release`)."""
        self.model, self.prefix_cache = None, None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

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
        check_generation_request(n, max_tokens, temperature)
        if not prompts:
            return []
        samples = 1 if temperature == 0 else n
        prompt_seeds = [self._prompt_seeds.next(prompt) for prompt in prompts] if temperature > 0 else None
        # Special tokens (a BOS for models that want one) are added exactly as vLLM's server adds them.
        encoded = self.tokenizer(list(prompts))["input_ids"]
        if any(not ids for ids in encoded):
            raise ValueError("cannot generate from an empty prompt")
        # As vLLM: output stops where the model's context ends, and a prompt that fills it gets a
        # cut-off (empty) completion, so the search ends that path the same way on either backend.
        room = [max_tokens if self.context_length is None else min(max_tokens, self.context_length - len(ids))
                for ids in encoded]
        results: dict[int, list[Completion]] = {p: [Completion("", 0, "length")] * samples
                                                for p in range(len(prompts)) if room[p] < 1}
        # Longest first: similar lengths share a batch (little padding) and memory peaks early.
        order = sorted((p for p in range(len(prompts)) if p not in results), key=lambda p: -len(encoded[p]))
        prompts_per_batch = max(1, self.batch_size // samples)
        with torch.inference_mode(), _intra_op_threads(self.threads):
            for start in range(0, len(order), prompts_per_batch):
                batch = order[start : start + prompts_per_batch]
                row_seeds = None if prompt_seeds is None else [
                    f"{prompt_seeds[p]}/{sample}" for p in batch for sample in range(samples)
                ]
                completions = self._generate_batch(
                    [encoded[p] for p in batch], samples, row_seeds, stop, temperature, [room[p] for p in batch]
                )
                for position, p in enumerate(batch):
                    results[p] = completions[position * samples : (position + 1) * samples]
        # Greedy samples are all the same: computed once, repeated.
        return [results[p] * (n // samples) for p in range(len(prompts))]

    def _generate_batch(
        self,
        prompts: list[list[int]],
        samples: int,
        row_seeds: list[str] | None,
        stop: Sequence[str],
        temperature: float,
        max_tokens: list[int],
    ) -> list[Completion]:
        """`samples` completions of each prompt, prompt by prompt, at most `max_tokens[prompt]` tokens
        each; row i samples from `row_seeds[i]` (None: greedy).

        Finished rows (stop string, EOS) leave the batch: once a quarter of the rows have finished,
        their cache rows are dropped, so decoding steps compute mostly rows still generating.
        (`model.generate` carries finished rows to the end of the longest one; search steps vary
        from a few tokens to the cap, and in a search call only a quarter to a third of its
        row-steps were live.)
        """
        width = max(len(ids) for ids in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.device
        )
        # Left padding: positions count real tokens only.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
        row_limits = [limit for limit in max_tokens for _ in range(samples)]
        longest = max(max_tokens)
        cache = _decoding_cache(self.model.config, reserve=longest + 1)
        # Each prompt is prefilled once (all but its last token) and its cache repeated per sample;
        # the last token then runs per row, which gives each row its own first sample.
        if width > 1:
            self._prefill([ids[:-1] for ids in prompts], input_ids[:, :-1], attention_mask[:, :-1],
                          position_ids[:, :-1], cache)
            cache.batch_repeat_interleave(samples)
        attention_mask = attention_mask.repeat_interleave(samples, dim=0)
        step_ids = input_ids[:, -1:].repeat_interleave(samples, dim=0)
        step_positions = position_ids[:, -1:].repeat_interleave(samples, dim=0)
        rows = len(step_ids)
        streams = [random.Random(row_seed) for row_seed in row_seeds] if row_seeds else []
        generated: list[list[int]] = [[] for _ in range(rows)]
        stopped_at: list[int | None] = [None] * rows
        in_batch = list(range(rows))  # the row at each batch position
        live = set(in_batch)
        window = max((len(s.encode()) for s in stop), default=0)
        for step in range(longest):
            logits = self.model(
                input_ids=step_ids,
                attention_mask=attention_mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            tokens = _sample_tokens(logits, temperature, [streams[row] for row in in_batch] if streams else ()).tolist()
            for row, token in zip(in_batch, tokens):
                if row in live:
                    generated[row].append(token)
            live -= self._finished_rows(live, generated, stop, window, stopped_at)
            live -= {row for row in live if len(generated[row]) >= row_limits[row]}
            if step == longest - 1 or not live:
                break
            # Dropping rows copies the cache, so finished rows ride along (their tokens ignored)
            # until a quarter of the batch has finished.
            if len(live) <= 3 * len(in_batch) // 4:
                keep = [index for index, row in enumerate(in_batch) if row in live]
                kept = torch.tensor(keep, device=self.device)
                attention_mask = self._drop_rows(cache, kept, attention_mask)
                step_positions = step_positions[kept]
                tokens = [tokens[index] for index in keep]
                in_batch = [in_batch[index] for index in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(in_batch), 1))], dim=1)
            step_positions = step_positions + 1
            step_ids = torch.tensor(tokens, device=self.device).unsqueeze(-1)
        return [self._completion(tokens, stopped, stop) for tokens, stopped in zip(generated, stopped_at)]

    @staticmethod
    def _drop_rows(cache: DynamicCache, kept: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Keep only the rows `kept` in the cache; returns their attention mask.

        Columns on the left that are padding in every kept row go too (the rows of the longest
        prompts may be among those that finished), so later steps attend over fewer positions.
        """
        attention_mask = attention_mask[kept]
        if not _appends_in_place(cache):
            cache.batch_select_indices(kept)
            return attention_mask
        leading = int(attention_mask.argmax(dim=1).min())  # each row's first real column
        for layer in cache.layers:
            layer.batch_select_indices(kept, leading)
        return attention_mask[:, leading:]

    def _prefill(
        self,
        contexts: list[list[int]],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> None:
        """Fill `cache` with the states of `contexts` (left-padded in `input_ids`), reusing cached prefixes.

        With the prefix cache, only the last `window` columns run through the model, where `window`
        is the longest part of any context that no cached prefix covers; the columns before it are
        copied from the cache (a context shorter than that is padding there).
        """
        width = input_ids.shape[1]
        reusable = self.prefix_cache is not None and _appends_in_place(cache)
        hits = [self.prefix_cache.longest_prefix(ids) for ids in contexts] if reusable else [(0, None)] * len(contexts)
        window = max(len(ids) - length for ids, (length, _) in zip(contexts, hits, strict=True))
        past = width - window
        if past:
            self._preload(cache, contexts, hits, width, past)
        if window:
            self.model(
                input_ids=input_ids[:, past:],
                attention_mask=attention_mask,
                position_ids=position_ids[:, past:],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        if reusable:
            for row, (ids, (length, _)) in enumerate(zip(contexts, hits, strict=True)):
                if length < len(ids):
                    self.prefix_cache.put(ids, [
                        (layer.keys[row, :, width - len(ids) :].clone(), layer.values[row, :, width - len(ids) :].clone())
                        for layer in cache.layers
                    ])

    @staticmethod
    def _preload(
        cache: DynamicCache,
        contexts: list[list[int]],
        hits: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]],
        width: int,
        past: int,
    ) -> None:
        """Put columns [0, past) of the left-padded contexts' states into `cache`, from the prefix cache.

        A context of length c covers columns [width - c, width), so it needs its first
        c - (width - past) cached positions; the window then starts where its cached prefix may end.
        """
        like = next(layers for _, layers in hits if layers is not None)
        for index, layer in enumerate(cache.layers):
            keys, values = layer.preload(like[index][0], len(contexts), past, upcoming=width - past)
            for row, (ids, (_, layers)) in enumerate(zip(contexts, hits, strict=True)):
                used = len(ids) - (width - past)
                if used > 0 and layers is not None:
                    keys[row, :, past - used :] = layers[index][0][:, :used]
                    values[row, :, past - used :] = layers[index][1][:, :used]

    def _finished_rows(
        self,
        live: Collection[int],
        generated: list[list[int]],
        stop: Sequence[str],
        window: int,
        stopped_at: list[int | None],
    ) -> set[int]:
        """The live rows whose newest token is EOS or completes a stop string (recorded in `stopped_at`).

        Only the generated text is searched, never the prompt, and only a window of the newest
        tokens: a stop string of b bytes spans at most b tokens, and anything older was checked on
        an earlier step.
        """
        finished = {row for row in live if generated[row][-1] in self._eos_ids}
        if stop:
            candidates = [row for row in live if row not in finished]
            tails = self.tokenizer.batch_decode([generated[row][-window:] for row in candidates], skip_special_tokens=True)
            for row, tail in zip(candidates, tails):
                if _stop_end(tail, stop) is not None:
                    stopped_at[row] = len(generated[row])
                    finished.add(row)
        return finished

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
    prompt_sets: Sequence[Sequence[str]],
    *,
    n: int,
    max_tokens: int,
    temperature: float = 1.0,
    stop: Sequence[str] = (),
) -> Throughput:
    """Plain batched generation speed of any backend: the median over one call per prompt set.

    Give every set prompts the generator has not seen: both backends reuse the states of prompts
    prefilled before (vLLM's prefix caching, `PrefixKVCache` here), and a repeated prompt would
    measure that cache rather than a plain generate.
    """
    if not prompt_sets:
        raise ValueError("measure_throughput needs at least one prompt set")
    measured = []
    for prompts in prompt_sets:
        started = time.perf_counter()
        completions = generator.generate(prompts, n=n, stop=stop, temperature=temperature, max_tokens=max_tokens)
        seconds = time.perf_counter() - started
        tokens = sum(completion.num_tokens for samples in completions for completion in samples)
        measured.append((tokens / seconds, tokens, seconds))
    tokens_per_s, tokens, seconds = sorted(measured)[len(measured) // 2]
    return Throughput(tokens_per_s, tokens, seconds, len(measured))
