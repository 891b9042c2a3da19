"""Pruning the tiny models through the engine: the output's tensors, and watching its statistics and solves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def peak_of_one_solve(script: str, *args: object, threads: int | None = None) -> int:
    """Run `script` (a PEAK_OF_ONE_SOLVE measurement) in a fresh process with `args`, on `threads` OpenMP and MKL
    threads if given: the bytes it reports one solve added to the process's peak RSS (its last line's "peak")."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
    command = [sys.executable, "-c", script, *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak"]


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
