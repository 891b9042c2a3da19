"""report.py (the report part of pipeline.py before the refactor): llmprune.json records every layer, the
exact sparsity and the perplexities."""

from __future__ import annotations

import json

import llmprune
from tests.helpers.engine import read_output as _read_output


def test_report_records_layers_and_exact_sparsity(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("qwen2", layers=2)
    out = tmp_path / "out"
    report = llmprune.prune(
        str(folder),
        method="sparsegpt",
        sparsity=0.6,
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        output=str(out),
        eval_samples=4,
        quiet=True,
    )
    on_disk = json.loads((out / "llmprune.json").read_text())
    assert on_disk["method"] == "sparsegpt" and on_disk["pattern"] == "unstructured"
    assert on_disk["calibration"]["count"] == 4 and on_disk["calibration"]["seqlen"] == 32
    assert len(on_disk["layers"]) == 2
    tensors = _read_output(out)
    for layer in on_disk["layers"]:
        for module in layer["modules"]:
            weight = tensors[module["name"] + ".weight"]
            assert int((weight == 0).sum()) == round(0.6 * weight.numel())
            assert module["error"] > 0
    assert report["perplexity"]["dense"] > 1 and report["perplexity"]["pruned"] > 1
    assert on_disk["perplexity"]["pruned"] == report["perplexity"]["pruned"]
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config


def test_report_plots_beside_the_report_and_linked_from_the_card(passed_run, tmp_path, capsys):
    """`llmprune report OUT --format html`: the per-layer PNG (a real image of the report's layers) and an
    HTML page embedding it; llmprune.json and the card then point at the PNG."""
    import shutil

    from PIL import Image

    from llmprune.cli import main

    folder = tmp_path / "run"
    shutil.copytree(passed_run, folder)
    assert main(["report", str(folder), "--format", "html"]) == 0
    assert capsys.readouterr().out.split() == [
        str(folder / "plots" / "layers.png"),
        str(folder / "plots" / "layers.html"),
    ]
    with Image.open(folder / "plots" / "layers.png") as image:
        assert image.format == "PNG" and image.size[1] > image.size[0]  # three stacked panels
    assert "data:image/png;base64," in (folder / "plots" / "layers.html").read_text()
    report = json.loads((folder / "llmprune.json").read_text())
    assert report["plots"] == {"png": "plots/layers.png"}
    assert (
        "![achieved sparsity, reconstruction error and time per layer](plots/layers.png)"
        in (folder / "README.md").read_text()
    )
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no llmprune.json" in capsys.readouterr().err
