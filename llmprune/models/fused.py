"""Fused expert tensors: transformers 5 holds a mixture-of-experts layer's experts as one 3-D parameter per
projection (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I]), while checkpoints, and the
engines that load them (vLLM), store one 2-D tensor per expert and projection (`experts.3.gate_proj.weight`).

transformers' own conversion mapping says which checkpoint tensors make which fused parameter; this module
reads the fused parameter from them (stack the experts, concatenate the projections, as its MergeModulelist
and Concatenate operations do) and splits a fused parameter back into checkpoint tensors, for any number of
experts (an expert-pruned layer keeps fewer, renumbered from 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import Checkpoint

EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class FusedTensor:
    """One fused parameter: for each of its source patterns in concatenation order, the checkpoint names of
    the experts' tensors (expert 0 first), and the rows each contributes along dim 1."""

    parts: list[list[str]]
    rows: list[int]

    def names(self, part: int, experts: int) -> list[str]:
        """The checkpoint names of part `part` for experts 0 .. experts-1 (the first expert's name renumbered)."""
        first = self.parts[part][0]
        return [EXPERT_INDEX.sub(f".experts.{e}.", first, count=1) for e in range(experts)]


def stacks_experts(converter) -> bool:
    """Whether a transformers converter stacks per-expert tensors into a fused parameter: MergeModulelist(0),
    then optionally Concatenate(1), the two operations FusedView reads and splits (any other conversion is not
    streamable here)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    stacked = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    return stacked and (len(ops) == 1 or (len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1))


def collect_fused(
    sources: dict[str, dict[str, list[str]]], order: dict[str, list[str]], checkpoint: Checkpoint
) -> dict:
    """FusedTensors by model name, from the checkpoint names that feed each one, grouped by source pattern
    (`order` gives each fused name's patterns in concatenation order)."""
    fused = {}
    for target, by_pattern in sources.items():
        parts = []
        for pattern in order[target]:
            by_index = {int(EXPERT_INDEX.search(n).group(1)): n for n in by_pattern.get(pattern, [])}  # type: ignore[union-attr]
            if not by_index or sorted(by_index) != list(range(len(by_index))):
                raise LLMPruneError(f"checkpoint {checkpoint.folder}: the experts of {target} are not 0 .. n-1")
            parts.append([by_index[e] for e in range(len(by_index))])
        if len({len(p) for p in parts}) != 1:
            raise LLMPruneError(f"checkpoint {checkpoint.folder}: the projections of {target} have unequal experts")
        fused[target] = FusedTensor(parts, [checkpoint.metadata(p[0])[1][0] for p in parts])
    return fused


class FusedView(Checkpoint):
    """A checkpoint seen with the model's fused expert parameters as tensors of their own (by model name), the
    per-expert tensors they are made of hidden; every other tensor as stored."""

    def __init__(self, inner: Checkpoint, fused: dict[str, FusedTensor]) -> None:  # noqa: D107 (no Checkpoint init)
        self.inner = inner
        self.folder: Path = inner.folder
        self.fused = fused
        self.hidden = {name for tensor in fused.values() for part in tensor.parts for name in part}
        self.plain = [k for k in inner.keys() if k not in self.hidden]

    def keys(self) -> list[str]:
        return self.plain + list(self.fused)

    def __contains__(self, name: str) -> bool:
        return name in self.fused or (name in self.inner and name not in self.hidden)

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = self.inner.read([n for n in names if n not in self.fused], device)
        for name in names:
            if name in self.fused:
                parts = self.fused[name].parts
                stacked = [torch.stack(list(self.inner.read(part, device).values())) for part in parts]
                out[name] = torch.cat(stacked, dim=1) if len(stacked) > 1 else stacked[0]
        return out

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.inner.read_rows(name, rows, dtype)

    def metadata(self, name: str) -> tuple[torch.dtype, list[int]]:
        if name not in self.fused:
            return self.inner.metadata(name)
        tensor = self.fused[name]
        dtype, shape = self.inner.metadata(tensor.parts[0][0])
        return dtype, [len(tensor.parts[0]), sum(tensor.rows), *shape[1:]]

    def split(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fused parameter [E', rows, cols] as the checkpoint's per-expert tensors, experts numbered 0 .. E'-1."""
        tensor = self.fused[name]
        out = {}
        for part, piece in enumerate(value.split(tensor.rows, dim=1)):
            for expert, key in enumerate(tensor.names(part, value.shape[0])):
                out[key] = piece[expert].contiguous()
        return out
