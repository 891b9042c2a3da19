"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score |W_ij|·‖X_j‖₂,
compared within each output row; no weight update."""

from __future__ import annotations

import torch

from llmprune.methods import masks
from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.statistics import InputStats, SquaredNorm
from llmprune.pattern import Pattern


class Wanda(PruningMethod):
    """Weights times input-activation norms, pruned per output row (or per N:M group)."""

    name = "wanda"
    summary = "|W| x input-activation norm, per output row (Sun et al. 2023)"
    statistics = (SquaredNorm,)

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        assert stats is not None
        sqnorm = stats[SquaredNorm].value
        scores = weight.abs().float() * sqnorm.to(weight.device).sqrt().unsqueeze(0)
        mask = masks.select(scores, pattern, per_row=True)
        return Pruned(weight.masked_fill(mask, 0), mask)
