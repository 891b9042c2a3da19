"""Every supported architecture family: prune, load with stock transformers, same logits as the engine."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.eval.perplexity import streamed_logits
from tests.helpers.tiny import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prune_load_and_match_logits(arch, tiny_models, corpus_file, tmp_path):
    folder = tiny_models(arch, layers=2)
    out = tmp_path / "out"
    report = llmprune.prune(
        str(folder),
        method="sparsegpt",
        pattern="2:4",
        calibration=str(corpus_file),
        samples=4,
        seqlen=64,
        output=str(out),
        eval_samples=2,
        quiet=True,
    )
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    model = AutoModelForCausalLM.from_pretrained(out)
    targets = [m["name"] for layer in report["layers"] for m in layer["modules"]]
    assert targets, "no Linear was pruned"
    state = model.state_dict()
    for name in targets:
        weight = state[name + ".weight"]
        groups = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert torch.all(groups <= 2), name
    assert "lm_head.weight" not in targets and all(".layers." in n for n in targets)
    ids = torch.randint(0, 512, (2, 50), generator=torch.Generator().manual_seed(1))  # longer than sliding windows
    with torch.no_grad():
        stock = model(ids).logits
    torch.testing.assert_close(streamed_logits(out, ids), stock, rtol=0, atol=1e-5)
    source = json.loads((folder / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == source["architectures"]
    assert written["model_type"] == source["model_type"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sliced_perplexity_equals_the_models_own_loss(arch, tiny_models, monkeypatch):
    """The evaluation's head and loss run over slices of the positions (here 7 at a time): the summed NLL
    is the model's own mean loss times the token count, tied or untied head, soft-capped logits or not."""
    from llmprune.data.windows import Windows
    from llmprune.engine import stream
    from llmprune.eval.perplexity import perplexity

    folder = tiny_models(arch, layers=2)
    monkeypatch.setattr(stream, "LOGIT_ELEMENTS", 512 * 7)
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    result = perplexity(folder, Windows(ids, "random"), torch.device("cpu"), batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        expected = sum(float(model(window[None], labels=window[None]).loss) for window in ids) / len(ids)
    assert result.tokens == 3 * 39
    assert result.nll == pytest.approx(expected, rel=1e-5)
