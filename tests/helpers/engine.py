"""Pruning the tiny models through the engine: the output's tensors, and watching its statistics and solves."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import llmprune
from llmprune.methods import METHODS, InputStats


def read_output(folder) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors shard in `folder`, by name."""
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def watch_statistics_and_solves(patch: pytest.MonkeyPatch, probe) -> list[tuple[str, object]]:
    """Record probe() at every statistics update (InputStats.add) and SparseGPT solve."""
    calls: list[tuple[str, object]] = []
    for owner, name in ((InputStats, "add"), (METHODS["sparsegpt"], "prune")):
        function = getattr(owner, name)

        def wrapper(*args, _name=name, _function=function, **kwargs):
            calls.append((_name, probe()))
            return _function(*args, **kwargs)

        patch.setattr(owner, name, wrapper)
    return calls


def prune_tiny_sparsegpt(folder, corpus_file, output, **options) -> dict:
    """SparseGPT on 4 windows of 32 tokens in chunks of 2, no evaluation."""
    return llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        batch_size=2,
        output=str(output),
        no_eval=True,
        quiet=True,
        **options,
    )
