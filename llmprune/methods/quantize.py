"""Compound compression: an unstructured / N:M method whose kept weights are also quantized, in the same solve.

SparseGPT quantizes jointly inside its OBS sweep (each column pruned, its kept weights rounded onto the grid, the
error of both pushed onto the columns not yet visited: the SparseGPT paper's joint mode); any other method is
followed by GPTQ (the same sweep with the method's mask held and nothing more pruned). Zeros stay exactly zero.
With sparsity 0 this is plain GPTQ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.grid import Grid
from llmprune.methods.sparsegpt import SparseGPT, activation_order
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.models.compressed import compress_weight
from llmprune.pattern import Pattern
from llmprune.scheme import QuantScheme

GPTQ_DAMPENING = 0.01  # of the GPTQ pass after a method that has no Hessian solve of its own (GPTQ's default)


def quantizing(method: type[PruningMethod], scheme: QuantScheme, scale_dtype: torch.dtype) -> type[PruningMethod]:
    """`method`, each solve of which also quantizes the kept weights onto `scheme`'s grid (scales stored in
    `scale_dtype`). The class adds the Hessian the GPTQ sweep needs to the statistics and the sweep's buffers to
    the workspace, so the engine and the memory plan treat it like any method."""
    joint = issubclass(method, SparseGPT)

    class Quantizing(method):  # type: ignore[valid-type, misc]
        statistics = tuple(dict.fromkeys((*method.statistics, Hessian)))

        def __init__(self, **values) -> None:
            super().__init__(**values)
            self.gptq = self if joint else SparseGPT(dampening=GPTQ_DAMPENING)

        @classmethod
        def workspace_bytes(
            cls,
            rows: int,
            cols: int,
            weight_dtype: torch.dtype,
            inverse_dtype: torch.dtype,
            options: Mapping[str, Any] | None = None,
        ) -> int:
            """The method's solve, then the sweep holding the method's result (joint: one sweep), then the exact
            float32 values and their codes (at most one byte each) beside the result."""
            # the sweep's block is a group of the scheme where it has groups, else SparseGPT's block
            block = {"blocksize": scheme.group_size} if scheme.group_size and scheme.group_size < cols else {}
            sweep_options = {**(options or {}), **block} if joint else block
            # the GPTQ sweep after another method factors in float64 (its "auto"), whatever that method's dtype
            sweep_dtype = inverse_dtype if joint else torch.float64
            sweep = SparseGPT.workspace_bytes(rows, cols, weight_dtype, sweep_dtype, sweep_options)
            if not joint:
                own = method.workspace_bytes(rows, cols, weight_dtype, inverse_dtype, options)
                sweep = max(own, sweep + rows * cols * (weight_dtype.itemsize + 1))
            return sweep + rows * cols * 5 + cols * cols * 4 * 2  # and a Hessian permuted for activation order

        @classmethod
        def solve_description(cls, pattern: Pattern) -> str:
            """How `prune` solves a weight under `pattern`, for the report (the same cases as `prune`)."""
            grouped = scheme.group_size is not None
            if joint and pattern.sparsity == 0:
                return "GPTQ" + (" in activation order, static groups" if grouped else "")
            if joint:
                return "joint OBS sweep" + ("" if grouped else ", per-row scales fit to a pruning-only sweep")
            return "GPTQ pass with the mask held" + (", in activation order, static groups" if grouped else "")

        def prune(self, weight: torch.Tensor, stats: InputStats | None, pattern: Pattern) -> Pruned:
            grid = Grid(scheme, *weight.shape, scale_dtype, weight.device)
            per_row = grid.group >= weight.shape[1]
            # groups and nothing left to choose: GPTQ in activation order, with static groups fit up front
            ordered = not per_row and (not joint or pattern.sparsity == 0)
            order = activation_order(stats[Hessian].matrix) if ordered else None
            if joint:
                if per_row and pattern.sparsity:  # the OBS updates grow the kept weights past the dense range
                    grid.fit(self.solve(weight, stats, pattern).weight.float(), 0)  # so fit to a pruned solution
                elif per_row or ordered:
                    grid.fit(weight.float(), 0)
                result = self.solve(weight, stats, pattern, grid, order=order)
            else:
                pruned = super().prune(weight, stats, pattern)
                if per_row or ordered:
                    grid.fit(pruned.weight.float(), 0)
                result = self.gptq.solve(pruned.weight, stats, pattern, grid, held=pruned.mask, order=order)
                result.info = {**pruned.info, **result.info}
            exact = grid.quantize(result.weight.float())  # the grid values, exact even from a bfloat16 weight
            saved = compress_weight(exact, grid.scale.to(scale_dtype), scheme)
            return Pruned(exact.to(weight.dtype), result.mask, result.info, saved)

    Quantizing.__name__ = Quantizing.__qualname__ = f"{method.__name__}Quantizing"
    return Quantizing
