"""Shared fixtures: the reference data (skipped when absent) and tiny in-process tokenizers."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference"
BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@contextlib.contextmanager
def bench_module(name: str) -> Iterator[ModuleType]:
    """``bench/<name>.py`` imported as the module ``name`` (bench/ is not a package), registered in
    ``sys.modules`` while in use (dataclasses resolve their annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Validation data of the reference implementation; tests using it skip when it is absent."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def builtin_tokenizer():
    """The built-in word-level digit tokenizer (as built, not saved and reloaded)."""
    from icot_jax.data.tokenize import build_builtin_tokenizer

    return build_builtin_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A tiny GPT-2-style byte-level BPE tokenizer with EOS `<|endoftext|>` and no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Tom has 3 apples and buys 12 more. How many apples? <<3+12=15>> #### 15", "5 6 * 7 4 + 0 ( 1 )"]
    backend.train_from_iterator(corpus * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
