"""run.py (pipeline.py before the refactor): a whole prune run, seeded, and the equivalent Python call it
records."""

from __future__ import annotations

import torch

import llmprune
from llmprune.export.card import read_front_matter
from tests.helpers.engine import read_output as _read_output
from tests.helpers.publish import BASE_MODEL


def test_same_seed_same_masks_other_seed_other_masks(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("llama", layers=2)
    common = dict(method="wanda", calibration=str(corpus_file), samples=4, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "a"), seed=1, **common)
    llmprune.prune(str(folder), output=str(tmp_path / "b"), seed=1, **common)
    llmprune.prune(str(folder), output=str(tmp_path / "c"), seed=2, **common)
    a, b, c = (_read_output(tmp_path / n) for n in "abc")
    keys = [k for k in a if k.endswith("proj.weight")]
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in keys)
    assert any(not torch.equal(a[k] == 0, c[k] == 0) for k in keys)


def test_python_api_records_an_equivalent_call(trained, corpus_file, tmp_path):
    out = tmp_path / "api"
    report = llmprune.prune(str(trained), method="magnitude", pattern="2:4", calibration=str(corpus_file),
                            samples=2, seqlen=16, no_eval=True, quiet=True, output=str(out))  # fmt: skip
    assert report["command"] == (
        f"llmprune.prune({str(trained)!r}, method='magnitude', pattern='2:4', calibration={str(corpus_file)!r}, "
        f"samples=2, seqlen=16, output={str(out)!r}, no_eval=True, quiet=True)"
    )
    assert report["quality_gate"] == {
        "status": "not_evaluated",
        "passed": None,
        "max_ppl_increase": 0.5,
        "reason": "perplexity was not evaluated (--no-eval)",
    }
    card = (out / "README.md").read_text()
    assert report["command"] in card and "Quality gate not evaluated" in card
    assert read_front_matter(card)["base_model"] == BASE_MODEL
