"""Exact mask selection shared by the methods: the k lowest scores per row, or N:M groups.

Counts are distributed by cumulative rounding, so a matrix of `numel` weights at sparsity s
always loses exactly round(s * numel) weights, whatever its shape.
"""

from __future__ import annotations

import torch

from llmprune.pattern import Pattern


def spread_counts(total: float, parts: int, device: torch.device | None = None) -> torch.Tensor:
    """Integer counts for `parts` equal slices whose sum is round(total) (cumulative rounding)."""
    edges = torch.round(torch.arange(parts + 1, dtype=torch.float64, device=device) * (total / parts))
    return (edges[1:] - edges[:-1]).to(torch.int64)


def lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask marking, in each row r, the counts[r] lowest scores (ties broken by position)."""
    order = torch.sort(scores, dim=1, stable=True).indices
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    chosen = ranks < counts.to(scores.device).unsqueeze(1)
    return torch.zeros_like(chosen).scatter_(1, order, chosen)


def unstructured_rows(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores within each row, exactly round(sparsity * numel) in total."""
    rows, cols = scores.shape
    return lowest_per_row(scores, spread_counts(sparsity * rows * cols, rows, scores.device))


def unstructured_global(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the round(sparsity * numel) lowest scores of the whole matrix."""
    return lowest_global(scores, round(sparsity * scores.numel()))


def lowest_global(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest scores of the whole tensor (ties broken by position)."""
    flat = scores.reshape(-1)
    if count <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(count).values
    mask = flat < threshold
    short = count - int(mask.sum())
    if short:  # the first ties by position (their positions only: no numel-sized index or cumsum)
        mask[(flat == threshold).nonzero().squeeze(1)[:short]] = True
    return mask.reshape(scores.shape)


def n_m(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Prune the M-N lowest scores in every group of M consecutive columns."""
    rows, cols = scores.shape
    groups = scores.reshape(rows * cols // pattern.m, pattern.m)
    counts = torch.full((groups.shape[0],), pattern.m - pattern.n, device=scores.device)
    return lowest_per_row(groups, counts).reshape(rows, cols)


def select(scores: torch.Tensor, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """The mask for `pattern`: N:M groups, or unstructured per row (Wanda) or per matrix (magnitude)."""
    if pattern.is_nm:
        return n_m(scores, pattern)
    return unstructured_rows(scores, pattern.sparsity) if per_row else unstructured_global(scores, pattern.sparsity)
