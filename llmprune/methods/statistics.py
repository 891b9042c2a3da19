"""Input statistics that methods declare and the engine accumulates over the calibration windows.

A statistic knows how to add a batch of inputs, move to a device and state its byte size for the
memory plan; a method names the statistic classes it needs (`PruningMethod.statistics`), and the
engine keeps one `InputStats` per group of Linears that share an input (q/k/v; gate/up). A new
statistic is one class here (or in the method's own file): the engine and the plan need no change.
"""

from __future__ import annotations

import inspect
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch


class Statistic(ABC):
    """One accumulated statistic of a Linear's inputs (width `dim`)."""

    label: ClassVar[str] = "statistics"  # its name in the memory plan
    exact_error: ClassVar[bool] = False  # whether `error_terms` computes the reconstruction error exactly

    @classmethod
    @abstractmethod
    def nbytes(cls, dim: int) -> int:
        """Bytes it holds for inputs of width `dim` (the memory plan counts them)."""

    @abstractmethod
    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of inputs [tokens, dim]."""

    @abstractmethod
    def to(self, device: torch.device) -> Statistic:
        """A copy on another device (for a solve on a second GPU)."""

    def error_terms(self, dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float] | None:
        """(‖(W - W')X‖², ‖WX‖²) over the inputs X it summarizes, when it can tell exactly (else None: the engine
        measures the error on a sample of the inputs). Sums over W's rows, so blocks of rows add up (ranks that
        split a weight's rows add theirs). Statistics with `exact_error` implement it."""
        return None

    def buffers(self) -> list[torch.Tensor]:
        """The tensors that are sums over the calibration tokens: a data-parallel run adds them across ranks.
        Default: every tensor attribute, by name."""
        return [value for _, value in sorted(vars(self).items()) if isinstance(value, torch.Tensor)]

    def finish(self) -> None:
        """Every token has been added (on every rank): settle into the form the methods read. Default: nothing."""
        return None


class SquaredNorm(Statistic):
    """The sum of x² per input feature (Wanda's ‖X_j‖²), in float32 (or float64: see InputStats)."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.value = torch.zeros(dim, dtype=dtype, device=device)

    @classmethod
    def nbytes(cls, dim: int) -> int:
        return dim * 4

    def add(self, x: torch.Tensor) -> None:
        self.value += x.float().pow(2).sum(0)

    def finish(self) -> None:
        self.value = self.value.float()

    def to(self, device: torch.device) -> SquaredNorm:
        copy = SquaredNorm.__new__(SquaredNorm)
        copy.value = self.value.float().to(device)
        return copy


class Hessian(Statistic):
    """The float32 Σ x xᵀ over tokens (SparseGPT). Accumulated as its upper block triangle (about 5/8 of
    the matmul work) and mirrored in place when first read. With dtype float64, each batch's float32 product is
    added into a float64 sum (exact for sums of float32 products of like magnitude, so the result does not depend
    on how the tokens were split across ranks) and read back as float32."""

    label = "statistics (Hessian)"
    exact_error = True
    BLOCK = 256

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self._upper: torch.Tensor | None = torch.zeros(dim, dim, dtype=dtype, device=device)
        self._full: torch.Tensor | None = None
        self._lock = threading.Lock()

    @classmethod
    def nbytes(cls, dim: int) -> int:
        return dim * dim * 4

    @classmethod
    def of(cls, matrix: torch.Tensor) -> Hessian:
        """A Hessian already accumulated and symmetric (benchmarks, saved Hessians)."""
        hessian = cls.__new__(cls)
        hessian._upper, hessian._full, hessian._lock = None, matrix, threading.Lock()
        return hessian

    @property
    def matrix(self) -> torch.Tensor:
        """The full symmetric Σ x xᵀ, mirrored once from the accumulated upper blocks, in place: the strict
        lower triangle is overwritten with the upper one's transpose, block by block, so reading the
        Hessian costs no second n x n matrix."""
        with self._lock:  # concurrent solves on several devices read it at once
            if self._full is None:
                self._full, self._upper = _mirror_upper(self._upper, self.BLOCK).float(), None
        return self._full

    def add(self, x: torch.Tensor) -> None:
        if self._upper is None:
            raise RuntimeError("statistics already read; no more inputs can be added")
        xf = x.float()
        dim = xf.shape[1]
        for start in range(0, dim, self.BLOCK):
            stop = min(start + self.BLOCK, dim)
            if self._upper.dtype == torch.float32:
                self._upper[start:stop, start:].addmm_(xf[:, start:stop].T, xf[:, start:])
            else:
                self._upper[start:stop, start:] += xf[:, start:stop].T @ xf[:, start:]

    def buffers(self) -> list[torch.Tensor]:
        if self._upper is None:
            raise RuntimeError("statistics already read; they can no longer be summed")
        return [self._upper]

    def to(self, device: torch.device) -> Hessian:
        return Hessian.of(self.matrix.to(device))

    def error_terms(self, dense: torch.Tensor, pruned: torch.Tensor, rows: int = 256) -> tuple[float, float]:
        """(tr(ΔW H ΔWᵀ), tr(W H Wᵀ)), summed `rows` output rows at a time (O(rows · n), no copy of W)."""
        h = self.matrix
        base = diff = 0.0
        for start in range(0, dense.shape[0], rows):
            w = dense[start : start + rows].float()
            delta = w - pruned[start : start + rows].float()
            base += float(((w @ h) * w).sum())
            diff += float(((delta @ h) * delta).sum())
        return diff, base


def ratio(diff: float, base: float) -> float:
    """The relative error from its terms (0 for a weight that computes nothing)."""
    return diff / base if base > 0 else 0.0


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


def _make(kind: type[Statistic], dim: int, device: torch.device, dtype: torch.dtype) -> Statistic:
    """A statistic accumulating in `dtype` where it takes one (a statistic of its own dtype keeps it)."""
    if dtype != torch.float32 and "dtype" in inspect.signature(kind).parameters:
        return kind(dim, device, dtype=dtype)
    return kind(dim, device)


class InputStats:
    """The statistics of the inputs seen by one or more Linear modules that share them: one instance of
    each statistic class a method declares, plus what is derived from them once (a group's shared
    inverse factor)."""

    def __init__(
        self, dim: int, kinds: tuple[type[Statistic], ...], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        self.tokens = 0
        self.values: dict[type[Statistic], Statistic] = {kind: _make(kind, dim, device, dtype) for kind in kinds}
        self._lock = threading.Lock()
        self._derived: dict = {}

    @classmethod
    def holding(cls, *values: Statistic, tokens: int = 0) -> InputStats:
        """Statistics made of already accumulated values (benchmarks, tests)."""
        stats = cls(0, (), torch.device("cpu"))
        stats.values = {type(value): value for value in values}
        stats.tokens = tokens
        return stats

    def __getitem__(self, kind: type[Statistic]) -> Statistic:
        return self.values[kind]

    @property
    def exact_error(self) -> bool:
        return any(value.exact_error for value in self.values.values())

    def error_terms(self, dense: torch.Tensor, pruned: torch.Tensor) -> tuple[float, float] | None:
        """The reconstruction error's terms from the first statistic that gives them exactly (None if none does)."""
        for value in self.values.values():
            if value.exact_error:
                return value.error_terms(dense, pruned)
        return None

    def relative_error(self, dense: torch.Tensor, pruned: torch.Tensor) -> float | None:
        """The reconstruction error ‖(W - W')X‖² / ‖WX‖² (None where no statistic gives it exactly)."""
        terms = self.error_terms(dense, pruned)
        return None if terms is None else ratio(*terms)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        for value in self.values.values():
            value.add(x)

    def finish(self) -> None:
        """Every token has been added: each statistic settles into the form the methods read."""
        for value in self.values.values():
            value.finish()

    def derived(self, key: object, make: Callable[[], object]) -> object:
        """What `make` computes from these statistics, computed once and kept as long as they are: the
        Linears of a group share one Hessian, so they share its inverse factor too."""
        with self._lock:
            if key not in self._derived:
                self._derived[key] = make()
            return self._derived[key]

    def to(self, device: torch.device) -> InputStats:
        """A copy of these statistics on another device (for a solve on a second GPU)."""
        return InputStats.holding(*(value.to(device) for value in self.values.values()), tokens=self.tokens)
