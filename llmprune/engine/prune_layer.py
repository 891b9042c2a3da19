"""Prune the Linear modules of one decoder layer with a method, over the calibration activations.

Two orders:
- "parallel" (default): every Linear sees the dense layer's inputs (as in the SparseGPT and Wanda
  papers): one pass collects statistics, one pass propagates the pruned layer's outputs. It holds
  no state between passes, and measured the better perplexity at 50% unstructured (docs/benchmark-log.md).
- "sequential": each group of Linears that share an input is pruned as soon as it has seen every
  calibration window, and the forward goes on with the pruned weights, so later modules see the
  pruned upstream ("true sequential"). The chunks run in lockstep (engine/lockstep.py), so this is
  one forward per layer whatever the chunk size, at the price of every chunk's state at a barrier.
Either way the layer's outputs on the calibration windows (the next layer's inputs) come from the
pruned layer, so errors propagate.
"""

from __future__ import annotations

import fnmatch
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.activations import Activations
from llmprune.engine.devices import trim_heap
from llmprune.engine.lockstep import Lockstep
from llmprune.engine.parking import ChunkTracker, Parking
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.stream import LayerStream
from llmprune.errors import LLMPruneError
from llmprune.methods.base import PruningMethod
from llmprune.methods.magnitude import Magnitude
from llmprune.methods.statistics import InputStats, ratio
from llmprune.models.moe import ExpertProjection, MoeBlock, expert_projections, moe_blocks, projection_names
from llmprune.pattern import Pattern
from llmprune.settings import ORDERS


@dataclass
class TargetRule:
    """Which Linears to prune: fnmatch patterns on names relative to the layer (or full names)."""

    include: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()

    def wants(self, relative: str, full: str) -> bool:
        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(full, p) for p in patterns)

        return hit(self.include) and not hit(self.ignore)


Target = nn.Linear | ExpertProjection


def find_targets(layer: nn.Module, prefix: str, rule: TargetRule) -> dict[str, Target]:
    """The weights of a decoder layer selected by `rule`, by relative name: its Linear modules, and each
    expert's gate, up and down projections inside the fused parameters of an MoE block."""
    targets: dict[str, Target] = {
        name: module
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear) and rule.wants(name, f"{prefix}.{name}")
    }
    for block in moe_blocks(layer).values():
        projections = expert_projections(block).items()
        targets.update({name: p for name, p in projections if rule.wants(name, f"{prefix}.{name}")})
    return targets


def set_weight(target: Target, weight: torch.Tensor) -> None:
    """Write a pruned weight into its Linear or into its expert's slice of the fused parameter."""
    if isinstance(target, ExpertProjection):
        target.assign(weight)
    else:
        target.weight.data = weight


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


def full_precision(device: torch.device) -> torch.autocast:
    """Autocast off: statistics, solves and errors run in their own dtypes even inside a forward that
    runs under --forward-dtype's autocast (its matmuls would otherwise drop to bf16/fp16)."""
    return torch.autocast(device.type, enabled=False)


@dataclass
class _Group:
    names: list[str]
    stats: InputStats | None = None
    sample: torch.Tensor | None = None
    done: bool = False


@dataclass
class _ExpertFeed:
    """An MoE block's expert groups: per expert, the group of its gate and up projections (fed the tokens
    routed to it) and the group of its down projection (fed their act(gate) * up)."""

    block: MoeBlock
    experts: dict[int, tuple[_Group | None, _Group | None]]

    @classmethod
    def of(cls, block: MoeBlock, targets: dict) -> _ExpertFeed:
        experts = {}
        for expert in range(block.num_experts):
            gate, up, down = projection_names(block, expert)
            first = [name for name in (gate, up) if name in targets]
            experts[expert] = (_Group(first) if first else None, _Group([down]) if down in targets else None)
        return cls(block, experts)

    def groups(self) -> list[_Group]:
        return [group for pair in self.experts.values() for group in pair if group is not None]


@dataclass
class _Solved:
    """One solve's outcome as every rank records it: the weight to set (already rounded to the saved dtype), and
    what the report says of it."""

    weight: torch.Tensor
    pruned: int  # the mask's count
    info: dict
    saved: dict[str, torch.Tensor] | None
    error: float | None
    seconds: float


class _EveryGroupFed(Exception):
    """Ends a statistics pass early: the chunk has fed every module group of the layer."""


class LayerPruner:
    """Applies one method and pattern to the targets of each decoder layer."""

    def __init__(
        self,
        method: PruningMethod,
        pattern: Pattern,
        rule: TargetRule,
        order: str = "parallel",
        error_tokens: int = 1024,
        save_dtype: torch.dtype | None = None,
        parking: Parking | None = None,
        devices: list[torch.device] | None = None,
        uncovered: str = "dense",
        ranks: Ranks = SINGLE,
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
        self.devices = devices or []  # solver devices; the first is also the forward's
        self.uncovered = uncovered  # what happens to an expert no calibration token reached: "dense", "magnitude"
        self.saved: dict[str, dict[str, torch.Tensor]] = {}  # module -> what the checkpoint stores for its weight
        self.ranks = ranks  # a data-parallel run: statistics summed across ranks, solves split among them

    def stored_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pruned layer's tensors as the checkpoint stores them: each quantized weight replaced by the tensors
        that encode it (its codes and scales). Forgets them: the next layer starts afresh."""
        for module, parts in self.saved.items():
            del tensors[f"{module}.weight"]
            tensors.update({f"{module}.{name}": tensor for name, tensor in parts.items()})
        self.saved = {}
        return tensors

    def _groups(
        self, stream: LayerStream, index: int, layer: nn.Module, acts: Activations, targets: dict
    ) -> tuple[list[_Group], list[_ExpertFeed]]:
        """The layer's groups of Linears sharing an input, and its MoE blocks' expert feeds."""
        linears = {name: module for name, module in targets.items() if isinstance(module, nn.Linear)}
        groups = [_Group(names) for names in group_by_input(stream, index, layer, acts.first(), linears)]
        feeds = [_ExpertFeed.of(block, targets) for block in moe_blocks(layer).values()]
        return groups, [feed for feed in feeds if feed.groups()]

    def prune(
        self, stream: LayerStream, index: int, layer: nn.Module, acts: Activations, pattern: Pattern | None = None
    ) -> list[dict]:
        """Prune layer `index` in place to `pattern` (default: the pruner's); `acts` become the pruned layer's
        outputs. Returns module reports."""
        prefix = f"{stream.sk.layers_prefix}.{index}"
        targets = find_targets(layer, prefix, self.rule)
        reports: list[dict] = []
        if not targets:
            stream.forward(index, layer, acts)
            return reports
        pattern = self.pattern if pattern is None else pattern
        groups, feeds = self._groups(stream, index, layer, acts, targets)
        if self.order == "sequential":
            if feeds:
                raise LLMPruneError(f"layer {index}: expert weights are pruned in the parallel order only")
            self._lockstep(stream, index, layer, acts, targets, groups, prefix, reports, pattern)
        else:
            self._collect_all(stream, index, layer, acts, targets, groups, feeds)
            every = groups + [group for feed in feeds for group in feed.groups()]
            self._apply(targets, every, prefix, reports, pattern)
            stream.forward(index, layer, acts)
        return reports

    def statistics(
        self, stream: LayerStream, index: int, layer: nn.Module, acts: Activations
    ) -> dict[str, tuple[Target, InputStats | None]]:
        """The method's statistics of every target of layer `index`, by relative name with its module (None for an
        expert no calibration token reached), from one forward of the layer, unchanged, over `acts`, which become
        its outputs (a statistics-only pass over the model: one forward per layer, not a forward and a pass)."""
        targets = find_targets(layer, f"{stream.sk.layers_prefix}.{index}", self.rule)
        if not targets:
            stream.forward(index, layer, acts)
            return {}
        groups, feeds = self._groups(stream, index, layer, acts, targets)
        self._collect_all(stream, index, layer, acts, targets, groups, feeds, propagate=True)
        every = groups + [group for feed in feeds for group in feed.groups()]
        self._settle(targets, every)
        return {name: (targets[name], group.stats) for group in every for name in group.names}

    def _feed_experts(self, feed: _ExpertFeed, targets: dict, hidden: torch.Tensor, indices: torch.Tensor) -> None:
        """One chunk's tokens into each expert's statistics: the tokens routed to it (the router's top-k
        indices), and its down projection's inputs for them."""
        for expert, (first, down) in feed.experts.items():
            token = (indices == expert).any(dim=-1).nonzero().squeeze(1)
            if token.numel() == 0:
                continue
            x = hidden[token]
            if first is not None:
                self._observe(first, targets[first.names[0]], x)
            if down is not None:
                self._observe(down, targets[down.names[0]], feed.block.expert_hidden(x, expert))

    def _new_stats(self, module: Target) -> InputStats:
        """Empty statistics of the method's kinds for a module's inputs, summed in --reduce-dtype."""
        return InputStats(module.in_features, self.method.statistics, module.weight.device, self.ranks.reduce_dtype)

    def _observe(self, group: _Group, module: Target, x: torch.Tensor) -> None:
        if group.stats is None:
            group.stats = self._new_stats(module)
        group.stats.add(x)
        if group.sample is None and not group.stats.exact_error:  # else a statistic gives the error exactly
            group.sample = x.reshape(-1, x.shape[-1])[: self.error_tokens].detach().clone()

    def _lockstep(self, stream, index, layer, acts, targets, groups, prefix, reports, pattern) -> None:
        """One forward: every chunk waits at each group until all chunks have fed its statistics.

        While waiting, a chunk parks everything it holds: the layer input and every storage its
        forward has allocated so far (tracked per chunk thread by a ChunkTracker, only when parking).
        """
        step = Lockstep(len(acts), self.parking)
        inputs: dict[int, torch.Tensor] = {}
        trackers: dict[int, ChunkTracker | None] = {}
        tracking = self.parking.mode != "memory" and len(acts) > 1  # one chunk never waits, never parks

        def hook_for(group: _Group):
            def hook(module: nn.Module, args: tuple) -> None:
                if group.done:
                    return
                chunk = step.chunk
                tracker = trackers[chunk]
                with tracker.paused() if tracker else nullcontext(), full_precision(args[0].device):
                    self._observe(group, module, args[0])
                    park = [inputs[chunk], *tracker.alive()] if tracker else []
                    step.barrier(lambda: self._apply(targets, [group], prefix, reports, pattern), park=park)

            return hook

        def work(position: int) -> None:
            inputs[position] = acts.take(position)
            trackers[position] = ChunkTracker() if tracking else None
            try:
                with torch.no_grad(), trackers[position] or nullcontext():
                    output = stream.run(index, layer, inputs[position]).to(stream.act_device, stream.act_dtype)
            finally:
                del inputs[position], trackers[position]
            acts.put(position, output)

        handles = [targets[g.names[0]].register_forward_pre_hook(hook_for(g)) for g in groups]
        try:
            step.run(work)
        finally:
            for handle in handles:
                handle.remove()

    def _collect_all(self, stream, index, layer, acts, targets, groups, feeds, propagate: bool = False) -> None:
        """The papers' order: statistics of every group from one pass of the dense layer. A chunk's
        pass stops as soon as it has fed every group (the last Linear and what follows it, such as
        down_proj and the residual, would only compute outputs that are thrown away), unless the pass
        `propagate`s: then it runs to the end and `acts` become the layer's outputs. An MoE block's
        experts are fed by one hook on its experts module, which sees the router's choices."""
        fed: set[int] = set()
        feeders = [
            (targets[g.names[0]], lambda args, g=g: self._observe(g, targets[g.names[0]], args[0])) for g in groups
        ]
        feeders += [
            (f.block.experts, lambda args, f=f: self._feed_experts(f, targets, args[0], args[1])) for f in feeds
        ]

        def hook_for(position: int, observe):
            def hook(module: nn.Module, args: tuple) -> None:
                with full_precision(args[0].device):
                    observe(args)
                fed.add(position)
                if len(fed) == len(feeders) and not propagate:
                    raise _EveryGroupFed

            return hook

        handles = [
            module.register_forward_pre_hook(hook_for(i, observe)) for i, (module, observe) in enumerate(feeders)
        ]
        try:
            if propagate:
                stream.forward(index, layer, acts)
                return
            with torch.no_grad():
                for chunk in acts:
                    fed.clear()
                    try:
                        stream.run(index, layer, chunk)
                    except _EveryGroupFed:
                        pass
        finally:
            for handle in handles:
                handle.remove()

    def _settle(self, targets: dict[str, Target], groups: list[_Group]) -> None:
        """Every rank's statistics of `groups` summed, in rank order (a group no token of this rank reached joins
        with zeros when another rank's did), then settled for the methods to read."""
        ranks = self.ranks
        if ranks.active:
            present = [any(flags) for flags in zip(*ranks.gather_objects([g.stats is not None for g in groups]))]
            for group, wanted in zip(groups, present):
                if wanted and group.stats is None:
                    group.stats = self._new_stats(targets[group.names[0]])
            summed = [g for g in groups if g.stats is not None]
            for group in summed:
                for value in group.stats.values.values():
                    for buffer in value.buffers():
                        ranks.sum_(buffer)
            tokens = ranks.sum_numbers(*(g.stats.tokens for g in summed))
            for group, count in zip(summed, tokens):
                group.stats.tokens = int(count)
        for group in groups:
            if group.stats is not None:
                group.stats.finish()

    def _apply(
        self, targets: dict[str, Target], groups: list[_Group], prefix: str, reports: list[dict], pattern: Pattern
    ) -> None:
        """Prune every member of each group with the group's shared statistics (summed across ranks first).

        With several solver devices (GPUs), a group's members are solved concurrently, one per device, each on its
        own copy of the shared statistics. With several ranks, a method that solves rows alone (SparseGPT) has each
        member's rows split across the ranks, which then gather the solved rows; for other methods the members of
        all `groups` are dealt out to the ranks, and each solved weight is broadcast from the rank that solved it."""
        for group in groups:
            for name in group.names:
                pattern.check_width(targets[name].in_features, f"{prefix}.{name}")
        self._settle(targets, groups)
        covered = [g for g in groups if g.stats is not None or not self.method.statistics]
        jobs = [(group, name) for group in covered for name in group.names]
        mine = {}
        split = self.ranks.active and self.method.solves_rows()
        if self.ranks.active and not split:
            rank = self.ranks.rank
            mine = {k: self._solve(targets, *job, pattern) for k, job in enumerate(jobs) if self.ranks.owner(k) == rank}
        devices = self.devices or [None]
        position = 0
        for group in groups:
            if group not in covered:  # an expert no calibration token was routed to
                self._uncovered(targets, group.names, prefix, reports, pattern)
            elif split:
                for name in group.names:
                    solved = self._solve(targets, group, name, pattern, split=True)
                    self._record(targets, group, name, solved, prefix, reports)
            elif self.ranks.active:
                for name in group.names:
                    solved = self._share(targets[name], mine.pop(position, None), position)
                    self._record(targets, group, name, solved, prefix, reports)
                    position += 1
            elif len(devices) > 1 and len(group.names) > 1:  # a group's members on the solver devices at once
                with ThreadPoolExecutor(max_workers=min(len(devices), len(group.names))) as pool:
                    placed = [(name, devices[p % len(devices)]) for p, name in enumerate(group.names)]
                    solved = list(
                        pool.map(lambda job, g=group: self._solve(targets, g, job[0], pattern, job[1]), placed)
                    )
                for name, result in zip(group.names, solved):
                    self._record(targets, group, name, result, prefix, reports)
                del solved
            else:  # one member at a time: a solve's buffers are freed before the next one starts
                for name in group.names:
                    self._record(
                        targets, group, name, self._solve(targets, group, name, pattern, devices[0]), prefix, reports
                    )
            group.done = True
            group.stats = None
            group.sample = None
            trim_heap()  # the solves' small buffers would otherwise stay in the heap through the next forward

    def _solve(
        self,
        targets: dict[str, Target],
        group: _Group,
        name: str,
        pattern: Pattern,
        device: torch.device | None = None,
        split: bool = False,
    ) -> _Solved:
        """Solve one member of a group (on `device` when given): the weight as it will be saved, and its error where
        a statistic gives it exactly. With `split`, this rank solves its block of the rows and the ranks gather the
        whole weight (a collective: every rank calls it for the same member)."""
        module = targets[name]
        started = time.perf_counter()
        dense, stats = module.weight.data, group.stats
        weight = dense
        if device is not None and device != weight.device:
            weight, stats = weight.to(device), stats.to(device) if stats is not None else None
        block = self.ranks.row_block(dense.shape[0]) if split else None
        if block is not None:
            result = self.method.prune(weight[block.start : block.stop], stats, pattern, rows=block)
        else:
            result = self.method.prune(weight, stats, pattern)
        final = result.weight.to(dense.device)
        saved = None
        if result.saved is not None:  # quantized: the checkpoint holds these exact values as codes and scales
            assert block is None, "a quantized weight is solved whole"
            saved = {k: v.cpu() for k, v in result.saved.items()}
        elif self.save_dtype is not None and final.dtype != self.save_dtype:
            final = final.to(self.save_dtype).to(dense.dtype)  # propagate what will be saved
        pruned, info = int(result.mask.sum()), result.info
        del result  # its weight (when rounded to the save dtype) and mask are not needed beside the gathered weight
        if block is None:
            error = group.stats.relative_error(dense, final) if group.stats is not None else None
        else:  # every rank's rows, in every rank's copy; the error's terms summed over the ranks' rows
            mine = slice(block.start, block.stop)
            terms = group.stats.error_terms(dense[mine], final) if group.stats is not None else None
            totals = self.ranks.sum_numbers(pruned, *(terms or (0.0, 0.0)))
            pruned, error = int(totals[0]), ratio(*totals[1:]) if terms is not None else None
            whole = torch.empty_like(dense)
            whole[mine] = final
            final = self.ranks.gather_rows_(whole)
        return _Solved(final, pruned, info, saved, error, time.perf_counter() - started)

    def _share(self, module: Target, solved: _Solved | None, position: int) -> _Solved:
        """The solve of job `position` on every rank: its owner broadcasts the weight and the report's values."""
        owner = self.ranks.owner(position)
        weight = solved.weight if solved is not None else torch.empty_like(module.weight.data)
        self.ranks.broadcast_(weight, owner)
        meta = None if solved is None else (solved.pruned, solved.info, solved.saved, solved.error, solved.seconds)
        pruned, info, saved, error, seconds = self.ranks.broadcast_object(meta, owner)
        return _Solved(weight, pruned, info, saved, error, seconds)

    def _record(
        self, targets: dict[str, Target], group: _Group, name: str, solved: _Solved, prefix: str, reports: list[dict]
    ) -> None:
        """Set a solved weight and report it; an error no statistic gives exactly is measured on a sample of the
        inputs (rank 0's, which are the first windows, as in one process)."""
        module = targets[name]
        dense = module.weight.data
        if solved.saved is not None:
            self.saved[f"{prefix}.{name}"] = solved.saved
        error = solved.error
        if error is None and group.sample is not None and self.ranks.main:
            error = _sampled_error(dense, solved.weight, group.sample)
        set_weight(module, solved.weight)
        expert = {"tokens": group.stats.tokens if group.stats else 0} if isinstance(module, ExpertProjection) else {}
        reports.append(
            {
                "name": f"{prefix}.{name}",
                "shape": list(dense.shape),
                "sparsity": solved.pruned / dense.numel(),
                "zeros": int(solved.weight.numel() - solved.weight.count_nonzero()),
                "error": error,
                "seconds": round(solved.seconds, 4),
                **expert,
                **solved.info,
            }
        )

    def _uncovered(
        self, targets: dict[str, Target], names: list[str], prefix: str, reports: list[dict], pattern: Pattern
    ) -> None:
        """An expert without calibration tokens has no statistics: left dense, or pruned by magnitude with
        --uncovered-experts magnitude; reported either way."""
        for name in names:
            module = targets[name]
            if self.uncovered == "magnitude":
                set_weight(module, Magnitude().prune(module.weight, None, pattern).weight)
            weight = module.weight
            zeros = int(weight.numel() - weight.count_nonzero())
            reports.append(
                {
                    "name": f"{prefix}.{name}",
                    "shape": list(weight.shape),
                    "sparsity": zeros / weight.numel() if self.uncovered == "magnitude" else 0.0,
                    "zeros": zeros,
                    "error": None,
                    "seconds": 0.0,
                    "tokens": 0,
                    "uncovered": self.uncovered,
                }
            )


def _sampled_error(dense: torch.Tensor, pruned: torch.Tensor, sample: torch.Tensor, rows: int = 256) -> float:
    """‖(W - W')X‖² / ‖WX‖² over a sample X of the module's calibration inputs (where no statistic gives it exactly:
    `_solve` takes the Hessian's tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)). Summed a chunk of `rows` output rows at a time, so it
    holds O(rows · n), never a copy of the weight."""
    x = sample.float()
    base = diff = 0.0
    for start in range(0, dense.shape[0], rows):
        w = dense[start : start + rows].float()
        delta = w - pruned[start : start + rows].float()
        base += float((x @ w.T).pow(2).sum())
        diff += float((x @ delta.T).pow(2).sum())
    return diff / base if base > 0 else 0.0
