"""engine/lockstep.py: the sequential order's chunks run in lockstep, one forward per layer whatever the chunk."""

from __future__ import annotations

import torch

import llmprune
from tests.helpers.engine import read_output as _read_output


def test_chunked_sequential_matches_one_pass(tiny_models, corpus_file, tmp_path):
    """Sequential order over chunks (several partial passes) equals the single full-batch pass."""
    folder = tiny_models("llama", layers=2)
    common = dict(method="sparsegpt", calibration=str(corpus_file), samples=8, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "one"), batch_size=8, order="sequential", **common)
    llmprune.prune(str(folder), output=str(tmp_path / "chunks"), batch_size=3, order="sequential", **common)
    one, chunks = _read_output(tmp_path / "one"), _read_output(tmp_path / "chunks")
    for key in one:
        torch.testing.assert_close(chunks[key], one[key], rtol=0, atol=1e-5, msg=key)
