"""A structured run: score heads and neurons, choose uniform counts under the budget, pick and
rearrange the units per layer, tune the kept units' scales against the dense teacher, and write a
physically smaller model in its own architecture."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, calibration_windows, is_token_file, windows_from_file
from llmprune.engine.activations import Activations
from llmprune.engine.devices import parse_dtype, peak_cuda, peak_rss, resolve_device
from llmprune.engine.stream import open_stream
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import perplexity
from llmprune.export.publish import check_options, finish_folder, push_after_run
from llmprune.export.writer import OutputFolder, check_output, parse_size
from llmprune.models.resolve import resolve_model
from llmprune.models.skeleton import Skeleton, build_skeleton
from llmprune.structured.arch import Shape, Structure, smaller_config, structure_of
from llmprune.structured.export import LayerCut, cut_layer
from llmprune.structured.fisher import mask_gradients
from llmprune.structured.scores import fluctuation_scores, l2_scores
from llmprune.structured.search import (
    Costs,
    Counts,
    allowed_groups,
    allowed_neurons,
    group_scores,
    rearrange,
    search_counts,
)
from llmprune.structured.tuning import Normal, accumulate_heads, accumulate_neurons, solve

STRUCTURED_METHODS = ("fisher", "flap", "l2-structured")


def _keep_fraction(settings) -> tuple[float, bool]:
    """(fraction of decoder parameters or FLOPs to keep, measured in FLOPs?) from --remove / --target-flops."""
    if settings.remove is not None and settings.target_flops is not None:
        raise LLMPruneError("give --remove or --target-flops, not both")
    if settings.target_flops is not None:
        if not 0 < settings.target_flops < 1:
            raise LLMPruneError(f"--target-flops must be in (0, 1) (got {settings.target_flops})")
        return settings.target_flops, True
    remove = 0.2 if settings.remove is None else settings.remove
    if not 0 < remove < 1:
        raise LLMPruneError(f"--remove must be in (0, 1) (got {remove})")
    return 1 - remove, False


def _check_settings(settings) -> None:
    if settings.sparsity is not None or settings.pattern != "unstructured":
        raise LLMPruneError(
            f"--method {settings.method} removes heads and neurons: use --remove or --target-flops, "
            "not --sparsity/--pattern"
        )
    if settings.save_format != "dense":
        raise LLMPruneError(f"--save-format {settings.save_format} is for 2:4-sparse models, not structured ones")
    if settings.resume:
        raise LLMPruneError("structured runs are not resumable (they are short); run the command again")
    if settings.forward_dtype not in (None, "auto"):
        raise LLMPruneError("--forward-dtype is for the unstructured methods; structured runs take Fisher gradients")
    if settings.plan_only or settings.max_memory is not None:
        raise LLMPruneError(
            "--plan-only and --max-memory plan the unstructured engine; structured runs have no plan yet"
        )
    if settings.fisher_batch is not None and settings.fisher_batch < 1:
        raise LLMPruneError(f"--fisher-batch must be a positive number of windows (got {settings.fisher_batch})")


def choose_counts(settings, scores_heads, scores_neurons, shape, structure, costs, keep, by_flops) -> Counts:
    """Explicit --keep-heads/--keep-neurons, else Kwon's search (Fisher) or equal shares (baselines)."""
    per_group = bool(settings.heads_per_group)
    if settings.keep_heads is not None or settings.keep_neurons is not None:
        return _explicit_counts(settings, shape, structure)
    if settings.method == "fisher":
        return search_counts(
            scores_heads, scores_neurons, shape, structure, costs, keep, by_flops, per_group, settings.neuron_multiple
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


def _explicit_counts(settings, shape: Shape, structure: Structure) -> Counts:
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


def choose_cuts(
    method: str,
    counts: Counts,
    shape: Shape,
    head_scores: list,
    neuron_scores: list,
    grads=None,
    per_group: bool = False,
) -> list[LayerCut]:
    """Per layer, which units stay: top scores, then (Fisher) Kwon's rearrangement."""
    cuts = []
    size = shape.group_size
    for layer in range(len(neuron_scores)):
        pruned_neurons = shape.intermediate - counts.neurons
        if grads is not None:
            gone = set(rearrange(grads.neurons[layer], pruned_neurons))
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
        if grads is not None:
            group_grads = grads.heads[layer].reshape(-1, shape.kv_heads, size).sum(-1)
            gone_groups = set(rearrange(group_grads, pruned_groups))
        else:
            group = head_scores[layer].reshape(shape.kv_heads, size).sum(1)
            gone_groups = set(group.argsort()[:pruned_groups].tolist())
        cuts.append(LayerCut.from_groups([g for g in range(shape.kv_heads) if g not in gone_groups], neurons, shape))
    return cuts


class _StudentMasks:
    """Fixed multiplicative masks (0 for removed units, the tuned scale for kept ones) on o/down inputs."""

    def __init__(self, layer, structure: Structure, shape: Shape, cut: LayerCut, device) -> None:
        self.head = torch.zeros(shape.heads, device=device)
        self.head[cut.heads] = 1.0
        self.neuron = torch.zeros(shape.intermediate, device=device)
        self.neuron[cut.neurons] = 1.0
        self.structure, self.shape, self.layer = structure, shape, layer
        self.captured: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> _StudentMasks:
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
) -> list[dict]:
    """Stream the dense teacher and the masked student side by side; per layer solve the scales (if
    tuning), measure the output error, slice and write the layer. Returns per-layer reports."""
    cpu = torch.device("cpu")
    stream, teacher = open_stream(skeleton, ids, device, chunk, cpu)
    dtype = stream.dtype
    student = Activations([c.clone() for c in teacher.chunks])
    exact = tuning and structure.residual_adds_projections and structure.post_attention_norm is not None
    reports = []
    for index in tqdm(
        range(skeleton.num_layers), desc="tune + write" if tuning else "write", unit="layer", disable=not progress
    ):
        layer = skeleton.load_layer(index, device, dtype)
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
        masks = _StudentMasks(layer, structure, shape, cut, device)
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
            kept = torch.tensor(cut.neurons, dtype=torch.long)
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
                        kept.to(a.device),
                        target.reshape(-1, shape.hidden),
                    )
            result = solve(normal, damping)
            masks.neuron[kept] = result.scales.to(masks.neuron.dtype)
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
        report["output_error"] = err / max(base, 1e-30)
        if structure.heads:
            cut.head_scales = masks.head[cut.heads].cpu()
        cut.neuron_scales = masks.neuron[cut.neurons].cpu()
        _write_layer(skeleton, index, layer, structure, shape, cut, writer, save_dtype)
        skeleton.unload_layer(index)
        reports.append(report)
    stream.close()
    return reports


def _write_layer(skeleton, index, layer, structure, shape, cut, writer, save_dtype) -> int:
    prefix = f"{skeleton.layers_prefix}.{index}."
    tensors = {k: v.detach().float().cpu() for k, v in layer.state_dict().items() if prefix + k in skeleton.key_map}
    small = cut_layer(tensors, structure, shape, cut)
    writer.write_unit(f"layer-{index:05d}", {prefix + k: v.to(save_dtype) for k, v in small.items()})
    return sum(v.numel() for v in small.values())


def prune_structured(settings) -> dict:
    """The structured counterpart of llmprune.pipeline.prune (same settings, same output folder)."""
    from llmprune.pipeline import (
        REPORT_NAME,
        _eval_windows,
        _ppl_block,
        context_length,
        default_chunk,
        load_tokenizer,
        output_config,
    )

    started = time.perf_counter()
    _check_settings(settings)
    keep, by_flops = _keep_fraction(settings)
    check_options(settings, None)
    device = resolve_device(settings.device)
    save_override = parse_dtype(settings.dtype)
    output = (
        Path(settings.output)
        if settings.output
        else Path(
            f"{Path(settings.model).stem if settings.model.endswith('.gguf') else settings.model.split('/')[-1]}"
            f"-{settings.method}-{round((1 - keep) * 100)}"
        )
    )
    check_output(output, settings.overwrite)
    folder = resolve_model(settings.model, quiet=settings.quiet)
    skeleton = build_skeleton(folder)
    structure = structure_of(skeleton.config)
    shape = Shape.of(skeleton.config, structure)
    save_dtype = save_override or skeleton.dtype
    limit = context_length(skeleton)
    seqlen = min(settings.seqlen, limit) if limit else settings.seqlen
    tokenizer = functools.cache(lambda: load_tokenizer(folder))
    if is_token_file(settings.calibration):
        calib_corpus, calib = None, windows_from_file(Path(settings.calibration))
    else:
        calib_corpus = TokenizedCorpus(resolve_source(settings.calibration, split="train"), tokenizer())
        calib = calibration_windows(calib_corpus, settings.samples, seqlen, settings.seed)
    eval_windows = _eval_windows(settings, calib_corpus, tokenizer(), calib.seqlen) if not settings.no_eval else None
    chunk = settings.batch_size or default_chunk(calib.count, calib.seqlen, device)
    progress = not settings.quiet
    writer = OutputFolder(output, settings.overwrite)
    writer.create(fresh=True)
    try:
        dense = None
        if eval_windows is not None:
            dense = perplexity(folder, eval_windows, device, chunk, progress=progress, label="dense ppl")
        timings = {}
        t0 = time.perf_counter()
        grads = None
        fisher_batch = settings.fisher_batch or max(1, chunk // 2)
        if settings.method == "fisher":
            grads = mask_gradients(
                skeleton,
                calib.ids,
                structure,
                shape,
                device,
                fisher_batch,
                writer.work / "fisher",
                progress,
            )
            per_head = [g.pow(2).sum(0) for g in grads.heads]
            head_scores = (
                per_head
                if settings.heads_per_group
                else [
                    group_scores(g, shape.group_size).repeat_interleave(shape.group_size) / shape.group_size
                    for g in grads.heads
                ]
            )
            neuron_scores = [g.pow(2).sum(0) for g in grads.neurons]
        elif settings.method == "flap":
            scores = fluctuation_scores(skeleton, calib.ids, structure, shape, device, chunk, progress)
            head_scores, neuron_scores = scores.heads, scores.neurons
        else:
            scores = l2_scores(skeleton, structure, shape, progress)
            head_scores, neuron_scores = scores.heads, scores.neurons
        timings["score_seconds"] = round(time.perf_counter() - t0, 2)
        costs = Costs.of(skeleton.layers[0], structure, shape, calib.seqlen)
        if settings.heads_per_group:
            search_heads = torch.stack(head_scores)
        elif grads is not None:
            search_heads = torch.stack([group_scores(g, shape.group_size) for g in grads.heads])
        else:
            search_heads = torch.stack([h.reshape(shape.kv_heads, shape.group_size).sum(1) for h in head_scores])
        counts = choose_counts(
            settings, search_heads, torch.stack(neuron_scores), shape, structure, costs, keep, by_flops
        )
        cuts = choose_cuts(
            settings.method, counts, shape, head_scores, neuron_scores, grads, bool(settings.heads_per_group)
        )
        if settings.method == "flap":
            _flap_compensation(skeleton, structure, shape, cuts, scores)
        t1 = time.perf_counter()
        layer_reports = tune_and_write(
            skeleton,
            calib.ids,
            cuts,
            structure,
            shape,
            device,
            chunk,
            writer,
            save_dtype,
            settings.mask_tuning,
            settings.tuning_damping,
            progress,
        )
        timings["tune_write_seconds"] = round(time.perf_counter() - t1, 2)
        writer.write_unit(
            "rest",
            {
                k: (v.to(save_dtype) if v.is_floating_point() else v)
                for k, v in skeleton.read(skeleton.rest_keys()).items()
            },
        )
        writer.write_shards(
            [f"layer-{i:05d}" for i in range(skeleton.num_layers)] + ["rest"], parse_size(settings.max_shard_size)
        )
        config = smaller_config(
            output_config(folder, save_override), structure, shape, counts.heads, counts.kv_groups, counts.neurons
        )
        writer.copy_aux(folder, config)
        report = _report(
            settings,
            folder,
            calib,
            skeleton,
            structure,
            shape,
            counts,
            costs,
            keep,
            by_flops,
            layer_reports,
            save_dtype,
            device,
            writer,
        )
        report["structured"]["fisher_batch"] = fisher_batch if settings.method == "fisher" else None
        report["timings"] = {**timings, "prune_seconds": round(time.perf_counter() - t0, 2)}
        pruned = None
        if eval_windows is not None:
            pruned = perplexity(writer.partial, eval_windows, device, chunk, progress=progress, label="pruned ppl")
        report["perplexity"] = _ppl_block(dense, pruned, eval_windows)
        report["timings"]["total_seconds"] = round(time.perf_counter() - started, 2)
        report["peak_memory"] = {"rss_bytes": peak_rss(), "cuda_bytes": peak_cuda(device)}
        writer.write_json(REPORT_NAME, report)
        finish_folder(writer, report, settings, folder, REPORT_NAME)
        report["output"] = str(writer.commit())
    except BaseException:
        writer.discard()
        raise
    report["hub"] = push_after_run(report, settings)
    return report


def _flap_compensation(skeleton, structure, shape, cuts, scores) -> None:
    """FLAP's bias compensation, only where the output projection has a bias slot: the mean input of the
    removed channels times their weights moves into the bias."""
    hd = shape.head_dim
    for index, cut in enumerate(cuts):
        layer = skeleton.layers[index]
        kept_neurons, kept_heads = set(cut.neurons), set(cut.heads)
        removed = {
            structure.down: ([n for n in range(shape.intermediate) if n not in kept_neurons], scores.down_means),
            structure.o: (
                [c for h in range(shape.heads) if h not in kept_heads for c in range(h * hd, (h + 1) * hd)],
                scores.o_means if structure.heads else None,
            ),
        }
        for name, (channels, means) in removed.items():
            if getattr(layer.get_submodule(name), "bias", None) is None or not means or not channels:
                continue
            key = f"{skeleton.layers_prefix}.{index}.{name}.weight"
            weight = skeleton.read([key])[key].float()
            cut.bias_shift[name] = weight[:, channels] @ means[index][channels]


def _report(
    settings,
    folder,
    calib,
    skeleton,
    structure,
    shape,
    counts,
    costs,
    keep,
    by_flops,
    layer_reports,
    save_dtype,
    device,
    writer,
) -> dict:
    from llmprune.pipeline import report_head, versions

    size = shape.group_size
    before = skeleton.num_layers * costs.layer(shape.kv_heads, size, shape.intermediate, size)
    after = skeleton.num_layers * costs.layer(counts.kv_groups, counts.heads_per_group, counts.neurons, size)
    rest = sum(
        int(torch.tensor(skeleton.checkpoint.metadata(skeleton.key_map[k])[1]).prod()) for k in skeleton.rest_keys()
    )
    tunings = [r for r in layer_reports if r.get("ffn") or r.get("attention")]
    fallbacks = [
        f"layer {r['index']} {part}: {r[part]['note']}"
        for r in layer_reports
        for part in ("attention", "ffn")
        if r.get(part) and r[part].get("note")
    ]
    return {
        **report_head(settings, folder),
        "pattern": "structured",
        "sparsity": 1 - after / before,
        "achieved_sparsity": 1 - after / before,
        "structured": {
            "budget": {
                "keep_fraction": keep,
                "measure": "flops" if by_flops else "parameters",
                "remove": settings.remove,
                "target_flops": settings.target_flops,
            },
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
        },
        "order": "structured",
        "calibration": calib.describe(),
        "dtype": str(save_dtype).removeprefix("torch."),
        "device": str(device),
        "damping_retries": 0,
        "layers": layer_reports,
        "versions": versions(),
    }
