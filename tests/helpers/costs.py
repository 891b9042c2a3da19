"""Fixed decode cost models for the speed search's tests: a run finds them in its cache instead of timing the
machine, so the candidate cuts do not depend on how busy it is."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig

import llmprune.costmodel
from llmprune.costmodel import DecodeCosts, Timing, cache_key


def fixed_costs(base: float = 0.0, layer: float = 1.0, group: float = 0.0, neuron: float = 0.0) -> DecodeCosts:
    """A cost model with these seconds per token: fixed, per layer, per KV group and per FFN neuron."""
    return DecodeCosts(base, layer, group, neuron, measured={}, timing=asdict(Timing()), device="cpu")


def write_costs(folder: Path, costs: DecodeCosts, threads: int | None = None) -> None:
    """Put a cost model in the cache where a default run on `folder`'s architecture (float32, CPU) looks for it
    (the cache is LLMPRUNE_CACHE's); `threads`: the run's torch thread count, part of the key, if not this
    process's."""
    text = AutoConfig.from_pretrained(folder).get_text_config().to_dict()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        key = cache_key(text, torch.float32, torch.device("cpu"), Timing())
    finally:
        torch.set_num_threads(before)
    path = llmprune.costmodel.cache_root() / "costs" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(costs.as_dict()))
