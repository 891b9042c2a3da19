"""Prune the Linear modules of one decoder layer with a method, over the calibration activations.

Two orders:
- "sequential" (default): each group of Linears that share an input is pruned as soon as it has
  seen every calibration window, and the forward goes on with the pruned weights, so later modules
  see the pruned upstream ("true sequential"). When all windows fit one forward this is one pass.
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

from llmprune.engine.capture import StopForward
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
    stream: LayerStream, index: int, layer: nn.Module, hidden: torch.Tensor, targets: dict[str, nn.Linear]
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
            stream.run(index, layer, hidden[:1])
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
    ) -> None:
        if order not in ORDERS:
            raise LLMPruneError(f"--order must be one of {', '.join(ORDERS)} (got {order!r})")
        self.method = method
        self.pattern = pattern
        self.rule = rule
        self.order = order
        self.error_tokens = error_tokens
        self.save_dtype = save_dtype

    def prune(self, stream: LayerStream, index: int, layer: nn.Module, hidden: torch.Tensor) -> list[dict]:
        """Prune layer `index` in place; `hidden` becomes the pruned layer's outputs. Returns module reports."""
        prefix = f"{stream.sk.layers_prefix}.{index}"
        targets = find_targets(layer, prefix, self.rule)
        reports: list[dict] = []
        if not targets:
            stream.forward(index, layer, hidden)
            return reports
        groups = [_Group(names) for names in group_by_input(stream, index, layer, hidden, targets)]
        one_pass = hidden.shape[0] <= stream.batch_size
        if self.order == "sequential" and one_pass:
            self._sequential_one_pass(stream, index, layer, hidden, targets, groups, prefix, reports)
        elif self.order == "sequential":
            for group in groups:
                self._collect(stream, index, layer, hidden, targets, [group], stop_after=True)
                self._apply(targets, group, prefix, reports)
            stream.forward(index, layer, hidden)
        else:
            self._collect(stream, index, layer, hidden, targets, groups, stop_after=False)
            for group in groups:
                self._apply(targets, group, prefix, reports)
            stream.forward(index, layer, hidden)
        return reports

    def _new_stats(self, module: nn.Linear) -> InputStats | None:
        if self.method.statistics == "none":
            return None
        return InputStats(module.in_features, self.method.statistics, module.weight.device)

    def _observe(self, group: _Group, module: nn.Linear, x: torch.Tensor) -> None:
        if group.stats is None and self.method.statistics != "none":
            group.stats = self._new_stats(module)
        if group.stats is not None:
            group.stats.add(x)
        if group.sample is None:
            group.sample = x.reshape(-1, x.shape[-1])[: self.error_tokens].detach().clone()

    def _sequential_one_pass(self, stream, index, layer, hidden, targets, groups, prefix, reports) -> None:
        by_first = {group.names[0]: group for group in groups}

        def hook_for(group: _Group):
            def hook(module: nn.Module, args: tuple) -> None:
                if not group.done:
                    self._observe(group, module, args[0])
                    self._apply(targets, group, prefix, reports)

            return hook

        handles = [targets[name].register_forward_pre_hook(hook_for(group)) for name, group in by_first.items()]
        try:
            stream.forward(index, layer, hidden)
        finally:
            for handle in handles:
                handle.remove()

    def _collect(self, stream, index, layer, hidden, targets, groups, stop_after: bool) -> None:
        """Accumulate statistics for `groups` over all windows (stopping the forward early if asked)."""

        def hook_for(group: _Group):
            def hook(module: nn.Module, args: tuple) -> None:
                self._observe(group, module, args[0])
                if stop_after:
                    raise StopForward

            return hook

        handles = [targets[g.names[0]].register_forward_pre_hook(hook_for(g)) for g in groups]
        try:
            with torch.no_grad():
                for start in range(0, hidden.shape[0], stream.batch_size):
                    try:
                        stream.run(index, layer, hidden[start : start + stream.batch_size])
                    except StopForward:
                        pass
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
