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
