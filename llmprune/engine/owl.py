"""OWL, Outlier Weighed Layerwise sparsity (Yin et al. 2024): layers with more outliers keep more weights.

A layer's outlier ratio is the share of its Wanda scores |W_ij|·‖X_j‖ (every target Linear of the layer together)
above M times their mean. The ratios are min-max scaled to [0, 2λ] and centred on their mean (weighted by each
layer's target weights, so the model-wide sparsity stays the target when layers differ in size); a layer's
sparsity is the target minus its centred ratio. The reference code stops there, which can put a layer up to 2λ
from the target when the ratios are lopsided; the paper bounds every layer to ±λ, so deviations beyond λ are
scaled down, all by the same factor (the order, and the mean, are kept).

The ratios need each layer's inputs: as in the reference code they come from the dense model, here by one
streamed statistics-only pass (each layer loaded, its inputs' squared norms accumulated by hooks during the
one forward that computes its dense outputs, freed) before the pruning pass; it costs one more forward through
the model (the pruning pass runs about two: one for the statistics, one through the pruned layer). An input's norm is
its mean over the tokens the Linear saw (the reference's running mean): the same factor for every Linear of a
dense layer, but an MoE expert sees only the tokens routed to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune.engine.plan import Choice
from llmprune.engine.prune_layer import LayerPruner, TargetRule
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.stream import open_stream
from llmprune.methods.statistics import SquaredNorm
from llmprune.methods.wanda import Wanda
from llmprune.models.skeleton import Skeleton
from llmprune.pattern import Pattern


def outlier_ratio(parts: list[tuple[torch.Tensor, torch.Tensor]], m: float, rows: int = 4096) -> float:
    """The share of a layer's Wanda scores |W_ij|·‖X_j‖ above m times their mean; `parts` holds each Linear's weight
    and its inputs' norms. The mean comes from Σ_j ‖X_j‖ Σ_i |W_ij|, the count from `rows` rows at a time, so no
    more than a block of scores is ever held."""
    total = sum(weight.numel() for weight, _ in parts)
    mean = sum(float(weight.abs().sum(0, dtype=torch.float64) @ norm.double()) for weight, norm in parts) / total
    count = 0
    for weight, norm in parts:
        column = norm.float().unsqueeze(0)
        for start in range(0, weight.shape[0], rows):
            count += int((weight[start : start + rows].abs().float() * column > m * mean).sum())
    return count / total


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities: target minus the centred, scaled outlier ratios, within ±λ of the target; their
    mean weighted by `sizes` (each layer's target weights) is the target. A layer without targets (size 0) takes
    no part and gets the target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    part = w > 0
    low, high = float(r[part].min()), float(r[part].max())
    scaled = (r - low) / (high - low) * 2 * lam if high > low else torch.zeros_like(r)
    deviation = torch.where(part, scaled - (scaled * w).sum() / w.sum(), 0.0)
    largest = float(deviation.abs().max())
    if largest > lam:
        deviation *= lam / largest
    return (target - deviation).clamp(0.0, 1.0 - 1e-9).tolist()


def layer_outlier_ratios(
    skeleton: Skeleton,
    ids: torch.Tensor,
    device: torch.device,
    compute_dtype: torch.dtype,
    choice: Choice,
    rule: TargetRule,
    m: float,
    work: Path,
    quiet: bool,
    forward_dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> list[float]:
    """Every decoder layer's outlier ratio, from one streamed pass of the dense model over the calibration
    windows (activations spilled to `work` when the plan keeps them on disk); with several ranks, each streams its
    shard and the norms are summed across ranks, so every rank finds the same ratios."""
    ids = ranks.part(ids, choice.chunk)
    spilled = choice.activations == "disk"
    act_device = torch.device("cpu") if choice.activations != "device" else device
    sides = [work / "owl-a", work / "owl-b"]
    stream = None
    try:
        if spilled:
            for side in sides:
                side.mkdir(parents=True, exist_ok=True)
        stream, acts = open_stream(
            skeleton, ids, device, choice.chunk, act_device, sides[1] if spilled else None,
            compute_dtype, choice.act_dtype, forward_dtype,
        )  # fmt: skip
        collector = LayerPruner(Wanda(), Pattern(0.0), rule, error_tokens=0, ranks=ranks)
        ratios = []
        for index in tqdm(range(skeleton.num_layers), desc="OWL outlier ratios", unit="layer", disable=quiet):
            layer = skeleton.load_layer(index, device, compute_dtype)
            acts.spill_to = sides[index % 2] if spilled else None  # the outputs go to the side not being read
            parts = [  # per-token mean norms: an expert's inputs are the tokens routed to it, not all of them
                (module.weight.detach(), (stats[SquaredNorm].value / stats.tokens).sqrt())
                for module, stats in collector.statistics(stream, index, layer, acts).values()
                if stats is not None  # an expert no calibration token reached has no score
            ]
            ratios.append(outlier_ratio(parts, m) if parts else 0.0)
            del parts
            skeleton.unload_layer(index)
    finally:
        if stream is not None:
            stream.close()
        for side in sides:  # the pruning pass has activations of its own to keep on disk
            shutil.rmtree(side, ignore_errors=True)
    return ratios


def owl_profile(ratios: list[float], sizes: list[int], pattern: Pattern, lam: float, m: float, seconds: float) -> dict:
    """The profile the run state keeps and the report records: per layer its outlier ratio, target weights
    and sparsity."""
    sparsities = owl_sparsities(ratios, sizes, pattern.sparsity, lam)
    layers = [
        {"index": i, "outlier_ratio": r, "weights": n, "sparsity": s}
        for i, (r, n, s) in enumerate(zip(ratios, sizes, sparsities, strict=True))
    ]
    return {"profile": "owl", "lambda": lam, "m": m, "seconds": round(seconds, 2), "layers": layers}
