"""Mask tuning (Kwon et al. 2022): per layer, a scale for every kept head and neuron that best
reconstructs the dense teacher's output from the pruned student's input, by damped least squares.

For a unit u with output contribution c_u(t) to the residual stream, the student's output is
x(t) + Σ_u s_u c_u(t); the target is the teacher's. With A = [c_u] and B = target - x, the scales
solve (AᵀA + λI)(s - 1) = Aᵀ(B - A·1), i.e. ridge toward the plain mask s = 1. The scales are
folded into the output projections' columns (o_proj per head, down_proj per neuron).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmprune.engine.ranks import Ranks

MAX_SCALE = 10.0


@dataclass
class Normal:
    """Accumulated normal equations AᵀA, AᵀB, BᵀB of one least-squares problem (float64)."""

    ata: torch.Tensor
    atb: torch.Tensor
    btb: float = 0.0

    @classmethod
    def zeros(cls, units: int) -> Normal:
        return cls(torch.zeros(units, units, dtype=torch.float64), torch.zeros(units, dtype=torch.float64))

    def sum_over(self, ranks: Ranks) -> None:
        """Every rank's equations added (float64, in rank order): a torchrun run's tokens are split across ranks."""
        if ranks.active:
            ranks.sum_(self.ata)
            ranks.sum_(self.atb)
            (self.btb,) = ranks.sum_numbers(self.btb)

    def error(self, scales: torch.Tensor) -> float:
        """‖B - A s‖² for the given scales (clamped at 0 against rounding when the fit is exact)."""
        s = scales.double()
        return max(0.0, float(self.btb - 2 * s @ self.atb + s @ self.ata @ s))


@dataclass
class Solution:
    scales: torch.Tensor
    error_before: float  # relative: ‖B - A·1‖² / ‖B‖²
    error_after: float
    note: str | None = None
    extra: dict = field(default_factory=dict)


def solve(normal: Normal, damping: float = 0.01) -> Solution:
    """Damped least squares toward s = 1, with guards: non-finite or extreme scales, or a fit worse
    than no tuning, fall back to s = 1 (and say so)."""
    units = normal.ata.shape[0]
    ones = torch.ones(units, dtype=torch.float64)
    base = max(normal.btb, 1e-30)
    before = normal.error(ones) / base
    if units == 0:
        return Solution(ones, before, before)
    lam = damping * float(torch.diagonal(normal.ata).mean().clamp_min(1e-30))
    system = normal.ata + lam * torch.eye(units, dtype=torch.float64)
    try:
        delta = torch.linalg.solve(system, normal.atb - normal.ata @ ones)
    except RuntimeError:
        return Solution(ones, before, before, "singular system: kept s = 1")
    scales = ones + delta
    if not bool(torch.isfinite(scales).all()) or float(scales.abs().max()) > MAX_SCALE:
        return Solution(
            ones, before, before, f"ill-conditioned (|s| up to {float(scales.abs().max()):.3g}): kept s = 1"
        )
    after = normal.error(scales) / base
    if after > before:
        return Solution(ones, before, before, "tuning did not lower the error: kept s = 1")
    return Solution(scales, before, after)


def accumulate_heads(
    normal: Normal,
    context: torch.Tensor,
    o_weight: torch.Tensor,
    units: list[list[int]],
    target: torch.Tensor,
    head_dim: int,
    token_block: int = 512,
) -> None:
    """Add one chunk's attention terms. context: o_proj input [tokens, heads*head_dim] (pruned heads
    zero); units: the query heads of each kept unit; target: B = teacher residual - student input."""
    d = o_weight.shape[0]
    heads = o_weight.shape[1] // head_dim
    w = o_weight.float().reshape(d, heads, head_dim)
    for start in range(0, context.shape[0], token_block):
        ctx = context[start : start + token_block].float().reshape(-1, heads, head_dim)
        per_head = torch.einsum("thk,dhk->thd", ctx, w)  # [t, heads, d]
        contrib = torch.stack([per_head[:, unit].sum(1) for unit in units], 1)  # [t, units, d]
        b = target[start : start + token_block].float()
        normal.ata += torch.einsum("tud,tvd->uv", contrib, contrib).double()
        normal.atb += torch.einsum("tud,td->u", contrib, b).double()
        normal.btb += float(b.pow(2).sum())


def accumulate_neurons(
    normal: Normal, activations: torch.Tensor, down_weight: torch.Tensor, kept: torch.Tensor, target: torch.Tensor
) -> None:
    """Add one chunk's FFN terms: AᵀA = (W_dᵀW_d)_SS ∘ Σ_t a_S a_Sᵀ, AᵀB_j = Σ_t a_j (W_d[:, j]ᵀ B(t))."""
    a = activations.float()[:, kept]
    w = down_weight.float()[:, kept]
    b = target.float()
    normal.ata += ((w.T @ w) * (a.T @ a)).double()
    normal.atb += (a * (b @ w)).sum(0).double()
    normal.btb += float(b.pow(2).sum())
