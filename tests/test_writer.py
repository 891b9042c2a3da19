"""export/writer.py: an existing OUTPUT is kept unless --overwrite, and no partial or old folder is left."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli import leftovers as _leftovers
from tests.helpers.cli import run_main as _run


def test_existing_output_is_kept_without_overwrite(model, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    argv = [model, "--calibration", corpus_file, "--samples", 2, "--seqlen", 16, "--no-eval", "--output", out]
    code, _, stderr = _run(argv, capsys)
    assert code != 0 and "--overwrite" in stderr
    assert (out / "precious.txt").read_text() == "user data"
    code, stdout, _ = _run([*argv, "--overwrite", "--json", "--method", "magnitude"], capsys)
    assert code == 0
    assert json.loads(stdout)["achieved_sparsity"] == pytest.approx(0.5)
    assert not (out / "precious.txt").exists() and (out / "llmprune.json").exists()
    assert _leftovers(tmp_path, ".partial") == [] and _leftovers(tmp_path, ".old") == []
