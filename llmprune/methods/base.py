"""The one pruning interface: a method sees a Linear's weight and its input statistics, and
returns the mask and the updated weight. The engine owns streaming, devices and I/O."""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from llmprune.errors import LLMPruneError


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

    @classmethod
    def parse(cls, pattern: str, sparsity: float | None) -> Pattern:
        """Validate --pattern and --sparsity together (N:M implies its own sparsity)."""
        if pattern == "unstructured":
            value = 0.5 if sparsity is None else float(sparsity)
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


class InputStats:
    """Statistics of the inputs seen by one or more Linear modules that share them.

    `hessian` is the fp32 sum of x xᵀ over tokens (SparseGPT); `sqnorm` the fp32 sum of x² per
    input feature (Wanda). Only what the method asks for is accumulated. The Hessian is
    accumulated as its upper block triangle (about 5/8 of the matmul work) and mirrored when read.
    """

    BLOCK = 256

    def __init__(self, dim: int, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.tokens = 0
        self._upper = torch.zeros(dim, dim, dtype=torch.float32, device=device) if kind == "hessian" else None
        self._full: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._derived: dict = {}
        self.sqnorm = torch.zeros(dim, dtype=torch.float32, device=device) if kind == "sqnorm" else None

    @property
    def hessian(self) -> torch.Tensor | None:
        """The full symmetric Σ x xᵀ, mirrored once from the accumulated upper blocks, in place: the
        strict lower triangle is overwritten with the upper one's transpose, block by block, so reading
        the Hessian costs no second n x n matrix."""
        with self._lock:  # concurrent solves on several devices read it at once
            if self._full is None and self._upper is not None:
                self._full, self._upper = _mirror_upper(self._upper, self.BLOCK), None
        return self._full

    def derived(self, key: object, make: Callable[[], object]) -> object:
        """What `make` computes from these statistics, computed once and kept as long as they are: the
        Linears of a group share one Hessian, so they share its inverse factor too."""
        with self._lock:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    @classmethod
    def from_hessian(cls, hessian: torch.Tensor, tokens: int = 0) -> InputStats:
        """Statistics holding an already accumulated, symmetric Σ x xᵀ (benchmarks, saved Hessians)."""
        stats = cls(0, "none", hessian.device)
        stats.kind, stats.tokens, stats._full = "hessian", tokens, hessian
        return stats

    def to(self, device: torch.device) -> InputStats:
        """A copy of these statistics on another device (for a solve on a second GPU)."""
        copy = InputStats.__new__(InputStats)
        copy.kind, copy.tokens, copy._upper, copy._lock = self.kind, self.tokens, None, threading.Lock()
        copy._derived = {}
        copy._full = self.hessian.to(device) if self.kind == "hessian" else None
        copy.sqnorm = self.sqnorm.to(device) if self.sqnorm is not None else None
        return copy

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        if self.kind == "hessian":
            if self._upper is None:
                raise RuntimeError("statistics already read; no more inputs can be added")
            xf = x.float()
            dim = xf.shape[1]
            for start in range(0, dim, self.BLOCK):
                stop = min(start + self.BLOCK, dim)
                self._upper[start:stop, start:].addmm_(xf[:, start:stop].T, xf[:, start:])
        elif self.sqnorm is not None:
            self.sqnorm += x.float().pow(2).sum(0)


def _mirror_upper(upper: torch.Tensor, block: int) -> torch.Tensor:
    """Make `upper` symmetric in place from its upper triangle (the accumulated blocks also fill the
    diagonal blocks' lower halves: those are overwritten too, so the result is exactly
    triu(upper) + triu(upper, 1).T). Extra memory: one block x block tile."""
    dim = upper.shape[0]
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        tile = upper[start:stop, start:stop]
        tile.copy_(torch.triu(tile) + torch.triu(tile, 1).T)
        upper[stop:, start:stop].copy_(upper[start:stop, stop:].T)
    return upper


@dataclass
class Pruned:
    """A method's answer for one Linear: the new weight (same dtype), the pruned mask, and notes."""

    weight: torch.Tensor
    mask: torch.Tensor  # bool, True where a weight was pruned
    info: dict = field(default_factory=dict)


class PruningMethod(ABC):
    """Subclass, set `name` and `statistics` ("none", "sqnorm" or "hessian"), implement `prune`."""

    name: ClassVar[str]
    statistics: ClassVar[str] = "none"

    def __init__(self, **options) -> None:
        self.options = options

    @classmethod
    def workspace_bytes(cls, rows: int, cols: int, weight_dtype: torch.dtype, inverse_dtype: torch.dtype) -> int:
        """Peak bytes one solve of a [rows, cols] weight holds beyond the layer and its statistics, for the
        memory plan. Default: the scores, their sorted values and int64 indices, and the mask."""
        return 18 * rows * cols

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        """Return the mask and the updated weight for one Linear weight [out, in]."""
