"""The two model interfaces the search needs: a text generator (the policy) and a step scorer (the PPM).

The search core only sees these protocols; `models/` implements them on transformers and on a
vLLM server, and tests implement them with scripted policies.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from search.steps import render_worked_examples


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    text: str
    num_tokens: int
    finish_reason: str = "stop"  # "stop" (hit a stop string or EOS) or "length"


class Generator(Protocol):
    """Samples `n` continuations for each prompt; one call serves many prompts (batched)."""

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        stop: Sequence[str],
        temperature: float,
        max_tokens: int,
    ) -> list[list[Completion]]:
        """Return, for every prompt in order, its `n` completions (stop strings included at the end)."""
        ...

    def restart_seeds(self) -> None:
        """Sample every prompt as if for the first time from now on (`PromptSeeds.restart`)."""
        ...


class ShownExamples:
    """A Generator whose policy sees `examples` (worked examples, `search.steps.render_worked_examples`)
    before every prompt. Only what the policy reads changes: trees, mined data and the PPM's texts
    never hold the examples."""

    def __init__(self, generator: Generator, examples: str) -> None:
        self.generator, self.examples = generator, examples

    def generate(
        self, prompts: Sequence[str], *, n: int, stop: Sequence[str], temperature: float, max_tokens: int
    ) -> list[list[Completion]]:
        return self.generator.generate([self.examples + prompt for prompt in prompts], n=n, stop=stop,
                                       temperature=temperature, max_tokens=max_tokens)

    def restart_seeds(self) -> None:
        self.generator.restart_seeds()


def with_worked_examples(generator: Generator, count: int) -> Generator:
    """The generator, showing the first `count` worked examples before every prompt when count > 0."""
    return ShownExamples(generator, render_worked_examples(count)) if count else generator


def check_generation_request(n: int, max_tokens: int, temperature: float) -> None:
    """The arguments every Generator refuses (ValueError): no samples, no tokens, a negative temperature."""
    if n < 1 or max_tokens < 1 or temperature < 0:
        raise ValueError("n and max_tokens must be positive and temperature non-negative")


class PromptSeeds:
    """Sampling seeds that follow the prompt, not the call it came in.

    The seed of a prompt's samples is drawn from the generator's seed, the prompt's text and how many
    times this generator sampled that prompt before. What a problem's search or evaluation samples
    therefore does not depend on which other problems share its calls and batches: `--limit`, a
    different shard count or batch size leave each problem's samples alone (up to the float noise of
    other batch shapes), and a prompt sampled again still gets fresh samples.

    The counts of the `remembered` most recently sampled prompts are kept (~100 bytes each: a
    search of 100k problems sends tens of millions of prompts); a prompt sampled again only after
    that many others starts its count afresh and repeats its first samples.
    """

    def __init__(self, seed: int, remembered: int = 1 << 18) -> None:
        self.seed = seed
        self.remembered = remembered
        self._uses: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def next(self, prompt: str) -> int:
        """The seed (63 bits) of the next sampling of `prompt`."""
        key = hashlib.blake2b(prompt.encode(), digest_size=16).digest()
        with self._lock:
            use = self._uses.pop(key, 0)
            self._uses[key] = use + 1
            if len(self._uses) > self.remembered:
                self._uses.popitem(last=False)
        digest = hashlib.blake2b(key + f"/{self.seed}/{use}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def restart(self) -> None:
        """Forget every count: the next sampling of any prompt gets that prompt's first seed again.
        An evaluation restarts before each of its searches, so what one mode samples does not depend
        on which modes sampled the same questions before it."""
        with self._lock:
            self._uses.clear()


class StepScorer(Protocol):
    """Scores texts (prompt + partial solution ending in a step) with values in [-1, 1]."""

    def score(self, texts: Sequence[str]) -> list[float]:
        ...
