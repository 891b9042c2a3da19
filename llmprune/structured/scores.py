"""Baseline scores for structured pruning, to compare the Fisher method against.

- "l2-structured": the L2 norm of each unit's weights (query/KV heads: their rows of q/k/v and
  columns of o; neurons: their rows of the up projections and column of down). No data.
- "flap" (An et al. 2024, fluctuation-based): Var_t(x_j)·‖W[:, j]‖² on the inputs x of the output
  projections (o, down), averaged over a head's channels; also the mean of each input channel, for
  FLAP's bias compensation where the architecture has a bias slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmprune.engine.ranks import Ranks
from llmprune.engine.stream import open_stream
from llmprune.models.skeleton import Skeleton
from llmprune.structured.arch import Shape, Structure
from llmprune.structured.base import Ranking, RankInputs, StructuredMethod


@dataclass
class UnitScores:
    """Per layer, a score per query head and per neuron (higher: keep), and input means per projection."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    o_means: list[torch.Tensor] | None = None
    down_means: list[torch.Tensor] | None = None


def _weight(layer, name: str) -> torch.Tensor:
    return layer.get_submodule(name).weight.detach().float()


def l2_scores(skeleton: Skeleton, structure: Structure, shape: Shape, progress: bool = False) -> UnitScores:
    """Weight-norm scores, streaming the layers (weights only)."""
    heads, neurons = [], []
    hd = shape.head_dim
    for index in tqdm(range(skeleton.num_layers), desc="l2 scores", unit="layer", disable=not progress):
        layer = skeleton.load_layer(index, "cpu", torch.float32)
        neuron = sum(_weight(layer, n).pow(2).sum(1) for n in structure.up) + _weight(layer, structure.down).pow(2).sum(
            0
        )
        neurons.append(neuron.sqrt())
        if structure.heads:
            q = _weight(layer, structure.q).pow(2).sum(1).reshape(shape.heads, hd).sum(1)
            o = _weight(layer, structure.o).pow(2).sum(0).reshape(shape.heads, hd).sum(1)
            kv = sum(
                _weight(layer, n).pow(2).sum(1).reshape(shape.kv_heads, hd).sum(1) for n in (structure.k, structure.v)
            )
            heads.append((q + o + kv.repeat_interleave(shape.group_size) / shape.group_size).sqrt())
        else:
            heads.append(torch.zeros(shape.heads))
        skeleton.unload_layer(index)
    return UnitScores(heads, neurons)


class _Moments:
    """Running mean and variance of a projection's input channels."""

    def __init__(self) -> None:
        self.count, self.sum, self.sumsq = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.count += x.shape[0]
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.sumsq = x.pow(2).sum(0) if self.sumsq is None else self.sumsq + x.pow(2).sum(0)

    def mean(self) -> torch.Tensor:
        return (self.sum / self.count).float()

    def sum_over(self, ranks: Ranks) -> None:
        """Every rank's moments added (float64, in rank order)."""
        if ranks.active:
            (self.count,) = ranks.sum_numbers(self.count)
            ranks.sum_(self.sum)
            ranks.sum_(self.sumsq)

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sumsq / self.count - mean.pow(2)).clamp_min(0).float()


def fluctuation_scores(inputs: RankInputs) -> UnitScores:
    """FLAP's fluctuation metric from one streamed forward of the dense model (layer-wise)."""
    skeleton, structure, shape, device, progress = (
        inputs.skeleton,
        inputs.structure,
        inputs.shape,
        inputs.device,
        inputs.progress,
    )
    stream, acts = open_stream(skeleton, inputs.shard(), device, inputs.chunk)
    dtype = stream.dtype
    heads, neurons, o_means, down_means = [], [], [], []
    hd = shape.head_dim
    for index in tqdm(range(skeleton.num_layers), desc="flap scores", unit="layer", disable=not progress):
        layer = skeleton.load_layer(index, device, dtype)
        o_stats, down_stats = _Moments(), _Moments()
        handles = [
            layer.get_submodule(structure.down).register_forward_pre_hook(lambda m, a, s=down_stats: s.add(a[0])),
            layer.get_submodule(structure.o).register_forward_pre_hook(lambda m, a, s=o_stats: s.add(a[0])),
        ]
        try:
            stream.forward(index, layer, acts)
        finally:
            for handle in handles:
                handle.remove()
        down_stats.sum_over(inputs.ranks)
        o_stats.sum_over(inputs.ranks)
        down_w = _weight(layer, structure.down).cpu()
        neurons.append(down_stats.variance().cpu() * down_w.pow(2).sum(0))
        down_means.append(down_stats.mean().cpu())
        o_w = _weight(layer, structure.o).cpu()
        channel = o_stats.variance().cpu() * o_w.pow(2).sum(0)
        heads.append(channel.reshape(shape.heads, hd).mean(1) if structure.heads else torch.zeros(shape.heads))
        o_means.append(o_stats.mean().cpu())
        skeleton.unload_layer(index)
    stream.close()
    return UnitScores(heads, neurons, o_means, down_means)


class L2Structured(StructuredMethod):
    """The weight-norm baseline: no data."""

    name = "l2-structured"
    summary = "L2 norm of each head's and neuron's weights (baseline, no data)"

    def rank(self, inputs: RankInputs) -> Ranking:
        scores = l2_scores(inputs.skeleton, inputs.structure, inputs.shape, inputs.progress)
        return Ranking.of_scores(scores.heads, scores.neurons, inputs.shape, inputs.per_group)


class Flap(StructuredMethod):
    """FLAP's fluctuation metric, with its bias compensation where the architecture has a bias slot."""

    name = "flap"
    summary = "fluctuation of the output projections' inputs (An et al. 2024), bias compensation"

    def rank(self, inputs: RankInputs) -> Ranking:
        scores = fluctuation_scores(inputs)
        return Ranking.of_scores(scores.heads, scores.neurons, inputs.shape, inputs.per_group, extra=scores)

    def compensate(self, skeleton, structure, shape, cuts, ranking) -> None:
        """Only where the output projection has a bias slot: the mean input of the removed channels times their
        weights moves into the bias."""
        scores = ranking.extra
        hd = shape.head_dim
        for index, cut in enumerate(cuts):
            layer = skeleton.layers[index]
            kept_neurons, kept_heads = set(cut.neurons), set(cut.heads)
            removed = {
                structure.down: ([n for n in range(shape.intermediate) if n not in kept_neurons], scores.down_means),
                structure.o: (
                    [c for h in range(shape.heads) if h not in kept_heads for c in range(h * hd, (h + 1) * hd)],
                    scores.o_means if structure.heads else None,
                ),
            }
            for name, (channels, means) in removed.items():
                if getattr(layer.get_submodule(name), "bias", None) is None or not means or not channels:
                    continue
                key = f"{skeleton.layers_prefix}.{index}.{name}.weight"
                weight = skeleton.read([key])[key].float()
                cut.bias_shift[name] = weight[:, channels] @ means[index][channels]
