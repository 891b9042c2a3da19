"""The SparseGPT solve as the engine ran it before the in-place rewrite (issue 18), kept as the
reference the in-place solve must reproduce: each Linear clones its Hessian, inverts a dampened copy
through Cholesky with every intermediate kept, and applies its lazy updates over whole rows."""

from __future__ import annotations

import torch

from llmprune.methods import masks
from llmprune.methods.base import Pattern


def reference_inverse(hessian: torch.Tensor, dampening: float, dtype: torch.dtype) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening·mean(diag H), out of place (no retries)."""
    h = hessian.to(dtype)
    damped = h.clone()
    damped.diagonal().add_(dampening * float(torch.diagonal(h).mean()))
    factor = torch.linalg.cholesky(damped)
    return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()


def reference_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, dtype=torch.float64, dampening=0.01, blocksize=128
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned weight and mask (True where pruned)."""
    w = weight.float().clone()
    rows, cols = w.shape
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = reference_inverse(h, dampening, dtype)
    mask = torch.zeros_like(w, dtype=torch.bool)
    block = max(pattern.m, (blocksize // pattern.m) * pattern.m) if pattern.is_nm else blocksize
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(h1)
        err1 = torch.zeros_like(w1)
        if pattern.is_nm:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            count = round(pattern.sparsity * rows * i2) - round(pattern.sparsity * rows * i1)
            mask1 = masks.lowest_global(w1.pow(2) / d.pow(2).unsqueeze(0), count)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = w1[:, i : i + pattern.m].pow(2) / d[i : i + pattern.m].pow(2).unsqueeze(0)
                mask1[:, i : i + pattern.m] = masks.n_m(group, pattern)
            col = w1[:, i]
            err = (col - col.masked_fill(mask1[:, i], 0.0)) / d[i]
            w1[:, i:].sub_(err.unsqueeze(1) * h1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = w1.masked_fill(mask1, 0.0)
        mask[:, i1:i2] = mask1
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    return w.masked_fill(mask, 0.0).to(weight.dtype), mask
