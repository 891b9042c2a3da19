"""The structured method interface: a method ranks every attention head and FFN neuron of every layer;
the structured body chooses uniform counts under the budget, cuts, tunes and writes the smaller model.

A method declares its `options` once (from them come its CLI flags, the Python API, validation and
the report) and implements `rank`; adding one is one new file and one line in
`llmprune.structured.methods.STRUCTURED`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.models.skeleton import Skeleton
from llmprune.settings import Configurable
from llmprune.structured.arch import Shape, Structure
from llmprune.structured.export import LayerCut


@dataclass
class RankInputs:
    """What a method may read to rank the units."""

    skeleton: Skeleton
    ids: torch.Tensor  # calibration windows
    structure: Structure
    shape: Shape
    device: torch.device
    chunk: int  # windows per forward
    work: Path  # scratch space inside the run's partial folder
    progress: bool
    per_group: bool  # --heads-per-group: query heads are chosen within each KV group
    ranks: Ranks = SINGLE  # a torchrun run: `ids` are every window; a rank ranks with its shard, summed

    def shard(self) -> torch.Tensor:
        """This rank's windows of `ids` (all of them for one process)."""
        return self.ranks.part(self.ids, self.chunk)


@dataclass
class Ranking:
    """Scores of the units (higher: keep). `heads` and `neurons` are per layer, a score per query head and
    per neuron; `search_heads` [layers, KV groups] (or [layers, query heads] per group) feed the count
    search. `gradients`, when a method has them, drive Kwon's rearrangement of the cut (per-sample
    gradients [samples, units] per layer); `search_neurons` [layers, neurons], when the count search needs
    other scores than the per-layer choice (scores in loss units, comparable between heads and neurons);
    `extra` is the method's own data for `compensate`."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    search_heads: torch.Tensor
    head_gradients: list[torch.Tensor] | None = None
    neuron_gradients: list[torch.Tensor] | None = None
    extra: object = None
    search_neurons: torch.Tensor | None = None

    @classmethod
    def of_scores(
        cls, heads: list[torch.Tensor], neurons: list[torch.Tensor], shape: Shape, per_group: bool, extra: object = None
    ) -> Ranking:
        """A ranking from additive per-head scores: a KV group scores the sum of its heads."""
        search = [h if per_group else h.reshape(shape.kv_heads, shape.group_size).sum(1) for h in heads]
        return cls(heads, neurons, torch.stack(search), extra=extra)


class StructuredMethod(Configurable, ABC):
    """Subclass, set `name` and `options`, implement `rank`."""

    summary: ClassVar[str] = ""
    distributed: ClassVar[bool] = True  # ranks across torchrun ranks (its statistics summed); False: one process
    searches_counts: ClassVar[bool] = False  # Kwon's search for the counts; else equal shares of heads/neurons

    @abstractmethod
    def rank(self, inputs: RankInputs) -> Ranking:
        """Score every head and neuron of every layer."""

    def compensate(
        self, skeleton: Skeleton, structure: Structure, shape: Shape, cuts: list[LayerCut], ranking: Ranking
    ) -> None:
        """Adjust the cuts before tuning (e.g. FLAP's bias compensation); default: nothing."""
