"""Pruning methods, one module each; add a method with one new file and one line in METHODS."""

from llmprune.methods.base import InputStats, Pattern, Pruned, PruningMethod
from llmprune.methods.magnitude import Magnitude
from llmprune.methods.sparsegpt import SparseGPT
from llmprune.methods.wanda import Wanda

METHODS: dict[str, type[PruningMethod]] = {
    Magnitude.name: Magnitude,
    Wanda.name: Wanda,
    SparseGPT.name: SparseGPT,
}

__all__ = ["METHODS", "InputStats", "Pattern", "Pruned", "PruningMethod"]
