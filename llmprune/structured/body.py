"""A structured run: score heads and neurons, choose uniform counts under the budget, pick and
rearrange the units per layer, tune the kept units' scales against the dense teacher, and write a
physically smaller model in its own architecture."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from llmprune.body import BodyReport, RemovalBody, RunContext
from llmprune.engine.activations import Activations
from llmprune.engine.loop import layer_unit
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.resume import RunState
from llmprune.engine.stream import open_stream
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder
from llmprune.models.skeleton import Skeleton
from llmprune.settings import Structured as StructuredSettings
from llmprune.structured.arch import Shape, Structure, smaller_config, structure_of
from llmprune.structured.base import Ranking, RankInputs, StructuredMethod
from llmprune.structured.export import LayerCut, cut_layer
from llmprune.structured.search import Costs, Counts, allowed_groups, allowed_neurons, rearrange, search_counts
from llmprune.structured.tuning import Normal, accumulate_heads, accumulate_neurons, solve


def choose_counts(
    settings: StructuredSettings,
    keep: float,
    by_flops: bool,
    method: StructuredMethod,
    ranking: Ranking,
    shape: Shape,
    structure: Structure,
    costs: Costs,
) -> Counts:
    """Explicit --keep-heads/--keep-neurons, else Kwon's search (methods that search) or equal shares of the
    `keep` fraction of the decoder's parameters (or FLOPs)."""
    per_group = bool(settings.heads_per_group)
    if settings.keep_heads is not None or settings.keep_neurons is not None:
        return _explicit_counts(settings, shape, structure)
    if method.searches_counts:
        return search_counts(
            ranking.search_heads,
            torch.stack(ranking.neurons) if ranking.search_neurons is None else ranking.search_neurons,
            shape,
            structure,
            costs,
            keep,
            by_flops,
            per_group,
            settings.neuron_multiple,
        )
    measure = costs.layer_macs if by_flops else costs.layer
    size = shape.group_size
    budget = keep * measure(shape.kv_heads, size, shape.intermediate, size)
    best = None
    options = (
        [(shape.kv_heads, size)]
        if not structure.heads
        else (
            [(shape.kv_heads, r) for r in range(1, size + 1)]
            if per_group
            else [(g, size) for g in allowed_groups(shape.kv_heads)]
        )
    )
    for groups, r in options:
        fits = [
            n
            for n in allowed_neurons(shape.intermediate, settings.neuron_multiple)
            if measure(groups, r, n, size) <= budget
        ]
        if fits:
            gap = abs(groups * r / shape.heads - fits[-1] / shape.intermediate) if structure.heads else 0.0
            if best is None or gap < best[0]:
                best = (gap, Counts(groups, r, fits[-1]))
    if best is None:
        raise LLMPruneError("no uniform head/neuron counts fit that budget; remove less")
    return best[1]


def _explicit_counts(settings: StructuredSettings, shape: Shape, structure: Structure) -> Counts:
    neurons = settings.keep_neurons or shape.intermediate
    if not 0 < neurons <= shape.intermediate:
        raise LLMPruneError(f"--keep-neurons must be in 1..{shape.intermediate}")
    heads = settings.keep_heads or shape.heads
    if not structure.heads and heads != shape.heads:
        raise LLMPruneError("this architecture derives head_dim from the head count: only FFN neurons can go")
    if settings.heads_per_group:
        if heads % shape.kv_heads:
            raise LLMPruneError(f"--keep-heads with --heads-per-group must be a multiple of {shape.kv_heads} KV heads")
        return Counts(shape.kv_heads, heads // shape.kv_heads, neurons)
    if heads % shape.group_size or not 0 < heads <= shape.heads:
        raise LLMPruneError(f"--keep-heads must be a multiple of the group size {shape.group_size} (whole KV groups)")
    return Counts(heads // shape.group_size, shape.group_size, neurons)


def choose_cuts(counts: Counts, shape: Shape, ranking: Ranking, per_group: bool = False) -> list[LayerCut]:
    """Per layer, which units stay: top scores, or Kwon's rearrangement where the ranking has gradients."""
    cuts = []
    size = shape.group_size
    head_scores, neuron_scores = ranking.heads, ranking.neurons
    for layer in range(len(neuron_scores)):
        pruned_neurons = shape.intermediate - counts.neurons
        if ranking.neuron_gradients is not None:
            gone = set(rearrange(ranking.neuron_gradients[layer], pruned_neurons))
        else:
            gone = set(neuron_scores[layer].argsort()[:pruned_neurons].tolist())
        neurons = [n for n in range(shape.intermediate) if n not in gone]
        if per_group:
            per = head_scores[layer].reshape(shape.kv_heads, size)
            heads = sorted(
                g * size + int(j)
                for g in range(shape.kv_heads)
                for j in per[g].argsort(descending=True)[: counts.heads_per_group].tolist()
            )
            cuts.append(LayerCut(heads, list(range(shape.kv_heads)), neurons))
            continue
        pruned_groups = shape.kv_heads - counts.kv_groups
        if ranking.head_gradients is not None:
            group_grads = ranking.head_gradients[layer].reshape(-1, shape.kv_heads, size).sum(-1)
            gone_groups = set(rearrange(group_grads, pruned_groups))
        else:
            group = head_scores[layer].reshape(shape.kv_heads, size).sum(1)
            gone_groups = set(group.argsort()[:pruned_groups].tolist())
        cuts.append(LayerCut.from_groups([g for g in range(shape.kv_heads) if g not in gone_groups], neurons, shape))
    return cuts


class StudentMasks:
    """Fixed multiplicative masks (0 for removed units, the tuned scale for kept ones) on o/down inputs."""

    def __init__(self, layer, structure: Structure, shape: Shape, cut: LayerCut, device) -> None:
        self.head = torch.zeros(shape.heads, device=device)
        self.head[cut.heads] = 1.0
        self.neuron = torch.zeros(shape.intermediate, device=device)
        self.neuron[cut.neurons] = 1.0
        self.structure, self.shape, self.layer = structure, shape, layer
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> StudentMasks:
        hd = self.shape.head_dim

        def on_o(module, args):
            x = args[0] * self.head.repeat_interleave(hd).to(args[0].dtype) if self.structure.heads else args[0]
            self.captured["context"] = x
            return (x, *args[1:])

        def on_down(module, args):
            x = args[0] * self.neuron.to(args[0].dtype)
            self.captured["down_input"] = x
            return (x, *args[1:])

        self._handles = [
            self.layer.get_submodule(self.structure.o).register_forward_pre_hook(on_o),
            self.layer.get_submodule(self.structure.down).register_forward_pre_hook(on_down),
        ]
        if self.structure.post_attention_norm:
            self._handles.append(
                self.layer.get_submodule(self.structure.post_attention_norm).register_forward_pre_hook(
                    lambda m, a: self.captured.__setitem__("mid", a[0])
                )
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _bias(layer, name: str) -> torch.Tensor | None:
    bias = getattr(layer.get_submodule(name), "bias", None)
    return None if bias is None else bias.detach().float()


def tune_and_write(
    skeleton: Skeleton,
    ids: torch.Tensor,
    cuts: list[LayerCut],
    structure: Structure,
    shape: Shape,
    device: torch.device,
    chunk: int,
    writer: OutputFolder,
    save_dtype: torch.dtype,
    tuning: bool,
    damping: float,
    progress: bool,
    kept: list[int] | None = None,
    replace: dict[str, torch.Tensor] | None = None,
    ranks: Ranks = SINGLE,
) -> list[dict]:
    """Stream the dense teacher and the masked student side by side; per layer solve the scales (if
    tuning), measure the output error, slice and write the layer. Returns per-layer reports. `kept`: the
    source layers to keep (default all), written renumbered 0..n-1; the teacher skips the others too. `replace`:
    weights (by state-dict name) that stand in for the shards' in teacher and student alike (a depth repair). With
    several ranks, each streams its shard of `ids`, the equations and errors are summed, and rank 0 writes."""
    cpu = torch.device("cpu")
    kept = list(range(skeleton.num_layers)) if kept is None else kept
    stream, teacher = open_stream(skeleton, ranks.part(ids, chunk), device, chunk, cpu)
    dtype = stream.dtype
    student = Activations([c.clone() for c in teacher.chunks])
    exact = tuning and structure.residual_adds_projections and structure.post_attention_norm is not None
    reports = []
    for new, index in enumerate(
        tqdm(kept, desc="tune + write" if tuning else "write", unit="layer", disable=not progress)
    ):
        layer = skeleton.load_layer(index, device, dtype, replace)
        cut = cuts[index]
        middles = []
        with torch.no_grad():
            for position in range(len(teacher)):
                mid: dict = {}
                handle = (
                    layer.get_submodule(structure.post_attention_norm).register_forward_pre_hook(
                        lambda m, a, mid=mid: mid.__setitem__("mid", a[0].to(cpu))
                    )
                    if structure.post_attention_norm
                    else None
                )
                out = stream.run(index, layer, teacher.get(position))
                if handle:
                    handle.remove()
                middles.append(mid.get("mid"))
                teacher.put(position, out.to(cpu, dtype))
        report: dict = {
            "index": index,
            "heads": len(cut.heads),
            "kv_heads": len(cut.kv_heads),
            "neurons": len(cut.neurons),
        }
        masks = StudentMasks(layer, structure, shape, cut, device)
        if exact and structure.heads:
            units = [[h] for h in cut.heads]  # a scale per kept query head (folded into its o_proj columns)
            normal = Normal.zeros(len(units))
            o_bias = _bias(layer, structure.o)
            with torch.no_grad(), masks:
                for position in range(len(student)):
                    x = student.get(position)
                    stream.run(index, layer, x)
                    target = middles[position].to(device).float() - x.to(device).float()
                    if o_bias is not None:
                        target = target - o_bias
                    accumulate_heads(
                        normal,
                        masks.captured["context"].reshape(-1, shape.heads * shape.head_dim),
                        layer.get_submodule(structure.o).weight.detach(),
                        units,
                        target.reshape(-1, shape.hidden),
                        shape.head_dim,
                    )
            normal.sum_over(ranks)
            result = solve(normal, damping)
            for unit, scale in zip(units, result.scales.tolist()):
                masks.head[unit] = scale
            report["attention"] = {
                "error_before": result.error_before,
                "error_after": result.error_after,
                "note": result.note,
            }
        if exact:
            normal = Normal.zeros(len(cut.neurons))
            kept_neurons = torch.tensor(cut.neurons, dtype=torch.long)
            down_bias = _bias(layer, structure.down)
            with torch.no_grad(), masks:
                for position in range(len(student)):
                    stream.run(index, layer, student.get(position))
                    mid = masks.captured["mid"].float()
                    target = teacher.get(position).to(device).float() - mid
                    if down_bias is not None:
                        target = target - down_bias
                    a = masks.captured["down_input"].reshape(-1, shape.intermediate)
                    accumulate_neurons(
                        normal,
                        a,
                        layer.get_submodule(structure.down).weight.detach(),
                        kept_neurons.to(a.device),
                        target.reshape(-1, shape.hidden),
                    )
            normal.sum_over(ranks)
            result = solve(normal, damping)
            masks.neuron[kept_neurons] = result.scales.to(masks.neuron.dtype)
            report["ffn"] = {
                "error_before": result.error_before,
                "error_after": result.error_after,
                "note": result.note,
            }
        err, base = 0.0, 0.0
        with torch.no_grad(), masks:
            for position in range(len(student)):
                out = stream.run(index, layer, student.get(position)).to(cpu, dtype)
                target = teacher.get(position)
                err += float((out.float() - target.float()).pow(2).sum())
                base += float(target.float().pow(2).sum())
                student.put(position, out)
        err, base = ranks.sum_numbers(err, base)
        report["output_error"] = err / max(base, 1e-30)
        if structure.heads:
            cut.head_scales = masks.head[cut.heads].cpu()
        cut.neuron_scales = masks.neuron[cut.neurons].cpu()
        if ranks.main:
            _write_layer(skeleton, index, new, layer, structure, shape, cut, writer, save_dtype)
        skeleton.unload_layer(index)
        reports.append(report)
    stream.close()
    return reports


def _write_layer(skeleton, index, new, layer, structure, shape, cut, writer, save_dtype) -> int:
    prefix, target = f"{skeleton.layers_prefix}.{index}.", f"{skeleton.layers_prefix}.{new}."
    tensors = {k: v.detach().float().cpu() for k, v in layer.state_dict().items() if prefix + k in skeleton.key_map}
    small = cut_layer(tensors, structure, shape, cut)
    writer.write_unit(layer_unit(new), {target + k: v.to(save_dtype) for k, v in small.items()})
    return sum(v.numel() for v in small.values())


class StructuredBody(RemovalBody):
    """Remove whole heads (KV groups) and FFN neurons: rank, choose uniform counts under the budget, cut,
    tune the kept units' scales against the dense teacher, and write a physically smaller model."""

    kind = "structured"
    sections = ("removal", "structured")
    distributed = True

    def check_model(self, ctx: RunContext) -> None:
        if ctx.ranks.active and not self.method.distributed:
            raise LLMPruneError(
                f"--method {self.settings.method} does not run across torchrun ranks yet; run it as one process"
            )
        self.structure = structure_of(ctx.skeleton.config)
        self.shape = Shape.of(ctx.skeleton.config, self.structure)
        settings = self.settings.structured
        if settings.keep_heads is not None or settings.keep_neurons is not None:
            _explicit_counts(settings, self.shape, self.structure)  # refused before any weight is read

    def describe(self, ctx: RunContext) -> str:
        settings = self.settings.structured
        if settings.keep_heads is not None or settings.keep_neurons is not None:
            what = f"keep {settings.keep_heads or 'all'} heads and {settings.keep_neurons or 'all'} neurons per layer"
        else:
            measure = "FLOPs" if self.by_flops else "parameters"
            what = f"remove {1 - self.keep:.0%} of the decoder {measure}"
        return f"{self.settings.method}: {what} of {ctx.where()}"

    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        assert ctx.calib is not None
        settings = self.settings.structured
        structure, shape, skeleton = self.structure, self.shape, ctx.skeleton
        per_group = bool(settings.heads_per_group)
        started = time.perf_counter()
        inputs = RankInputs(
            skeleton, ctx.calib.ids, structure, shape, ctx.device, self.chunk, writer.work, ctx.progress, per_group,
            ctx.ranks,
        )  # fmt: skip
        ranking = self.method.rank(inputs)
        self.timings = {"score_seconds": round(time.perf_counter() - started, 2)}
        self.costs = Costs.of(skeleton.layers[0], structure, shape, ctx.calib.seqlen)
        self.counts = choose_counts(
            settings, self.keep, self.by_flops, self.method, ranking, shape, structure, self.costs
        )
        cuts = choose_cuts(self.counts, shape, ranking, per_group)
        self.method.compensate(skeleton, structure, shape, cuts, ranking)
        tuned = time.perf_counter()
        self.layer_reports = tune_and_write(
            skeleton,
            ctx.calib.ids,
            cuts,
            structure,
            shape,
            ctx.device,
            self.chunk,
            writer,
            ctx.save_dtype,
            settings.mask_tuning,
            settings.tuning_damping,
            ctx.progress,
            ranks=ctx.ranks,
        )
        self.timings["tune_write_seconds"] = round(time.perf_counter() - tuned, 2)
        self.timings["prune_seconds"] = round(time.perf_counter() - started, 2)

    def config(self, config: dict) -> dict:
        counts = self.counts
        return smaller_config(config, self.structure, self.shape, counts.heads, counts.kv_groups, counts.neurons)

    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        settings, shape, counts, skeleton = self.settings.structured, self.shape, self.counts, ctx.skeleton
        size = shape.group_size
        before = skeleton.num_layers * self.costs.layer(shape.kv_heads, size, shape.intermediate, size)
        after = skeleton.num_layers * self.costs.layer(counts.kv_groups, counts.heads_per_group, counts.neurons, size)
        rest = sum(
            int(torch.tensor(skeleton.checkpoint.metadata(skeleton.key_map[k])[1]).prod()) for k in skeleton.rest_keys()
        )
        layer_reports = self.layer_reports
        tunings = [r for r in layer_reports if r.get("ffn") or r.get("attention")]
        fallbacks = [
            f"layer {r['index']} {part}: {r[part]['note']}"
            for r in layer_reports
            for part in ("attention", "ffn")
            if r.get(part) and r[part].get("note")
        ]
        structured = {
            "budget": self.budget(),
            "dense": {"heads": shape.heads, "kv_heads": shape.kv_heads, "intermediate": shape.intermediate},
            "kept": {
                "heads": counts.heads,
                "kv_heads": counts.kv_groups,
                "intermediate": counts.neurons,
                "head_dim": shape.head_dim,
            },
            "grouping": "heads-per-group" if settings.heads_per_group else "kv-groups",
            "parameters": {
                "decoder_before": before,
                "decoder_after": after,
                "total_before": before + rest,
                "total_after": after + rest,
                "removed_fraction_of_decoder": 1 - after / before,
            },
            "mask_tuning": bool(settings.mask_tuning) and bool(tunings),
            "tuning_fallbacks": fallbacks,
        }
        return BodyReport(
            pattern="structured",
            sparsity=1 - after / before,
            achieved_sparsity=1 - after / before,
            options=self.method.report_options(),
            sections={"structured": structured, "order": "structured"},
            layers=layer_reports,
            timings=self.timings,
        )
