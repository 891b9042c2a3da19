"""ALPS (Meng et al. 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning for Large Language
Models"): the layer-wise reconstruction problem

    min_W tr((W − W₀) H (W − W₀)ᵀ)   subject to W having the sparsity pattern

solved by ADMM on the split W = D, where only D carries the pattern, with a penalty ρ raised as the support
settles; then a conjugate-gradient refit of the kept weights on that fixed support.

As in the reference code, H is damped (1% of its mean diagonal) and the problem is solved in the coordinates
where H has a unit diagonal (B = W·diag(√h), the Jacobi preconditioning of the refit). H = Q diag(λ) Qᵀ is
factored once per group of Linears sharing an input, so an ADMM step costs two GEMMs whatever ρ is:

    B ← (C − V + ρD) Q diag(1/(λ+ρ)) Qᵀ        with C = B₀H
    D ← Π(B + V/ρ)                              Π: keep the largest |·| the pattern allows
    V ← V + ρ(B − D)

Every `update_every` steps, the share of the support that moved sets ρ (the reference schedule): ×1.3 while more
than 10% of it moves, ×1.2 above 0.5%, ×1.1 while anything moves; at the start, a support that does not move
means ρ is too large: ÷5 (and a restart from W₀ if it moved a little). The loop ends when the support stops
moving once ρ has grown, or past `switch` steps once less than 0.03% of it moves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from llmprune.errors import LLMPruneError
from llmprune.methods import masks
from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.sparsegpt import DAMPENING
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.pattern import Pattern
from llmprune.settings import Option

MAX_RHO = 1e6
SWITCH_CHANGE = 3e-4  # past `switch` steps, a support moving less than this share counts as settled


def project(b: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The pruned mask of Π(b): the exact count of smallest |b| in the whole matrix, or the M−N smallest of every
    group of M inputs."""
    scores = b.square()
    return masks.n_m(scores, pattern) if pattern.is_nm else masks.unstructured_global(scores, pattern.sparsity)


def normalized_hessian(
    hessian: torch.Tensor, dampening: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H', scale, λ, Q) in `dtype`: H damped (dead inputs' diagonal set to 1 first) and scaled to a unit diagonal,
    H' = diag(1/scale) (H + δI) diag(1/scale), and its eigendecomposition H' = Q diag(λ) Qᵀ, computed in float64
    whatever `dtype` is (as the reference code does: ADMM divides by λ + ρ, and ρ can get small)."""
    h = hessian.to(torch.float64, copy=True)
    dead = torch.diagonal(h) == 0
    torch.diagonal(h).masked_fill_(dead, 1.0)
    torch.diagonal(h).add_(dampening * float(torch.diagonal(h).mean()))
    scale = torch.diagonal(h).sqrt()
    h.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1))
    try:
        eigenvalues, q = torch.linalg.eigh(h)
    except torch.linalg.LinAlgError as exc:
        raise LLMPruneError(f"ALPS: the Hessian's eigendecomposition failed ({exc}); raise --dampening") from exc
    return h.to(dtype), scale.to(dtype), eigenvalues.to(dtype), q.to(dtype)


def refit(
    h: torch.Tensor, c: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, steps: int, tolerance: float
) -> tuple[torch.Tensor, int, float]:
    """Conjugate gradients, row by row at once, on min_b (b − b₀) H (b − b₀)ᵀ over the entries `keep` allows,
    i.e. H_SS b_S = c_S with c = b₀H, from `b`. Stops after `steps` or once every row's residual is below
    `tolerance` times its ‖c_S‖. Returns the refit, the steps taken and the largest relative residual."""
    keep = keep.to(b.dtype)
    b = b * keep
    r = (c - b @ h) * keep
    scale = (c * keep).norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
    p = r.clone()
    rr = (r * r).sum(1)
    taken = 0
    while taken < steps:
        taken += 1
        hp = (p @ h) * keep
        alpha = rr / (p * hp).sum(1).clamp_min(torch.finfo(b.dtype).tiny)
        b.add_(alpha.unsqueeze(1) * p)
        r.sub_(alpha.unsqueeze(1) * hp)
        fresh = (r * r).sum(1)
        if float((fresh.sqrt() / scale).max()) <= tolerance:
            rr = fresh
            break
        p.mul_((fresh / rr.clamp_min(torch.finfo(b.dtype).tiny)).unsqueeze(1)).add_(r)
        rr = fresh
    return b, taken, float((rr.sqrt() / scale).max())


class ALPS(PruningMethod):
    """ADMM with a penalty schedule, then a conjugate-gradient refit on the support (unstructured or N:M)."""

    name = "alps"
    summary = "ADMM on the layer-wise reconstruction, then a refit on the support (Meng et al. 2024)"
    statistics = (Hessian,)
    workspace_label = "ALPS workspace"
    inverse_option = "alps_dtype"
    options = (
        DAMPENING,
        Option("alps_iterations", 300, "most ADMM steps per Linear (default 300)", type=int, minimum=1, metavar="N"),
        Option("alps_rho", 0.1, "initial ADMM penalty rho (default 0.1)", type=float, minimum=1e-12, metavar="F"),
        Option(
            "alps_update_every", 3, "ADMM steps between penalty updates (default 3)", type=int, minimum=1, metavar="N"
        ),
        Option(
            "alps_switch",
            30,
            "steps before a nearly still support ends ADMM (default 30)",
            type=int,
            minimum=0,
            metavar="N",
        ),
        Option("alps_pcg_steps", 10, "conjugate-gradient refit steps (default 10)", type=int, minimum=0, metavar="N"),
        Option(
            "alps_pcg_tolerance", 1e-4, "refit stops below this relative residual", type=float, minimum=0.0, metavar="F"
        ),
        Option(
            "alps_dtype",
            "float32",
            "dtype of the ADMM solve and its eigendecomposition: float32 (default) or float64",
            choices=("float32", "float64"),
        ),
    )

    def __init__(self, **values) -> None:
        super().__init__(**values)
        v = self.values
        self.dampening = float(v["dampening"])
        self.iterations, self.rho = int(v["alps_iterations"]), float(v["alps_rho"])
        self.update_every, self.switch = int(v["alps_update_every"]), int(v["alps_switch"])
        self.pcg_steps, self.pcg_tolerance = int(v["alps_pcg_steps"]), float(v["alps_pcg_tolerance"])
        dtype = v["alps_dtype"]
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        self.values["alps_dtype"] = self.dtype

    @classmethod
    def workspace_bytes(
        cls,
        rows: int,
        n: int,
        weight_dtype: torch.dtype,
        inverse_dtype: torch.dtype,
        options: Mapping[str, Any] | None = None,
    ) -> int:
        """Peak bytes of one solve beyond the Hessian and the layer, the larger of two phases, plus the result in the
        weight's dtype. The eigendecomposition: H' and its eigenvectors in float64 with LAPACK's workspace (about
        2n²), then both cast to the solve dtype. The ADMM: those two n x n matrices, B₀, C, B, D, V, the restart copy
        and a step's three temporaries in the solve dtype, and the projection's selection (kthvalue's copy and int64
        indices, the squares, the masks: 20 bytes an element). Measured by tests/test_alps.py."""
        s = inverse_dtype.itemsize
        e = rows * n
        eigh = 4 * n * n * 8 + 2 * n * n * s
        return max(eigh, 2 * n * n * s + e * (9 * s + 20)) + e * weight_dtype.itemsize

    def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
        assert stats is not None
        hessian = stats[Hessian].matrix.to(weight.device)
        key = ("alps eigh", self.dampening, self.dtype, weight.device)
        h, scale, eigenvalues, q = stats.derived(key, lambda: normalized_hessian(hessian, self.dampening, self.dtype))
        b0 = weight.to(self.dtype) * scale.unsqueeze(0)
        b0[:, torch.diagonal(hessian) == 0] = 0.0
        b, mask, info = self.admm(b0, h, eigenvalues, q, pattern)
        if not mask.any() or mask.all():  # nothing pruned, or nothing kept: nothing to refit
            return Pruned(weight.masked_fill(mask, 0.0), mask, info)
        b, steps, residual = refit(h, b0 @ h, b, ~mask, self.pcg_steps, self.pcg_tolerance)
        info.update(pcg_steps=steps, pcg_residual=residual)
        w = (b / scale.unsqueeze(0)).masked_fill_(mask, 0.0)
        return Pruned(w.to(weight.dtype), mask, info)

    def admm(
        self, b0: torch.Tensor, h: torch.Tensor, eigenvalues: torch.Tensor, q: torch.Tensor, pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The ADMM loop from B₀; returns Π(B) (the final iterate on its support), its pruned mask and the loop's
        record: steps, final ρ, and the primal residual ‖B − D‖ / ‖D‖."""
        start = project(b0, pattern)
        kept = b0.numel() - int(start.sum())
        if kept in (0, b0.numel()):  # the pattern leaves no choice
            return b0.masked_fill(start, 0.0), start, {"admm_iterations": 0, "primal_residual": 0.0}
        c = b0 @ h
        rho, grown = self.rho, False
        d0 = b0.masked_fill(start, 0.0)
        b, d, v = b0.clone(), d0.clone(), torch.zeros_like(b0)
        previous = start
        step = 0
        for step in range(1, self.iterations + 1):
            b = ((c - v + rho * d) @ q).div_(eigenvalues + rho) @ q.T
            u = b + v / rho
            pruned = project(u, pattern)
            d = u.masked_fill_(pruned, 0.0)
            v.add_(rho * (b - d))
            if step % self.update_every:
                continue
            moved = int((pruned != previous).sum()) / kept
            previous = pruned
            if moved > 0.1:
                rho, grown = rho * 1.3, True
            elif moved > 0.005:
                rho, grown = rho * 1.2, True
            elif moved > 0:
                if grown:
                    rho *= 1.1
                else:  # the support barely moves from the start: ρ is too large, restart with less
                    rho /= 5
                    b, d, v = b0.clone(), d0.clone(), torch.zeros_like(b0)
            elif grown:
                break
            else:
                rho /= 5
            rho = min(rho, MAX_RHO)
            if step > self.switch and moved < SWITCH_CHANGE:  # the reference's 0-based step >= switch
                break
        residual = float((b - d).norm() / d.norm().clamp_min(torch.finfo(b.dtype).tiny))
        mask = project(b, pattern)
        return b.masked_fill_(mask, 0.0), mask, {"admm_iterations": step, "rho": rho, "primal_residual": residual}
