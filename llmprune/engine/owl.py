"""OWL, Outlier Weighed Layerwise sparsity (Yin et al. 2024): layers with more outliers keep more weights.

A layer's outlier ratio is the share of its Wanda scores |W_ij|·‖X_j‖ (every target Linear of the layer together)
above M times their mean. The ratios are min-max scaled to [0, 2λ] and centred on their mean (weighted by each
layer's target weights, so the model-wide sparsity stays the target when layers differ in size); a layer's
sparsity is the target minus its centred ratio. The reference code stops there, which can put a layer up to 2λ
from the target when the ratios are lopsided; the paper bounds every layer to ±λ, so deviations beyond λ are
scaled down, all by the same factor (the order, and the mean, are kept).

The ratios need each layer's inputs: as in the reference code they come from the dense model, here by one
streamed statistics-only pass (each layer loaded, its inputs' squared norms accumulated, its dense outputs
computed, freed) before the pruning pass; it costs about one more forward through the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune.engine.plan import Choice
from llmprune.engine.prune_layer import LayerPruner, TargetRule
from llmprune.engine.stream import LayerStream
from llmprune.methods.statistics import SquaredNorm
from llmprune.methods.wanda import Wanda
from llmprune.models.skeleton import Skeleton
from llmprune.pattern import Pattern


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """The share of all `scores` (a layer's Linears together) above m times their mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-layer sparsities: target minus the centred, scaled outlier ratios, within ±λ of the target; their
    mean weighted by `sizes` (each layer's target weights) is the target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = float(r.max() - r.min())
    scaled = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    deviation = scaled - (scaled * w).sum() / w.sum()
    largest = float(deviation.abs().max())
    if largest > lam:
        deviation *= lam / largest
    return (target - deviation).tolist()


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
) -> list[float]:
    """Every decoder layer's outlier ratio, from one streamed pass of the dense model over the calibration
    windows (activations spilled to `work` when the plan keeps them on disk)."""
    spilled = choice.activations == "disk"
    act_device = torch.device("cpu") if choice.activations != "device" else device
    stream = LayerStream(skeleton, device, compute_dtype, choice.chunk, act_device, choice.act_dtype, forward_dtype)
    sides = [work / "owl-a", work / "owl-b"]
    if spilled:
        for side in sides:
            side.mkdir(parents=True, exist_ok=True)
    acts = stream.begin(ids, spill_to=sides[1] if spilled else None)
    stream.prepare({int(chunk.shape[0]) for chunk in acts.chunks} | {1})
    collector = LayerPruner(Wanda(), Pattern(0.0), rule)
    ratios = []
    for index in tqdm(range(skeleton.num_layers), desc="OWL outlier ratios", unit="layer", disable=quiet):
        layer = skeleton.load_layer(index, device, compute_dtype)
        scores = [
            module.weight.detach().abs().float() * stats[SquaredNorm].value.sqrt().unsqueeze(0)
            for module, stats in collector.statistics(stream, index, layer, acts).values()
            if stats is not None  # an expert no calibration token reached has no score
        ]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        del scores
        acts.spill_to = sides[index % 2] if spilled else None
        stream.forward(index, layer, acts)
        skeleton.unload_layer(index)
    stream.close()
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
