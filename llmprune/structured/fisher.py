"""Streamed mask gradients: ∂L/∂m for a mask on every attention head and FFN neuron, per chunk.

The empirical Fisher of a mask variable is Σ_b (∂L_b/∂m)², summed over chunks b of calibration
windows, L_b the chunk's next-token loss (Kwon et al. 2022). It is computed one layer at a time:
a forward pass writes every layer boundary's activations to disk, the loss gives ∂L/∂h at the top,
and a backward pass reloads each layer, recomputes it with the masks requiring grad, and carries
∂L/∂h down. Memory stays at one layer plus one chunk's autograd graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llmprune.engine.activations import Activations
from llmprune.engine.stream import open_stream
from llmprune.models.skeleton import Skeleton
from llmprune.settings import Option
from llmprune.structured.arch import Shape, Structure
from llmprune.structured.base import Ranking, RankInputs, StructuredMethod
from llmprune.structured.search import group_scores


@dataclass
class MaskGradients:
    """Per layer, a [chunks, units] matrix of ∂L_b/∂m (query heads; FFN neurons)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    loss: float

    def fisher_heads(self) -> torch.Tensor:
        return torch.stack([g.pow(2).sum(0) for g in self.heads])

    def fisher_neurons(self) -> torch.Tensor:
        return torch.stack([g.pow(2).sum(0) for g in self.neurons])


class Masks:
    """Multiplicative masks on the inputs of the attention output and FFN down projections."""

    def __init__(self, layer: nn.Module, structure: Structure, shape: Shape, device: torch.device) -> None:
        self.head = torch.ones(shape.heads, device=device, requires_grad=True)
        self.neuron = torch.ones(shape.intermediate, device=device, requires_grad=True)
        head_dim = shape.head_dim
        self._handles = [
            layer.get_submodule(structure.down).register_forward_pre_hook(
                lambda module, args: (args[0] * self.neuron.to(args[0].dtype), *args[1:])
            )
        ]
        if structure.heads:
            self._handles.append(
                layer.get_submodule(structure.o).register_forward_pre_hook(
                    lambda module, args: (args[0] * self.head.repeat_interleave(head_dim).to(args[0].dtype), *args[1:])
                )
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def mask_gradients(
    skeleton: Skeleton,
    ids: torch.Tensor,
    structure: Structure,
    shape: Shape,
    device: torch.device,
    chunk: int,
    work: Path,
    progress: bool = False,
) -> MaskGradients:
    """∂L_b/∂mask for every chunk b of `ids`, every layer's heads and neurons (streamed)."""
    boundary = [work / f"h{index:05d}" for index in range(skeleton.num_layers + 1)]
    for folder in boundary:
        folder.mkdir(parents=True, exist_ok=True)
    stream, acts = open_stream(skeleton, ids, device, chunk, torch.device("cpu"), spill_to=boundary[0])
    dtype = stream.dtype
    for index in tqdm(range(skeleton.num_layers), desc="fisher: forward", unit="layer", disable=not progress):
        layer = skeleton.load_layer(index, device, dtype)
        acts.spill_to = boundary[index + 1]
        stream.forward(index, layer, acts)
        skeleton.unload_layer(index)

    grads = Activations([], spill_to=work / "grad")
    grads.spill_to.mkdir(parents=True, exist_ok=True)
    total_loss, start = 0.0, 0
    for position in range(len(acts)):
        hidden = acts.get(position).to(device, dtype)
        gradient = torch.empty_like(hidden)
        for window in range(hidden.shape[0]):  # one window at a time: the logits of a chunk can be large
            h = hidden[window : window + 1].detach().requires_grad_(True)
            window_ids = stream.ids[start + window : start + window + 1].to(device)
            with torch.enable_grad():
                loss = stream.loss(window_ids, h)  # the chunk loss is the mean of its windows' losses
                (loss / hidden.shape[0]).backward()
            gradient[window : window + 1] = h.grad
            total_loss += float(loss.detach())
        start += hidden.shape[0]
        grads.chunks.append(None)
        grads.put(position, gradient)
    stream.close()

    heads: list[torch.Tensor] = [torch.empty(0)] * skeleton.num_layers
    neurons: list[torch.Tensor] = [torch.empty(0)] * skeleton.num_layers
    for index in tqdm(
        reversed(range(skeleton.num_layers)),
        desc="fisher: backward",
        unit="layer",
        total=skeleton.num_layers,
        disable=not progress,
    ):
        layer = skeleton.load_layer(index, device, dtype)
        inputs = Activations([_handle(boundary[index], c) for c in acts.chunks])
        head_rows, neuron_rows = [], []
        for position in range(len(inputs)):
            x = inputs.get(position).to(device, dtype).requires_grad_(True)
            masks = Masks(layer, structure, shape, device)
            try:
                with torch.enable_grad():
                    out = stream.run(index, layer, x)
                    out.backward(grads.get(position).to(device, out.dtype))
            finally:
                masks.remove()
            grads.put(position, x.grad.detach())
            head_rows.append(masks.head.grad.detach().float().cpu() if structure.heads else torch.zeros(shape.heads))
            neuron_rows.append(masks.neuron.grad.detach().float().cpu())
        heads[index] = torch.stack(head_rows)
        neurons[index] = torch.stack(neuron_rows)
        skeleton.unload_layer(index)
    return MaskGradients(heads, neurons, total_loss / ids.shape[0])


def _handle(folder: Path, like):
    """The same chunk (shape, dtype) in another boundary's folder."""
    from llmprune.engine.activations import DiskChunk

    return DiskChunk(folder / like.path.name, like.shape, like.dtype)


class Fisher(StructuredMethod):
    """Kwon et al. 2022: the empirical Fisher of head and neuron masks, Kwon's count search and rearrangement."""

    name = "fisher"
    summary = "Fisher information of head and neuron masks (Kwon et al. 2022), search and rearrangement"
    searches_counts = True
    options = (
        Option(
            "fisher_batch",
            None,
            "windows per Fisher minibatch, one squared-gradient sample each (default: half a forward chunk)",
            type=int,
            metavar="N",
            minimum=1,
        ),
    )

    def rank(self, inputs: RankInputs) -> Ranking:
        self.values["fisher_batch"] = self.values["fisher_batch"] or max(1, inputs.chunk // 2)
        grads = mask_gradients(
            inputs.skeleton,
            inputs.ids,
            inputs.structure,
            inputs.shape,
            inputs.device,
            self.values["fisher_batch"],
            inputs.work / "fisher",
            inputs.progress,
        )
        size = inputs.shape.group_size
        if inputs.per_group:
            heads = [g.pow(2).sum(0) for g in grads.heads]
            search = torch.stack(heads)
        else:
            heads = [group_scores(g, size).repeat_interleave(size) / size for g in grads.heads]
            search = torch.stack([group_scores(g, size) for g in grads.heads])
        neurons = [g.pow(2).sum(0) for g in grads.neurons]
        return Ranking(heads, neurons, search, grads.heads, grads.neurons)
