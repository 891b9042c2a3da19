"""What the run skeleton (llmprune.run) hands a body, and what a body does.

The skeleton owns everything every kind of pruning shares: settings, the model, the calibration and
eval windows, the output folder, the dense and pruned perplexity, the shards, the report, the gate,
the card and the push. A body owns the pruning itself: it checks its own inputs, plans, prunes the
decoder layers into the output folder's layer units, and says what its report records.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from llmprune.data.windows import Windows
from llmprune.engine.devices import default_chunk
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.resume import RunState
from llmprune.export.writer import OutputFolder
from llmprune.models.skeleton import Skeleton
from llmprune.settings import Settings

log = logging.getLogger("llmprune")


@dataclass
class RunContext:
    """What a run knows once the model is resolved and the windows are drawn."""

    settings: Settings
    folder: Path  # the source model folder
    skeleton: Skeleton
    device: torch.device
    save_override: torch.dtype | None  # --dtype, when given
    calib: Windows | None = None
    eval_windows: Windows | None = None
    overhead: int = 0  # bytes the interpreter and libraries held before any work (outside the budget)
    ranks: Ranks = SINGLE  # a data-parallel run's ranks (one process: a single rank)

    @property
    def progress(self) -> bool:
        return not self.settings.quiet and self.ranks.main

    def where(self) -> str:
        """The describe lines' common tail: the model's depth and device, and the calibration."""
        assert self.calib is not None
        return (
            f"{self.folder.name} ({self.skeleton.num_layers} layers, {self.device.type}); calibration "
            f"{self.calib.count} x {self.calib.seqlen} tokens from {self.calib.source}"
        )

    @property
    def save_dtype(self) -> torch.dtype:
        """The dtype the output is saved in: --dtype, else the model's."""
        return self.save_override or self.skeleton.dtype


@dataclass
class BodyReport:
    """A body's part of the report."""

    pattern: str
    sparsity: float
    achieved_sparsity: float
    options: dict[str, Any]
    sections: dict[str, Any]
    layers: list[dict]
    timings: dict[str, float]
    damping_retries: int | None = None


class Body(ABC):
    """One kind of pruning inside the shared run skeleton."""

    kind: ClassVar[str]  # what the errors call it: "unstructured", "structured", "depth"
    sections: ClassVar[tuple[str, ...]]  # the settings sections it reads besides the shared ones
    resumable: ClassVar[bool] = False  # a killed run continues where it stopped (the skeleton keeps its state)
    distributed: ClassVar[bool] = False  # runs across torchrun ranks (docs/distributed.md)

    def __init__(self, settings: Settings, method: type) -> None:
        self.settings = settings
        self.method_class = method

    @property
    def plans_absent_devices(self) -> bool:
        """Whether this run may name a device this machine lacks (a plan for it, nothing run)."""
        return False

    @property
    @abstractmethod
    def tag(self) -> str:
        """The default output name's last part (50, 2of4, ...)."""

    def check_device(self, device: torch.device) -> None:  # noqa: B027 (optional hook)
        """Refuse device-dependent inputs before the model is read."""

    @abstractmethod
    def check_model(self, ctx: RunContext) -> None:
        """Refuse what does not fit the model, from its meta skeleton alone (before any weight is read)."""

    def fingerprint(self, ctx: RunContext) -> dict[str, Any]:
        """Resolved values the result depends on beyond the settings (resumable bodies)."""
        return {}

    def plan(self, ctx: RunContext, saved: RunState | None) -> dict | None:
        """Plan the run before any weight is read; a dict ends the run there (--plan-only)."""
        return None

    @property
    @abstractmethod
    def eval_chunk(self) -> int:
        """Windows per forward of the perplexity evaluation."""

    def state_choice(self) -> dict:
        """What a resumed run must reuse (saved in the run state)."""
        return {}

    @abstractmethod
    def describe(self, ctx: RunContext) -> str:
        """One log line: what this run does."""

    @abstractmethod
    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        """Prune the decoder layers from state.next_layer on, writing each into `writer`'s layer units."""

    def config(self, config: dict) -> dict:
        """The output config.json from the source one (a body that changes the architecture edits it)."""
        return config

    def output_layers(self, ctx: RunContext) -> int:
        """How many decoder layers the output has (the layer units the body writes: 0 .. n-1)."""
        return ctx.skeleton.num_layers

    @abstractmethod
    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        """What the report records of the pruning."""


class RemovalBody(Body):
    """A body that removes a fraction of the decoder (settings section `removal`): structured, depth and
    experts. It holds the method's instance and the budget, names the output by the fraction removed and
    forwards in default chunks."""

    def __init__(self, settings: Settings, method: type) -> None:
        super().__init__(settings, method)
        self.method = method(**settings.method_options)
        self.keep, self.by_flops = settings.removal.keep_fraction()

    @property
    def tag(self) -> str:
        return f"{round((1 - self.keep) * 100)}"

    def plan(self, ctx: RunContext, saved: RunState | None) -> dict | None:
        assert ctx.calib is not None
        chunk = self.settings.common.batch_size or default_chunk(ctx.calib.count, ctx.calib.seqlen, ctx.device)
        self.chunk = ctx.ranks.chunk_for(ctx.calib.count, chunk)  # every rank gets whole chunks of windows
        return None

    @property
    def eval_chunk(self) -> int:
        return self.chunk

    def budget(self) -> dict:
        """The report's record of what was asked for."""
        return {
            "keep_fraction": self.keep,
            "measure": "flops" if self.by_flops else "parameters",
            "remove": self.settings.removal.remove,
            "target_flops": self.settings.removal.target_flops,
        }
