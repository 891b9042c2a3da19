"""Slice a decoder layer's tensors to its kept heads and neurons (scales folded in), so the model's own
architecture, with smaller counts in its config, expresses the pruned layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmprune.structured.arch import Shape, Structure


@dataclass
class LayerCut:
    """What one layer keeps, and the scales and bias shifts that mask tuning / compensation found."""

    heads: list[int]  # kept query heads, ascending
    kv_heads: list[int]  # kept KV heads, ascending
    neurons: list[int]  # kept FFN neurons, ascending
    head_scales: torch.Tensor | None = None  # one per kept query head
    neuron_scales: torch.Tensor | None = None  # one per kept neuron
    bias_shift: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> added to its bias

    @classmethod
    def from_groups(cls, groups: list[int], neurons: list[int], shape: Shape) -> LayerCut:
        size = shape.group_size
        heads = [g * size + j for g in sorted(groups) for j in range(size)]
        return cls(heads, sorted(groups), sorted(neurons))


def _rows(units: list[int], width: int) -> torch.Tensor:
    return (
        torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
        if units
        else torch.zeros(0, dtype=torch.long)
    )


def cut_layer(tensors: dict[str, torch.Tensor], structure: Structure, shape: Shape, cut: LayerCut) -> dict:
    """Tensors of the smaller layer (names relative to the layer), from the dense layer's tensors."""
    out = dict(tensors)
    hd = shape.head_dim
    neurons = torch.tensor(cut.neurons, dtype=torch.long)

    def take(name: str, part: str, index: torch.Tensor, dim: int) -> None:
        key = f"{name}.{part}"
        if key in out:
            out[key] = out[key].index_select(dim, index).contiguous()

    o_key = f"{structure.o}.weight"
    if structure.heads:
        query_rows = _rows(cut.heads, hd)
        if cut.head_scales is not None:
            scale = cut.head_scales.to(out[o_key].dtype).repeat_interleave(hd)
            full = torch.ones(out[o_key].shape[1], dtype=out[o_key].dtype)
            full[query_rows] = scale
            out[o_key] = out[o_key] * full.unsqueeze(0)
        kv_rows = _rows(cut.kv_heads, hd)
        for part in ("weight", "bias"):
            take(structure.q, part, query_rows, 0)
            take(structure.k, part, kv_rows, 0)
            take(structure.v, part, kv_rows, 0)
        take(structure.o, "weight", query_rows, 1)
    down_key = f"{structure.down}.weight"
    if cut.neuron_scales is not None:
        full = torch.ones(out[down_key].shape[1], dtype=out[down_key].dtype)
        full[neurons] = cut.neuron_scales.to(out[down_key].dtype)
        out[down_key] = out[down_key] * full.unsqueeze(0)
    for name in structure.up:
        for part in ("weight", "bias"):
            take(name, part, neurons, 0)
    take(structure.down, "weight", neurons, 1)
    for name, shift in cut.bias_shift.items():
        key = f"{name}.bias"
        if key in out:
            out[key] = out[key] + shift.to(out[key].dtype)
    return out
