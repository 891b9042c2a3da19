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
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.stream import open_stream
from llmprune.models.skeleton import Skeleton
from llmprune.settings import Option
from llmprune.structured.arch import Shape, Structure
from llmprune.structured.base import Ranking, RankInputs, StructuredMethod
from llmprune.structured.search import group_scores


@dataclass
class MaskGradients:
    """Per layer, a [chunks, units] matrix of ∂L_b/∂m (query heads; FFN neurons), and the empirical Fisher
    Σ_s g_s² per unit: g_s the gradient of chunk s's loss (Kwon's samples), or (per_token) the gradient of the
    chunk's loss with respect to each token's copy of the mask (a sample per token; they sum to the chunk's)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    fisher_heads: list[torch.Tensor]
    fisher_neurons: list[torch.Tensor]
    fisher_groups: list[torch.Tensor]  # of whole KV groups: Σ_s (Σ_heads-in-group ∂L_s/∂m)²
    loss: float


class Masks:
    """Multiplicative masks on the inputs of the attention output and FFN down projections: one per unit, or
    (per_token) one per unit and input row (a token; created when the projection first sees its input, whatever
    the layout), whose gradients are the per-token samples (their sum is the per-unit gradient)."""

    def __init__(self, layer: nn.Module, structure: Structure, shape: Shape, device: torch.device, per_token: bool):
        self.head = None if per_token else torch.ones(shape.heads, device=device, requires_grad=True)
        self.neuron = None if per_token else torch.ones(shape.intermediate, device=device, requires_grad=True)
        head_dim = shape.head_dim

        def on_down(module, args):
            if self.neuron is None:
                self.neuron = torch.ones(*args[0].shape[:-1], shape.intermediate, device=device, requires_grad=True)
            return (args[0] * self.neuron.to(args[0].dtype), *args[1:])

        def on_o(module, args):
            if self.head is None:
                self.head = torch.ones(*args[0].shape[:-1], shape.heads, device=device, requires_grad=True)
            return (args[0] * self.head.repeat_interleave(head_dim, dim=-1).to(args[0].dtype), *args[1:])

        self._handles = [layer.get_submodule(structure.down).register_forward_pre_hook(on_down)]
        if structure.heads:
            self._handles.append(layer.get_submodule(structure.o).register_forward_pre_hook(on_o))

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
    per_token: bool = False,
    ranks: Ranks = SINGLE,
) -> MaskGradients:
    """∂L_b/∂mask for every chunk b of `ids`, every layer's heads and neurons (streamed), and the squared
    gradients summed over the chunks or (per_token) over every token's mask. With several ranks, each computes
    the chunks of its shard; the squares are summed (in --reduce-dtype) and the per-chunk rows gathered in
    rank order, which is the chunks' order."""
    windows = ids.shape[0]
    chunk = ranks.chunk_for(windows, chunk)
    ids = ranks.part(ids, chunk)
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
    fisher_heads: list[torch.Tensor] = [torch.empty(0)] * skeleton.num_layers
    fisher_neurons: list[torch.Tensor] = [torch.empty(0)] * skeleton.num_layers
    fisher_groups: list[torch.Tensor] = [torch.empty(0)] * skeleton.num_layers
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
        squares = [torch.zeros(n, dtype=ranks.reduce_dtype) for n in (shape.heads, shape.intermediate, shape.kv_heads)]
        for position in range(len(inputs)):
            x = inputs.get(position).to(device, dtype).requires_grad_(True)
            masks = Masks(layer, structure, shape, device, per_token)
            try:
                with torch.enable_grad():
                    out = stream.run(index, layer, x)
                    out.backward(grads.get(position).to(device, out.dtype))
            finally:
                masks.remove()
            grads.put(position, x.grad.detach())
            head = masks.head.grad.detach().float() if structure.heads else torch.zeros(shape.heads, device=device)
            head = head.reshape(-1, shape.heads)  # this chunk's samples: one, or one per token (summed as we go)
            neuron = masks.neuron.grad.detach().float().reshape(-1, shape.intermediate)
            squares[0] += head.pow(2).sum(0).cpu()
            squares[1] += neuron.pow(2).sum(0).cpu()
            squares[2] += group_scores(head, shape.group_size).cpu()
            head_rows.append(head.sum(0).cpu())
            neuron_rows.append(neuron.sum(0).cpu())
        fisher_heads[index], fisher_neurons[index], fisher_groups[index] = (ranks.sum_(q).float() for q in squares)
        heads[index] = torch.cat(ranks.gather_objects(torch.stack(head_rows)))
        neurons[index] = torch.cat(ranks.gather_objects(torch.stack(neuron_rows)))
        skeleton.unload_layer(index)
    (total_loss,) = ranks.sum_numbers(total_loss)
    return MaskGradients(heads, neurons, fisher_heads, fisher_neurons, fisher_groups, total_loss / windows)


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
        Option(
            "fisher_samples",
            "token",
            "the squared-gradient samples of the Fisher: token (one per calibration token: the same backward pass, "
            "a mask per token; default) or minibatch (Kwon et al.: one per --fisher-batch windows, with Kwon's "
            "mask rearrangement)",
            choices=("minibatch", "token"),
        ),
        Option(
            "fisher_combine",
            "flap",
            "flap: rank by the geometric mean of the Fisher and FLAP's fluctuation, each normalized by its layer "
            "mean (default); none: by the Fisher alone",
            choices=("none", "flap"),
        ),
    )

    def rank(self, inputs: RankInputs) -> Ranking:
        self.values["fisher_batch"] = self.values["fisher_batch"] or max(1, inputs.chunk // 2)
        per_token = self.values["fisher_samples"] == "token"
        grads = mask_gradients(
            inputs.skeleton,
            inputs.ids,
            inputs.structure,
            inputs.shape,
            inputs.device,
            self.values["fisher_batch"],
            inputs.work / ("fisher" if inputs.ranks.main else f"fisher-rank-{inputs.ranks.rank:05d}"),
            inputs.progress,
            per_token=per_token,
            ranks=inputs.ranks,
        )
        size = inputs.shape.group_size
        if inputs.per_group:
            heads = grads.fisher_heads
            search = torch.stack(heads)
        else:
            heads = [g.repeat_interleave(size) / size for g in grads.fisher_groups]
            search = torch.stack(grads.fisher_groups)
        if self.values["fisher_combine"] == "flap":
            from llmprune.structured.scores import fluctuation_scores

            flap = fluctuation_scores(inputs)
            # the per-layer choice from both scores; the counts from the Fisher alone (its units, the loss's, compare
            # heads with neurons; the normalized mean does not)
            neurons = [_geometric(f, v) for f, v in zip(grads.fisher_neurons, flap.neurons)]
            combined = Ranking.of_scores(
                [_geometric(f, v) for f, v in zip(heads, flap.heads)], neurons, inputs.shape, inputs.per_group
            )
            combined.search_heads, combined.search_neurons = search, torch.stack(grads.fisher_neurons)
            return combined
        if per_token:  # Kwon's rearrangement needs every sample's gradient: too many tokens to keep; top scores
            return Ranking(heads, grads.fisher_neurons, search)
        return Ranking(heads, grads.fisher_neurons, search, grads.heads, grads.neurons)


def _geometric(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(a/mean(a) * b/mean(b)): two scores of one layer's units, each on its own scale."""
    return (a / a.mean().clamp_min(1e-30) * b / b.mean().clamp_min(1e-30)).sqrt()
