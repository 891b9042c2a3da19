"""SparseGPT (Frantar & Alistarh 2023, "Massive Language Models Can Be Accurately Pruned in One-Shot").

Per Linear: the Hessian H = Σ x xᵀ of its calibration inputs, dampened by 1% of its mean diagonal,
inverted through Cholesky; then columns are pruned left to right in blocks of 128 with lazy
OBS updates that push each pruned weight's error onto the columns not yet visited.

Memory: the inverse's factor is built in one n x n buffer (damped, factored, inverted and factored
again in place; H is only read) and shared by the Linears of a group; the OBS loop reads it one block
of rows at a time and applies its lazy updates in row chunks, so beyond that buffer a solve holds the
weight, its mask and O(n · block) elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from llmprune.errors import LLMPruneError
from llmprune.methods import masks
from llmprune.methods.base import Pruned, PruningMethod, RowBlock
from llmprune.methods.grid import Grid
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.pattern import Pattern
from llmprune.settings import Option

MAX_DAMPING_RETRIES = 6
DAMPENING = Option(
    "dampening", 0.01, "Hessian dampening, a fraction of its mean diagonal (SparseGPT, ALPS; default 0.01)",
    type=float, minimum=0.0,
)  # fmt: skip
BLOCKSIZE = 128  # the lazy-update block: the columns pruned together, and chosen over at once when unstructured
UPDATE_ROWS = 1024  # rows of the weight per lazy-update product: a 1024 x n temporary, still GEMM-sized


def inverse_factor(hessian: torch.Tensor, dampening: float, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor U of (H' + λI)⁻¹ (so that it equals UᵀU), in one n x n buffer of `dtype`.

    H' is H with the diagonal of dead inputs (never nonzero) set to 1, λ = dampening·mean(diag H'). The
    buffer is column-major, the layout LAPACK factors in place (a row-major one is copied first), so
    damping, potrf, potri and potrf again all happen in it. H is read, never written: if H' + λI is not
    positive definite, the buffer is refilled from H, λ grows tenfold and the solve is retried; every
    retry is reported (never a silent fallback to magnitude pruning).
    """
    n = hessian.shape[0]
    dead = torch.diagonal(hessian) == 0
    factor = torch.empty(n, n, dtype=dtype, device=hessian.device).mT  # column-major
    info = torch.empty((), dtype=torch.int32, device=hessian.device)

    def refill() -> None:
        factor.mT.copy_(hessian)  # H is symmetric: its row-major bytes are its column-major bytes
        factor.diagonal().masked_fill_(dead, 1.0)

    refill()
    mean = float(factor.diagonal().mean())
    damp = dampening * mean
    for retry in range(MAX_DAMPING_RETRIES + 1):
        if retry:
            refill()
        factor.diagonal().add_(damp)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
            torch.cholesky_inverse(factor, out=factor)
            torch.linalg.cholesky_ex(factor, upper=True, out=(factor, info))
            if int(info) == 0 and _finite(factor):
                return factor, {"damping": damp / max(mean, 1e-30), "damping_retries": retry}
        damp = damp * 10 if damp > 0 else 1e-6
    raise LLMPruneError(
        f"Hessian is not positive definite even with damping {damp:g} after {MAX_DAMPING_RETRIES} retries"
    )


def _finite(matrix: torch.Tensor, block: int = 256) -> bool:
    """Whether every element is finite, checked a block at a time in storage order (no n x n bool, and
    no contiguous copy of a strided block)."""
    dense = matrix if matrix.is_contiguous() else matrix.mT
    return all(bool(torch.isfinite(dense[i : i + block]).all()) for i in range(0, dense.shape[0], block))


class SparseGPT(PruningMethod):
    """OBS-based pruning with weight reconstruction (unstructured or N:M)."""

    name = "sparsegpt"
    summary = "OBS pruning with weight reconstruction (Frantar & Alistarh 2023)"
    statistics = (Hessian,)
    workspace_label = "SparseGPT workspace"
    inverse_option = "inverse_dtype"
    splits_rows = True  # given the inverse factor, rows are solved alone; unstructured masks pick per block
    options = (
        DAMPENING,
        Option("blocksize", BLOCKSIZE, f"SparseGPT block size (default {BLOCKSIZE})", type=int, minimum=1),
        Option(
            "inverse_dtype",
            "auto",
            "dtype of SparseGPT's Hessian inverse factor; auto: float64 unless the memory plan needs float32",
            choices=("auto", "float64", "float32"),
        ),
    )

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self.dampening = float(self.values["dampening"])
        self.blocksize = int(self.values["blocksize"])
        dtype = self.values["inverse_dtype"]  # "auto" left to the memory plan means float64
        if not isinstance(dtype, torch.dtype):
            dtype = getattr(torch, dtype.replace("auto", "float64"))
        self.inverse_dtype = dtype
        self.values["inverse_dtype"] = self.inverse_dtype

    @classmethod
    def workspace_bytes(
        cls,
        rows: int,
        n: int,
        weight_dtype: torch.dtype,
        inverse_dtype: torch.dtype,
        options: Mapping[str, Any] | None = None,
    ) -> int:
        """Peak bytes one solve holds beyond the Hessian and the layer: the shared factor (n x n), the float32 working
        weight and its mask, the result in the weight's dtype, and the O(n · block) blocks of the OBS loop (a block of
        `blocksize` of the factor's rows, the block's weights, errors, scores and mask selection, and one lazy update's
        row chunk), and LAPACK's own panel buffers while it factors. MKL's depend on its threads and the CPU: beyond the
        n x n float64 factor, potrf + potri + potrf held 12 MiB at n = 4096 and 27 MiB at n = 8192 on 2 threads of an
        Intel Xeon, but 38.5 and 40.4 MiB at n = 4096 (7 at 2048, 19 at 8192) on 1 thread, which is what torchrun gives
        each rank; on an AVX2 AMD EPYC, at most 1.2 MiB on 1 thread and 8.2 on 2 (12 fresh processes each, n = 4096). So
        2 x n x 768 elements of 8 bytes are budgeted (48 MiB at n = 4096, 19% over the largest seen). Counted by the
        memory plan; a test measures one solve."""
        e = rows * n
        block = cls.selection_columns(n, options)
        result = e * weight_dtype.itemsize if weight_dtype != torch.float32 else 0
        loop = block * n * 4 + rows * block * (4 * 4 + 8 + 2) + min(UPDATE_ROWS, rows) * n * 4
        lapack = 2 * n * 768 * 8
        return n * n * inverse_dtype.itemsize + e * 4 + e + result + loop + lapack

    @classmethod
    def selection_columns(cls, cols: int, options: Mapping[str, Any] | None = None) -> int:
        """The block: an unstructured mask is chosen over `blocksize` columns at a time (a block past the last
        column stops there)."""
        return min(int((options or {}).get("blocksize", BLOCKSIZE)), cols)

    def prune(
        self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern, rows: RowBlock | None = None
    ) -> Pruned:
        return self.solve(weight, stats, pattern, rows=rows)

    def solve(
        self,
        weight: torch.Tensor,
        stats: InputStats | None,
        pattern: Pattern,
        grid: Grid | None = None,
        held: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        rows: RowBlock | None = None,
    ) -> Pruned:
        """The OBS sweep. With a `grid`, each kept weight is also rounded onto it as its column is visited and
        the error of both is pushed onto the columns not yet visited (the paper's joint sparsification and
        quantization; with nothing pruned, GPTQ). A grid of one scale per row comes fitted; a grid of groups is fit
        here, a group at a time, from its weights as the sweep reaches it. With a `held` mask the pruned set is that
        mask instead of one chosen here (GPTQ on the output of another method). With an `order` (a permutation of
        the columns, `activation_order`) the sweep visits the columns in it, against a grid fitted beforehand in the
        original column order (GPTQ's activation order with static groups; a held mask, or nothing pruned). With
        `rows`, `weight` is that block of the whole weight's rows: an unstructured block of columns prunes its share
        of the whole weight's count, chosen by `rows.lowest` over every block's scores."""
        assert stats is not None and (order is None or (held is not None or pattern.sparsity == 0))
        assert rows is None or (grid is None and order is None), "a grid or an order solves whole weights"
        hessian = stats[Hessian].matrix.to(weight.device)
        key = ("sparsegpt inverse", self.dampening, self.inverse_dtype, weight.device, order is not None)
        ordered = (lambda: hessian[order][:, order]) if order is not None else (lambda: hessian)
        hinv, info = stats.derived(key, lambda: inverse_factor(ordered(), self.dampening, self.inverse_dtype))
        w = weight.float().clone()
        height, cols = w.shape
        rows = rows or RowBlock.whole(height)
        w[:, torch.diagonal(hessian) == 0] = 0.0
        if order is not None:
            w, held = w[:, order], held[:, order] if held is not None else None
        columns = order.tolist() if order is not None else range(cols)  # each swept column's original index
        mask = torch.zeros_like(w, dtype=torch.bool)
        choose = held is None
        block = max(pattern.m, (self.blocksize // pattern.m) * pattern.m) if pattern.is_nm else self.blocksize
        if grid is not None and grid.group < cols:  # a block is one group: its scales are fit from its updated weights
            block = grid.group
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            below = hinv[i1:i2].float().contiguous()  # this block's rows of the factor, in float32
            w1 = w[:, i1:i2].clone()
            h1 = below[:, i1:i2]
            d = torch.diagonal(h1)
            err1 = torch.zeros_like(w1)
            if not choose:
                mask1 = held[:, i1:i2].to(w.device)
            elif pattern.is_nm:
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
            else:
                count = round(pattern.sparsity * rows.total * i2) - round(pattern.sparsity * rows.total * i1)
                mask1 = rows.lowest(w1.pow(2) / d.pow(2).unsqueeze(0), count)
            if grid is not None and grid.group < cols and order is None:
                grid.fit(w1.masked_fill(mask1, 0.0), i1)
            for i in range(i2 - i1):
                if choose and pattern.is_nm and i % pattern.m == 0:
                    group = w1[:, i : i + pattern.m].pow(2) / d[i : i + pattern.m].pow(2).unsqueeze(0)
                    mask1[:, i : i + pattern.m] = masks.n_m(group, pattern)
                col = w1[:, i]
                q = col.masked_fill(mask1[:, i], 0.0)
                if grid is not None:
                    q = grid.round(q, columns[i1 + i])
                err = (col - q) / d[i]
                w1[:, i:].sub_(err.unsqueeze(1) * h1[i, i:].unsqueeze(0))
                w1[:, i] = q  # what the update left there, exactly
                err1[:, i] = err
            w[:, i1:i2] = w1.masked_fill(mask1, 0.0)
            mask[:, i1:i2] = mask1
            for r in range(0, height, UPDATE_ROWS):  # the lazy update, a chunk of rows at a time
                w[r : r + UPDATE_ROWS, i2:].sub_(err1[r : r + UPDATE_ROWS] @ below[:, i2:])
        if order is not None:
            back = torch.argsort(order)
            w, mask = w[:, back], mask[:, back]
        return Pruned(w.masked_fill_(mask, 0.0).to(weight.dtype), mask, info)


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ's activation order: the columns by decreasing Hessian diagonal (the inputs with the most energy first,
    while the most columns are left to absorb their error); ties keep their order."""
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
