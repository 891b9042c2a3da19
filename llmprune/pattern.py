"""What a sparsity pattern is: unstructured at a fraction, or N:M. Plain data at the bottom of the import
graph (settings validate it, methods and the engine apply it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmprune.errors import LLMPruneError

DEFAULT_SPARSITY = 0.5  # unstructured, when --sparsity is not given


@dataclass(frozen=True)
class Pattern:
    """Unstructured sparsity, or N:M (keep N weights in every M consecutive inputs; 2:4 = 50%)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @property
    def tag(self) -> str:
        """The pattern in a default output name: 2of4, or the sparsity in percent."""
        return f"{self.n}of{self.m}" if self.is_nm else f"{round(self.sparsity * 100)}"

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> Pattern:
        """Validate --pattern and --sparsity together (N:M implies its own sparsity)."""
        if pattern == "unstructured":
            value = DEFAULT_SPARSITY if sparsity is None else float(sparsity)
            if not 0.0 <= value < 1.0:
                raise LLMPruneError(f"--sparsity must be in [0, 1) (got {sparsity})")
            return cls(value)
        match = re.fullmatch(r"(\d+):(\d+)", pattern)
        if not match:
            raise LLMPruneError(f"--pattern must be 'unstructured' or N:M such as 2:4 (got {pattern!r})")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise LLMPruneError(f"--pattern {pattern}: need 0 < N < M")
        implied = 1.0 - n / m
        if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
            raise LLMPruneError(f"--pattern {pattern} implies sparsity {implied:g}; drop --sparsity {sparsity}")
        return cls(implied, n, m)

    def check_width(self, in_features: int, name: str) -> None:
        if self.is_nm and in_features % self.m:
            raise LLMPruneError(f"--pattern {self}: M={self.m} does not divide the input width {in_features} of {name}")
