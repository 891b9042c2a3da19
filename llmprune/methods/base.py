"""The one pruning interface: a method sees a Linear's weight and its input statistics, and returns the
mask and the updated weight. The engine owns streaming, devices and I/O.

A method declares, once, what it needs: `statistics` (the statistic classes the engine accumulates for
it), `options` (its own settings: from them come its CLI flags, the Python API's keywords, validation,
the resume fingerprint, the report and the model card) and `workspace_bytes` (what one solve holds, for
the memory plan). Adding a method is one new file and one line in `llmprune.methods.METHODS`.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from llmprune.methods import masks
from llmprune.methods.statistics import InputStats, Statistic
from llmprune.pattern import Pattern
from llmprune.settings import Configurable


@dataclass
class Pruned:
    """A method's answer for one Linear: the new weight (same dtype), the pruned mask, and notes; for a quantized
    weight, the tensors the checkpoint stores in its place (its codes and scales, by name under the module)."""

    weight: torch.Tensor
    mask: torch.Tensor  # bool, True where a weight was pruned
    info: dict = field(default_factory=dict)
    saved: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class RowBlock:
    """The rows [start, stop) of a weight of `total` rows that one solve is given (the engine splits a Linear's rows
    across ranks), and `lowest(scores, count)`: the mask of the `count` lowest of the scores of every block's rows,
    returned for these rows (on several ranks a collective, the scores stacked in row order, so every rank chooses
    alike and as one solve of the whole weight would from the same scores)."""

    start: int
    stop: int
    total: int
    lowest: Callable[[torch.Tensor, int], torch.Tensor]

    @classmethod
    def whole(cls, rows: int) -> RowBlock:
        """Every row of a weight of `rows` rows: one solve, as without ranks."""
        return cls(0, rows, rows, masks.lowest_global)


class PruningMethod(Configurable, ABC):
    """Subclass, set `name`, `statistics` and `options`, implement `prune`."""

    summary: ClassVar[str] = ""  # one line for --help and the docs
    statistics: ClassVar[tuple[type[Statistic], ...]] = ()
    # the option holding the dtype of a matrix inverse the method factors ("auto", "float64", "float32"): the
    # memory plan may choose float32 for "auto" under a tight budget (None: the method inverts nothing)
    inverse_option: ClassVar[str | None] = None
    workspace_label: ClassVar[str] = "method workspace"  # what the memory plan calls one solve's buffers
    # whether `prune` solves a block of a weight's rows alone (its `rows` keyword, a RowBlock): the rows interact
    # only through `RowBlock.lowest`. Under torchrun the engine then splits each Linear's rows across the ranks
    # rather than dealing out whole Linears, so the layer's largest solve no longer runs on one rank.
    splits_rows: ClassVar[bool] = False

    @classmethod
    def solves_rows(cls) -> bool:
        """Whether the engine may give `prune` a block of rows: `splits_rows`, and a `prune` that takes `rows` (a
        subclass that overrides `prune` without it solves whole weights, whatever it inherits)."""
        return cls.splits_rows and "rows" in inspect.signature(cls.prune).parameters

    @classmethod
    def workspace_bytes(
        cls,
        rows: int,
        cols: int,
        weight_dtype: torch.dtype,
        inverse_dtype: torch.dtype,
        options: Mapping[str, Any] | None = None,
    ) -> int:
        """Peak bytes one solve of a [rows, cols] weight holds beyond the layer and its statistics, for the
        memory plan, given the run's values of the method's options (those not given take their defaults).
        Default: the scores, their sorted values and int64 indices, and the mask."""
        return 18 * rows * cols

    @classmethod
    def selection_columns(cls, cols: int, options: Mapping[str, Any] | None = None) -> int:
        """For a method that `splits_rows`: the columns of a weight `cols` wide whose scores a row-split solve
        gathers from every rank at once to choose an unstructured mask (the memory plan counts them for all the
        rows)."""
        return 0

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        """Return the mask and the updated weight for one Linear weight [out, in]."""
