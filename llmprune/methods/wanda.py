"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score |W_ij|·‖X_j‖₂,
compared within each output row; no weight update."""

from __future__ import annotations

import torch

from llmprune.methods import masks
from llmprune.methods.base import InputStats, Pattern, Pruned, PruningMethod


class Wanda(PruningMethod):
    """Weights times input-activation norms, pruned per output row (or per N:M group)."""

    name = "wanda"
    statistics = "sqnorm"

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        assert stats is not None and stats.sqnorm is not None
        scores = weight.abs().float() * stats.sqnorm.to(weight.device).sqrt().unsqueeze(0)
        mask = masks.select(scores, pattern, per_row=True)
        return Pruned(weight.masked_fill(mask, 0), mask)
