"""export/card.py: the model card's YAML metadata, command, sparsity per module type and perplexity."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from llmprune.export.card import read_front_matter
from tests.helpers.publish import BASE_MODEL
from tests.helpers.publish import prune_args as _prune_args


def _module_table(card: str) -> dict[str, float]:
    rows = re.findall(r"^\| `([\w.]+)` \| (\d+) \| [\d,]+ \| ([\d.]+)% \|$", card, re.MULTILINE)
    return {name: float(sparsity) / 100 for name, _, sparsity in rows}


def test_model_card_yaml_command_sparsity_and_perplexity(trained, corpus_file, passed_run):
    card = (passed_run / "README.md").read_text()
    report = json.loads((passed_run / "llmprune.json").read_text())
    meta = read_front_matter(card)
    assert meta["base_model"] == BASE_MODEL
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "2:4", "llmprune", "wanda"} <= set(meta["tags"])
    argv = _prune_args(trained, corpus_file, passed_run, "--dtype", "bfloat16", "--max-shard-size", "150KB")
    assert report["command"] == shlex.join(["llmprune", *argv])
    assert f"```bash\n{report['command']}\n```" in card
    kinds: dict[str, list[float]] = {}
    for layer in report["layers"]:
        for module in layer["modules"]:
            kinds.setdefault(module["name"].split(".", 3)[3], []).append(module["sparsity"])
    assert set(_module_table(card)) == set(kinds) and "self_attn.q_proj" in kinds
    assert _module_table(card) == {k: pytest.approx(sum(v) / len(v), abs=5e-5) for k, v in kinds.items()}
    ppl = report["perplexity"]
    assert f"| {ppl['dense']:.3f} |" in card and f"| {ppl['pruned']:.3f} |" in card
    assert f"{ppl['eval']['count']} windows of {ppl['eval']['seqlen']} tokens from `{corpus_file}`" in card
    assert 'AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")' in card and 'dtype="bfloat16"' in card
    assert report["quality_gate"]["status"] == "passed" and "Quality gate: **passed**" in card


def test_licence_and_legal_files_travel_with_the_weights(tiny_models, corpus_file, tmp_path):
    """The source card's licence (license, license_name, license_link) goes into the pruned card's metadata,
    written by huggingface_hub's ModelCardData, and LICENSE / USE_POLICY.md are copied beside the weights."""
    import shutil

    import llmprune
    from llmprune.export.card import calibration_dataset

    source = tmp_path / "gated-llama"
    shutil.copytree(tiny_models("llama", layers=2), source)
    card = "---\nbase_model: org/gated\nlicense: other\nlicense_name: tiny-community\nlicense_link: LICENSE\n---\n"
    (source / "README.md").write_text(card + "\n# source\n")
    (source / "LICENSE").write_text("TINY COMMUNITY LICENSE\n")
    (source / "USE_POLICY.md").write_text("Acceptable use.\n")
    out = tmp_path / "out"
    options = dict(calibration=str(corpus_file), samples=2, seqlen=32, eval_samples=2, quiet=True)
    report = llmprune.prune(str(source), method="magnitude", sparsity=0.5, output=str(out), **options)
    meta = read_front_matter((out / "README.md").read_text())
    licence = {"license": "other", "license_name": "tiny-community", "license_link": "LICENSE"}
    assert report["license"] == licence and {k: meta[k] for k in licence} == licence
    assert meta["base_model"] == "org/gated" and "datasets" not in meta  # a local corpus is no Hub dataset
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == pytest.approx(report["perplexity"]["pruned"])
    for name in ("LICENSE", "USE_POLICY.md"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert calibration_dataset({"source": "c4"}) == "allenai/c4"
    assert calibration_dataset({"source": "wikitext2:train"}) == "Salesforce/wikitext"
    assert calibration_dataset({"source": "org/corpus:train"}) == "org/corpus"
    assert calibration_dataset({"source": str(corpus_file)}) is None


def test_token_is_never_recorded_and_revision_is_for_hub_models(trained, corpus_file, tmp_path, capsys):
    from llmprune.cli import main

    out = tmp_path / "out"
    assert main(_prune_args(trained, corpus_file, out, "--token", "hf_secret_value", "--no-eval")) == 0
    recorded = (out / "llmprune.json").read_text() + (out / "README.md").read_text()
    assert "hf_secret_value" not in recorded and "--token '***'" in recorded
    assert main([str(trained), "--source-revision", "v1", "--no-eval", "--output", str(tmp_path / "x")]) == 2
    assert "--source-revision is for a Hub model" in capsys.readouterr().err
