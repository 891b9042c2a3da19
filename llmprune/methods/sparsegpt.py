"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Per Linear: the Hessian H = Σ x xᵀ of its calibration inputs, dampened by 1% of its mean diagonal,
inverted through Cholesky; then columns are pruned left to right in blocks of 128 with lazy
OBS updates that push each pruned weight's error onto the columns not yet visited.
"""

from __future__ import annotations

import torch

from llmprune.errors import LLMPruneError
from llmprune.methods import masks
from llmprune.methods.base import InputStats, Pattern, Pruned, PruningMethod

MAX_DAMPING_RETRIES = 6


def inverse_cholesky(hessian: torch.Tensor, dampening: float, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = dampening·mean(diag H).

    If H + λI is not positive definite, λ grows tenfold and the solve is retried; every retry is
    reported (never a silent fallback to magnitude pruning).
    """
    h = hessian.to(dtype)
    damp = dampening * float(torch.diagonal(h).mean())
    for retry in range(MAX_DAMPING_RETRIES + 1):
        damped = h.clone()
        damped.diagonal().add_(damp)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper.float(), {
                    "damping": damp / max(float(torch.diagonal(h).mean()), 1e-30),
                    "damping_retries": retry,
                }
        damp = damp * 10 if damp > 0 else 1e-6
    raise LLMPruneError(
        f"Hessian is not positive definite even with damping {damp:g} after {MAX_DAMPING_RETRIES} retries"
    )


class SparseGPT(PruningMethod):
    """OBS-based pruning with weight reconstruction (unstructured or N:M)."""

    name = "sparsegpt"
    statistics = "hessian"

    def __init__(
        self, dampening: float = 0.01, blocksize: int = 128, inverse_dtype: torch.dtype = torch.float64, **options
    ) -> None:
        super().__init__(**options)
        self.dampening = dampening
        self.blocksize = blocksize
        self.inverse_dtype = inverse_dtype

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        assert stats is not None and stats.hessian is not None
        w = weight.float().clone()
        rows, cols = w.shape
        h = stats.hessian.to(w.device).clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        hinv, info = inverse_cholesky(h, self.dampening, self.inverse_dtype)
        mask = torch.zeros_like(w, dtype=torch.bool)
        block = max(pattern.m, (self.blocksize // pattern.m) * pattern.m) if pattern.is_nm else self.blocksize
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
        return Pruned(w.masked_fill(mask, 0.0).to(weight.dtype), mask, info)
