"""The two model interfaces the search needs: a text generator (the policy) and a step scorer (the PPM).

The search core only sees these protocols; `models/` implements them on transformers and on a
vLLM server, and tests implement them with scripted policies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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


class StepScorer(Protocol):
    """Scores texts (prompt + partial solution ending in a step) with values in [-1, 1]."""

    def score(self, texts: Sequence[str]) -> list[float]:
        ...
