"""End to end on the real SmolLM2-135M (its GGUF file as MODEL) with real English text."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.models import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(smollm2, corpus_file, tmp_path_factory):
    """SparseGPT and magnitude at 50% on the same calibration and eval windows (three of Shakespeare's comedies:
    the whole embedded corpus would cost each run a tokenization of all the plays)."""
    gguf = assets.embedded_model("smollm2-135m-gguf")
    root = tmp_path_factory.mktemp("smol")
    common = dict(calibration=str(corpus_file), samples=8, seqlen=128, eval_samples=4, quiet=True)
    return {
        method: llmprune.prune(str(gguf), method=method, sparsity=0.5, output=str(root / method), **common)
        for method in ("sparsegpt", "magnitude")
    }


def _mean_error(report):
    errors = [m["error"] for layer in report["layers"] for m in layer["modules"]]
    return sum(errors) / len(errors)


def test_sparsegpt_beats_magnitude_on_error_and_perplexity(runs, corpus_file):
    sparsegpt, magnitude = runs["sparsegpt"], runs["magnitude"]
    assert sparsegpt["perplexity"]["dense"] == pytest.approx(magnitude["perplexity"]["dense"])
    assert _mean_error(sparsegpt) < _mean_error(magnitude)
    assert sparsegpt["perplexity"]["pruned"] < magnitude["perplexity"]["pruned"]
    assert sparsegpt["perplexity"]["dense"] < sparsegpt["perplexity"]["pruned"]
    assert sparsegpt["calibration"]["source"] == str(corpus_file)


def test_smollm2_output_loads_in_transformers(runs):
    model = AutoModelForCausalLM.from_pretrained(runs["sparsegpt"]["output"])
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    weight = model.model.layers[7].mlp.down_proj.weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5)
