"""Prune the Linear modules of one decoder layer with a method, over the calibration activations.

Two orders:
- "sequential" (default): each group of Linears that share an input is pruned as soon as it has
  seen every calibration window, and the forward goes on with the pruned weights, so later modules
  see the pruned upstream ("true sequential"). The chunks run in lockstep (engine/lockstep.py), so
  this is one forward per layer whatever the chunk size.
- "parallel": every Linear sees the dense layer's inputs (as in the SparseGPT and Wanda papers):
  one pass collects statistics, one pass propagates the pruned layer's outputs.
Either way the layer's outputs on the calibration windows (the next layer's inputs) come from the
pruned layer, so errors propagate.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.activations import Activations
from llmprune.engine.lockstep import Lockstep
from llmprune.engine.parking import Parking
from llmprune.engine.stream import LayerStream
from llmprune.errors import LLMPruneError
from llmprune.methods.base import InputStats, Pattern, PruningMethod

ORDERS = ("sequential", "parallel")


@dataclass
class TargetRule:
    """Which Linears to prune: fnmatch patterns on names relative to the layer (or full names)."""

    include: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def wants(self, relative: str, full: str) -> bool:
        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(full, p) for p in patterns)

        return hit(self.include) and not hit(self.ignore)


def find_targets(layer: nn.Module, prefix: str, rule: TargetRule) -> dict[str, nn.Linear]:
    """Linear modules of a decoder layer selected by `rule`, by relative name."""
    return {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and rule.wants(name, f"{prefix}.{name}")
    }


def group_by_input(
    stream: LayerStream, index: int, layer: nn.Module, window: torch.Tensor, targets: dict[str, nn.Linear]
) -> list[list[str]]:
    """Groups of targets that receive the very same input tensor (q/k/v; gate/up), in call order.

    Found by running the layer on one window and comparing input tensor identity; the inputs are
    kept alive during the probe so identities cannot be recycled.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in targets.items()]
    try:
        with torch.no_grad():
            stream.run(index, layer, window)
    finally:
        for handle in handles:
            handle.remove()
    groups = [names for _, names in seen]
    called = {name for names in groups for name in names}
    unused = sorted(set(targets) - called)
    if unused:
        raise LLMPruneError(f"layer {index}: {unused[0]} is never called in the forward; exclude it with --ignore")
    return groups


@dataclass
class _Group:
    names: list[str]
    stats: InputStats | None = None
    sample: torch.Tensor | None = None
    done: bool = False


class LayerPruner:
    """Applies one method and pattern to the targets of each decoder layer."""

    def __init__(
        self,
        method: PruningMethod,
        pattern: Pattern,
        rule: TargetRule,
        order: str = "sequential",
        error_tokens: int = 4096,
        save_dtype: torch.dtype | None = None,
        parking: Parking | None = None,
    ) -> None:
        if order not in ORDERS:
            raise LLMPruneError(f"--order must be one of {', '.join(ORDERS)} (got {order!r})")
        self.method = method
        self.pattern = pattern
        self.rule = rule
        self.order = order
        self.error_tokens = error_tokens
        self.save_dtype = save_dtype
        self.parking = parking or Parking("memory")

    def prune(self, stream: LayerStream, index: int, layer: nn.Module, acts: Activations) -> list[dict]:
        """Prune layer `index` in place; `acts` become the pruned layer's outputs. Returns module reports."""
        prefix = f"{stream.sk.layers_prefix}.{index}"
        targets = find_targets(layer, prefix, self.rule)
        reports: list[dict] = []
        if not targets:
            stream.forward(index, layer, acts)
            return reports
        groups = [_Group(names) for names in group_by_input(stream, index, layer, acts.first(), targets)]
        if self.order == "sequential":
            self._lockstep(stream, index, layer, acts, targets, groups, prefix, reports)
        else:
            self._collect_all(stream, index, layer, acts, targets, groups)
            for group in groups:
                self._apply(targets, group, prefix, reports)
            stream.forward(index, layer, acts)
        return reports

    def _observe(self, group: _Group, module: nn.Linear, x: torch.Tensor) -> None:
        if group.stats is None and self.method.statistics != "none":
            group.stats = InputStats(module.in_features, self.method.statistics, module.weight.device)
        if group.stats is not None:
            group.stats.add(x)
        if group.sample is None:
            group.sample = x.reshape(-1, x.shape[-1])[: self.error_tokens].detach().clone()

    def _lockstep(self, stream, index, layer, acts, targets, groups, prefix, reports) -> None:
        """One forward: every chunk waits at each group until all chunks have fed its statistics.

        While waiting, a chunk parks the group's input and the layer input it still holds.
        """
        step = Lockstep(len(acts), self.parking)
        inputs: dict[int, torch.Tensor] = {}

        def hook_for(group: _Group):
            def hook(module: nn.Module, args: tuple) -> None:
                if not group.done:
                    self._observe(group, module, args[0])
                    park = [args[0], inputs[step.chunk]]
                    step.barrier(lambda: self._apply(targets, group, prefix, reports), park=park)

            return hook

        def work(position: int) -> torch.Tensor:
            inputs[position] = acts.take(position)
            try:
                with torch.no_grad():
                    return stream.run(index, layer, inputs[position]).to(stream.act_device, stream.dtype)
            finally:
                del inputs[position]

        handles = [targets[g.names[0]].register_forward_pre_hook(hook_for(g)) for g in groups]
        try:
            acts.chunks[:] = step.run(work)
        finally:
            for handle in handles:
                handle.remove()

    def _collect_all(self, stream, index, layer, acts, targets, groups) -> None:
        """The papers' order: statistics of every group from one pass of the dense layer."""

        def hook_for(group: _Group):
            return lambda module, args: self._observe(group, module, args[0])

        handles = [targets[g.names[0]].register_forward_pre_hook(hook_for(g)) for g in groups]
        try:
            with torch.no_grad():
                for chunk in acts:
                    stream.run(index, layer, chunk)
        finally:
            for handle in handles:
                handle.remove()

    def _apply(self, targets: dict[str, nn.Linear], group: _Group, prefix: str, reports: list[dict]) -> None:
        """Prune every member of a group with the group's shared statistics."""
        for name in group.names:
            module = targets[name]
            self.pattern.check_width(module.in_features, f"{prefix}.{name}")
            started = time.perf_counter()
            dense = module.weight.data
            result = self.method.prune(dense, group.stats, self.pattern)
            weight = result.weight
            if self.save_dtype is not None and weight.dtype != self.save_dtype:
                weight = weight.to(self.save_dtype).to(dense.dtype)  # propagate what will be saved
            error = _relative_error(dense, weight, group.sample)
            module.weight.data = weight
            reports.append(
                {
                    "name": f"{prefix}.{name}",
                    "shape": list(dense.shape),
                    "sparsity": float(result.mask.float().mean()),
                    "zeros": int((weight == 0).sum()),
                    "error": error,
                    "seconds": round(time.perf_counter() - started, 4),
                    **result.info,
                }
            )
        group.done = True
        group.stats = None
        group.sample = None


def _relative_error(dense: torch.Tensor, pruned: torch.Tensor, sample: torch.Tensor | None) -> float | None:
    """‖(W - W')x‖² / ‖Wx‖² on a sample of the module's calibration inputs."""
    if sample is None:
        return None
    x = sample.float()
    base = (x @ dense.float().T).pow(2).sum()
    diff = (x @ (dense.float() - pruned.float()).T).pow(2).sum()
    return float(diff / base) if float(base) > 0 else 0.0
