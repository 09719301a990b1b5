"""Fixtures shared by test modules; a module that needs another shape defines its own `tiny_model`."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.tiny import build_tiny_model, default_corpus


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer tiny model with a 1,024-token vocabulary, as the training and attention tests use."""
    corpus = default_corpus(seed=0, synthetic_examples=300, include_shared=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=corpus, num_layers=2, vocab_size=1024)
