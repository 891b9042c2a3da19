"""Magnitude pruning: drop the smallest |W| of each matrix (layer-wise, the SparseGPT paper's baseline)."""

from __future__ import annotations

import torch

from llmprune.methods import masks
from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.statistics import InputStats
from llmprune.pattern import Pattern


class Magnitude(PruningMethod):
    """Zhu & Gupta 2017: no data needed; the weights with the smallest magnitude go."""

    name = "magnitude"
    summary = "smallest |W| of each matrix, no data (Zhu & Gupta 2017)"

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        mask = masks.select(weight.abs().float(), pattern, per_row=False)
        return Pruned(weight.masked_fill(mask, 0), mask)
