"""Which heads and neurons to keep: a search over uniform per-layer counts under a budget, then the
per-layer choice (top scores), then Kwon's mask rearrangement with the block-diagonal Fisher."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.errors import LLMPruneError
from llmprune.structured.arch import Shape, Structure


@dataclass(frozen=True)
class Costs:
    """Parameters of one decoder layer: fixed part, per KV group (with its query heads), per query
    head, per neuron; and multiply-accumulates per token for the same units at a sequence length."""

    fixed: int
    group: int
    query_head: int
    neuron: int
    group_macs: float
    query_head_macs: float
    neuron_macs: float
    fixed_macs: float

    @classmethod
    def of(cls, layer, structure: Structure, shape: Shape, seqlen: int) -> Costs:
        def size(name: str | None, part: str) -> int:
            if name is None:
                return 0
            module = layer.get_submodule(name)
            tensor = getattr(module, part, None)
            return 0 if tensor is None else tensor.numel()

        total = sum(p.numel() for p in layer.parameters())
        hd = shape.head_dim
        q_head = (size(structure.q, "weight") + size(structure.q, "bias")) // shape.heads if structure.q else 0
        kv_head = (size(structure.k, "weight") + size(structure.k, "bias")) // shape.kv_heads if structure.k else 0
        o_head = size(structure.o, "weight") // shape.heads
        per_query = q_head + o_head if structure.heads else 0  # heads the config cannot drop cost nothing here
        per_kv = 2 * kv_head if structure.heads else 0
        neuron = sum(size(n, "weight") + size(n, "bias") for n in structure.up) // shape.intermediate
        neuron += size(structure.down, "weight") // shape.intermediate
        if structure.heads:
            units = shape.heads * per_query + shape.kv_heads * per_kv + shape.intermediate * neuron
        else:
            units = shape.intermediate * neuron
        attention_macs = 2 * seqlen / 2 * hd  # scores and values against half the context on average
        return cls(
            fixed=total - units,
            group=shape.group_size * per_query + per_kv,
            query_head=per_query,
            neuron=neuron,
            group_macs=shape.group_size * (per_query + attention_macs) + per_kv,
            query_head_macs=per_query + attention_macs,
            neuron_macs=neuron,
            fixed_macs=total - units + (0 if structure.heads else shape.heads * attention_macs),
        )

    def layer(self, groups: int, heads_per_group: int, neurons: int, group_size: int) -> int:
        """Parameters of a layer with these counts (heads_per_group < group_size: query heads removed)."""
        removed_queries = groups * (group_size - heads_per_group)
        return self.fixed + groups * self.group - removed_queries * self.query_head + neurons * self.neuron

    def layer_macs(self, groups: int, heads_per_group: int, neurons: int, group_size: int) -> float:
        removed_queries = groups * (group_size - heads_per_group)
        return (
            self.fixed_macs
            + groups * self.group_macs
            - removed_queries * self.query_head_macs
            + neurons * self.neuron_macs
        )


@dataclass(frozen=True)
class Counts:
    """Uniform per-layer counts to keep."""

    kv_groups: int
    heads_per_group: int
    neurons: int

    @property
    def heads(self) -> int:
        return self.kv_groups * self.heads_per_group


def allowed_groups(total: int) -> list[int]:
    """KV-group counts to keep: all of them, or an even number (tensor-parallel friendly), at least 2."""
    return sorted({total} | {g for g in range(2, total, 2)})


def allowed_neurons(total: int, multiple: int) -> list[int]:
    """Neuron counts: all of them, or a positive multiple of `multiple`."""
    return sorted({total} | set(range(multiple, total, multiple)))


def search_counts(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    shape: Shape,
    structure: Structure,
    costs: Costs,
    keep_fraction: float,
    by_flops: bool,
    per_group_heads: bool,
    neuron_multiple: int,
) -> Counts:
    """The uniform counts that keep the most score within the budget (Kwon's search over head counts,
    filling the rest of the budget with neurons).

    Scores are additive per unit (diagonal Fisher): `head_scores` is [layers, KV groups], or
    [layers, query heads] with `per_group_heads` (the same number of query heads kept in every group);
    `neuron_scores` is [layers, neurons].
    """
    layers = neuron_scores.shape[0]
    size = shape.group_size
    measure = costs.layer_macs if by_flops else costs.layer
    budget = keep_fraction * measure(shape.kv_heads, size, shape.intermediate, size)
    if not structure.heads:
        options, kept_heads = [(shape.kv_heads, size)], None
    elif per_group_heads:
        even = [r for r in range(1, size + 1) if r == size or (shape.kv_heads * r) % 2 == 0]
        options = [(shape.kv_heads, r) for r in even]
        per_group = head_scores.reshape(layers, shape.kv_heads, size).sort(-1, descending=True).values
        kept_heads = {r: float(per_group[:, :, :r].sum()) for _, r in options}
    else:
        options = [(g, size) for g in allowed_groups(shape.kv_heads)]
        ranked = head_scores.sort(-1, descending=True).values
        kept_heads = {g: float(ranked[:, :g].sum()) for g, _ in options}
    kept_neurons = neuron_scores.sort(-1, descending=True).values.cumsum(-1).sum(0)  # [n] -> score of top n+1
    best, best_score = None, None
    for groups, per_group in options:
        fits = [
            n
            for n in allowed_neurons(shape.intermediate, neuron_multiple)
            if measure(groups, per_group, n, size) <= budget
        ]
        if not fits:
            continue
        neurons = fits[-1]
        score = float(kept_neurons[neurons - 1])
        if kept_heads is not None:
            score += kept_heads[per_group if per_group_heads else groups]
        if best_score is None or score > best_score:
            best, best_score = Counts(groups, per_group, neurons), score
    if best is None:
        raise LLMPruneError("no uniform head/neuron counts fit that budget; remove less")
    return best


def group_scores(head_grads: torch.Tensor, group_size: int) -> torch.Tensor:
    """Fisher of whole KV groups: Σ_b (Σ_heads-in-group g_b)², not the sum of the heads' Fishers."""
    chunks, heads = head_grads.shape
    return head_grads.reshape(chunks, heads // group_size, group_size).sum(-1).pow(2).sum(0)


def rearrange(grads: torch.Tensor, pruned: int) -> list[int]:
    """Kwon's greedy mask rearrangement in one layer: which `pruned` units to remove so that
    Σ_b (Σ_{i∈S} g_{b,i})² (the block-diagonal Fisher estimate of the loss increase) is small.

    Start from the lowest diagonal Fisher; walk the other units in ascending order, add each, then
    drop the member whose removal leaves the smallest loss. `grads`: [chunks, units].
    """
    units = grads.shape[1]
    if pruned <= 0:
        return []
    if pruned >= units:
        return list(range(units))
    grads = grads.double()
    order = grads.pow(2).sum(0).argsort().tolist()
    chosen = order[:pruned]
    total = grads[:, chosen].sum(1)
    for unit in order[pruned:]:
        candidates = chosen + [unit]
        with_unit = total + grads[:, unit]
        losses = (with_unit.unsqueeze(1) - grads[:, candidates]).pow(2).sum(0)
        drop = int(losses.argmin())
        total = with_unit - grads[:, candidates[drop]]
        chosen = candidates[:drop] + candidates[drop + 1 :]
    return sorted(chosen)
