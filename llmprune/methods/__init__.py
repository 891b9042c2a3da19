"""Unstructured / N:M pruning methods, one module each; add a method with one new file and one line in
METHODS (structured methods have their own registry, llmprune.structured.methods.STRUCTURED)."""

from llmprune.methods.alps import ALPS
from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.magnitude import Magnitude
from llmprune.methods.sparsegpt import SparseGPT
from llmprune.methods.statistics import Hessian, InputStats, SquaredNorm, Statistic
from llmprune.methods.wanda import Wanda
from llmprune.pattern import Pattern

METHODS: dict[str, type[PruningMethod]] = {
    Magnitude.name: Magnitude,
    Wanda.name: Wanda,
    SparseGPT.name: SparseGPT,
    ALPS.name: ALPS,
}

__all__ = ["METHODS", "Hessian", "InputStats", "Pattern", "Pruned", "PruningMethod", "SquaredNorm", "Statistic"]
