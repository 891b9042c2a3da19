"""export/gate.py: a run over the quality gate's limit is written, marked failed, and exits 3."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import AutoModelForCausalLM

from tests.helpers.cli import one_error_line as _one_error_line
from tests.helpers.publish import prune_args as _prune_args


def test_failed_quality_gate_writes_a_marked_folder_and_exits_3(trained, corpus_file, tmp_path):
    out = tmp_path / "failed"
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune", *_prune_args(trained, corpus_file, out, "--max-ppl-increase", "0.05")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3
    line = _one_error_line(proc.stderr)
    assert line.startswith("llmprune: error: quality gate failed: pruned perplexity") and "limit of +5%" in line
    gate = json.loads((out / "llmprune.json").read_text())["quality_gate"]
    assert gate["status"] == "failed" and gate["passed"] is False and gate["max_ppl_increase"] == 0.05
    assert gate["increase"] > 0.05
    assert "Quality gate failed" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # still a complete folder
