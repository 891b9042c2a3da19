"""The one-shot pruning run: resolve, calibrate, stream-prune layer by layer, write, evaluate.

`prune()` is the Python API behind `llmprune MODEL ...`; `evaluate()` is behind `llmprune eval`.
"""

from __future__ import annotations

import functools
import json
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune import __version__
from llmprune.data.sources import resolve_source
from llmprune.data.windows import (
    TokenizedCorpus,
    Windows,
    calibration_windows,
    evaluation_windows,
    is_token_file,
    windows_from_file,
)
from llmprune.engine.devices import (
    available_memory,
    compute_dtype,
    parse_dtype,
    peak_cuda,
    peak_rss,
    resolve_device,
    return_freed_memory,
)
from llmprune.engine.parking import PARK_MODES, Parking
from llmprune.engine.prune_layer import LayerPruner, TargetRule, find_targets
from llmprune.engine.stream import LayerStream
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import Perplexity, perplexity
from llmprune.export.gate import DEFAULT_MAX_PPL_INCREASE
from llmprune.export.publish import check_options, finish_folder, push_after_run
from llmprune.export.writer import OutputFolder, check_output, parse_size
from llmprune.methods import METHODS, Pattern
from llmprune.models.resolve import resolve_model
from llmprune.models.skeleton import Skeleton, build_skeleton

REPORT_NAME = "llmprune.json"
LOADER_BREAKING_KEYS = ("quantization_config", "sparsity_config", "compression_config")


@dataclass
class Settings:
    """Everything a run depends on (mirrors the CLI flags)."""

    model: str
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    calibration: str = "c4"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    output: str | None = None
    overwrite: bool = False
    eval: str | None = None
    no_eval: bool = False
    eval_samples: int | None = None
    device: str = "auto"
    dtype: str | None = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    order: str = "sequential"
    batch_size: int | None = None
    dampening: float = 0.01
    blocksize: int = 128
    max_shard_size: str = "5GB"
    park: str = "auto"
    quiet: bool = False
    save_format: str = "dense"
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    command: str | None = None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LLMPruneError(f"cannot load the tokenizer of {folder}: {str(exc).splitlines()[0][:160]}") from exc


def context_length(skeleton: Skeleton) -> int | None:
    text = skeleton.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


CHUNK_TOKENS = {"cpu": 4096, "cuda": 16384}


def auto_batch_size(
    skeleton: Skeleton, seqlen: int, windows: int, device: torch.device, dtype: torch.dtype, reserved: int = 0
) -> int:
    """Windows per forward chunk: about CHUNK_TOKENS tokens (efficient matmuls, small temporaries),
    fewer if a chunk's activations would not fit a quarter of free memory."""
    text = skeleton.config.get_text_config()
    hidden = int(getattr(text, "hidden_size", 4096))
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden)
    per_window = seqlen * (8 * hidden + 4 * inter) * torch.finfo(dtype).bits // 8
    budget = max(0, available_memory(device) // 4 - reserved)
    wanted = max(1, CHUNK_TOKENS.get(device.type, 4096) // seqlen)
    return int(max(1, min(windows, wanted, budget // max(per_window, 1))))


def default_output(model: str, method: str, pattern: Pattern) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).stem if model.endswith(".gguf") else model.split("/")[-1])
    tag = f"{pattern.n}of{pattern.m}" if pattern.is_nm else f"{round(pattern.sparsity * 100)}"
    return Path(f"{stem}-{method}-{tag}")


def output_config(folder: Path, save_dtype: torch.dtype | None) -> dict:
    """The source config.json, architecture unchanged, minus metadata that stock loaders reject."""
    config = json.loads((folder / "config.json").read_text())
    for key in LOADER_BREAKING_KEYS:
        config.pop(key, None)
    if save_dtype is not None:
        name = str(save_dtype).removeprefix("torch.")
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    return config


def _log(settings: Settings, message: str) -> None:
    if not settings.quiet:
        print(f"llmprune: {message}", flush=True)


def _eval_windows(settings: Settings, calibration: TokenizedCorpus | None, tokenizer, seqlen: int) -> Windows | None:
    if settings.no_eval:
        return None
    if settings.eval is None and calibration is not None and calibration.corpus.local:
        source, spec = calibration, settings.calibration
    else:
        spec = settings.eval or "wikitext2"
        try:
            source = TokenizedCorpus(resolve_source(spec, split="test"), tokenizer)
        except LLMPruneError as exc:
            if settings.eval is None:
                raise LLMPruneError(f"{exc} (or pass --eval FILE, or --no-eval)") from exc
            raise
    return evaluation_windows(source, seqlen, settings.eval_samples, spec=spec)


def prune(model: str, **options) -> dict:
    """Prune `model` in one shot and write the result; returns the report (also in llmprune.json).

    Keyword options mirror the CLI flags (see `Settings`), e.g.
    `prune("opt-125m", method="wanda", pattern="2:4", calibration="corpus.txt", output="out")`.
    """
    settings = Settings(model=model, **options)
    started = time.perf_counter()
    return_freed_memory()
    if settings.method not in METHODS:
        raise LLMPruneError(f"unknown --method {settings.method!r}: choose from {', '.join(METHODS)}")
    pattern = Pattern.parse(settings.pattern, settings.sparsity)
    check_options(settings, pattern)
    device = resolve_device(settings.device)
    save_dtype_override = parse_dtype(settings.dtype)
    output = Path(settings.output) if settings.output else default_output(model, settings.method, pattern)
    check_output(output, settings.overwrite)

    folder = resolve_model(model, quiet=settings.quiet)
    skeleton = build_skeleton(folder)
    save_dtype = save_dtype_override or skeleton.dtype
    cdtype = compute_dtype(device, skeleton.dtype)
    limit = context_length(skeleton)
    seqlen = min(settings.seqlen, limit) if limit else settings.seqlen
    if seqlen != settings.seqlen:
        _log(settings, f"--seqlen capped at the model's context of {seqlen} tokens")

    rule = TargetRule(tuple(settings.targets), tuple(settings.ignore))
    _check_targets(skeleton, rule, pattern)
    tokenizer = functools.cache(lambda: load_tokenizer(folder))  # not loaded at all for token files without eval
    if is_token_file(settings.calibration):
        calib_corpus, calib = None, windows_from_file(Path(settings.calibration))
        _check_token_windows(calib, skeleton, limit)
    else:
        calib_corpus = TokenizedCorpus(resolve_source(settings.calibration, split="train"), tokenizer())
        calib = calibration_windows(calib_corpus, settings.samples, seqlen, settings.seed)
    eval_windows = _eval_windows(settings, calib_corpus, tokenizer(), seqlen) if not settings.no_eval else None
    method = METHODS[settings.method](dampening=settings.dampening, blocksize=settings.blocksize)
    pruner = LayerPruner(
        method, pattern, rule, settings.order, save_dtype=save_dtype, parking=Parking(_park_mode(settings.park, device))
    )
    batch = settings.batch_size or auto_batch_size(
        skeleton, seqlen, calib.count, device, cdtype, reserved=calib.count * seqlen * _hidden(skeleton) * 4
    )
    _log(
        settings,
        f"{settings.method} {pattern} sparsity {pattern.sparsity:g} on {folder.name} "
        f"({skeleton.num_layers} layers, {device.type}); calibration {calib.count} x {seqlen} "
        f"tokens from {calib.source}; batch {batch} windows",
    )

    dense_ppl = None
    if eval_windows is not None:
        dense_ppl = perplexity(folder, eval_windows, device, batch, progress=not settings.quiet, label="dense ppl")
        _log(
            settings,
            f"dense perplexity {dense_ppl.perplexity:.3f} on {eval_windows.count} x {eval_windows.seqlen} tokens",
        )

    writer = OutputFolder(output, settings.overwrite)
    writer.create()
    try:
        layers, prune_seconds = _prune_layers(
            skeleton, calib, device, cdtype, batch, pruner, writer, save_dtype, settings
        )
        units = [f"layer-{i:05d}" for i in range(skeleton.num_layers)] + ["rest"]
        writer.write_unit("rest", _cast_all(skeleton.read(skeleton.rest_keys()), save_dtype))
        writer.write_shards(units, parse_size(settings.max_shard_size))
        writer.copy_aux(folder, output_config(folder, save_dtype_override))
        report = _report(settings, folder, pattern, calib, eval_windows, layers, save_dtype, device, batch)
        report["timings"] = {"prune_seconds": round(prune_seconds, 2)}
        writer.write_json(REPORT_NAME, report)
        pruned_ppl = None
        if eval_windows is not None:
            pruned_ppl = perplexity(
                writer.partial, eval_windows, device, batch, progress=not settings.quiet, label="pruned ppl"
            )
        report["perplexity"] = _ppl_block(dense_ppl, pruned_ppl, eval_windows)
        report["timings"]["total_seconds"] = round(time.perf_counter() - started, 2)
        report["peak_memory"] = {"rss_bytes": peak_rss(), "cuda_bytes": peak_cuda(device)}
        finish_folder(writer, report, settings, folder, REPORT_NAME)
        report["output"] = str(writer.commit())
    except BaseException:
        if not any(writer.work.glob("layer-*.safetensors")):
            writer.discard()
        raise
    report["hub"] = push_after_run(report, settings)
    return report


def _park_mode(park: str, device: torch.device) -> str:
    """Where chunks waiting at a lockstep barrier put their big tensors: host RAM from a GPU, disk on a CPU."""
    if park == "auto":
        return "host" if device.type == "cuda" else "disk"
    if park not in PARK_MODES:
        raise LLMPruneError(f"--park must be auto or one of {', '.join(PARK_MODES)} (got {park!r})")
    return park


def _check_token_windows(windows: Windows, skeleton: Skeleton, limit: int | None) -> None:
    vocab = getattr(skeleton.config.get_text_config(), "vocab_size", None)
    if vocab and int(windows.ids.max()) >= vocab or int(windows.ids.min()) < 0:
        raise LLMPruneError(f"token file {windows.source} holds ids outside the vocabulary [0, {vocab})")
    if limit and windows.seqlen > limit:
        raise LLMPruneError(
            f"token file {windows.source} has windows of {windows.seqlen} tokens, over the context {limit}"
        )


def _hidden(skeleton: Skeleton) -> int:
    return int(getattr(skeleton.config.get_text_config(), "hidden_size", 4096))


def _cast_all(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _check_targets(skeleton: Skeleton, rule: TargetRule, pattern: Pattern) -> None:
    """Before any weight is read: targets exist and N:M fits their widths (shapes from the meta model)."""
    total = 0
    for index, layer in enumerate(skeleton.layers):
        prefix = f"{skeleton.layers_prefix}.{index}"
        targets = find_targets(layer, prefix, rule)
        total += len(targets)
        for name, module in targets.items():
            pattern.check_width(module.in_features, f"{prefix}.{name}")
    if total == 0:
        raise LLMPruneError(f"no Linear module matches --targets {' '.join(rule.include)} (minus --ignore)")


def _prune_layers(
    skeleton: Skeleton,
    calib: Windows,
    device: torch.device,
    cdtype: torch.dtype,
    batch: int,
    pruner: LayerPruner,
    writer: OutputFolder,
    save_dtype: torch.dtype,
    settings: Settings,
) -> tuple[list[dict], float]:
    started = time.perf_counter()
    stream = LayerStream(skeleton, device, cdtype, batch)
    hidden = stream.begin(calib.ids)
    stream.prepare({int(chunk.shape[0]) for chunk in hidden} | {1})
    pruner.parking.folder = writer.work
    reports: list[dict] = []
    bar = tqdm(
        range(skeleton.num_layers), desc=f"{settings.method} {pruner.pattern}", unit="layer", disable=settings.quiet
    )
    for index in bar:
        layer_started = time.perf_counter()
        layer = skeleton.load_layer(index, device, cdtype)
        modules = pruner.prune(stream, index, layer, hidden)
        prefix = f"{skeleton.layers_prefix}.{index}."
        writer.write_unit(
            f"layer-{index:05d}",
            {
                prefix + k: v.detach().to("cpu", save_dtype) if v.is_floating_point() else v.cpu()
                for k, v in layer.state_dict().items()
                if prefix + k in skeleton.key_map
            },
        )
        skeleton.unload_layer(index)
        reports.append(_layer_report(index, modules, time.perf_counter() - layer_started))
        if modules:
            bar.set_postfix(sparsity=f"{reports[-1]['sparsity']:.3f}", error=f"{reports[-1]['error']:.4f}")
    stream.close()
    return reports, time.perf_counter() - started


def _layer_report(index: int, modules: list[dict], seconds: float) -> dict:
    total = sum(m["shape"][0] * m["shape"][1] for m in modules)
    pruned = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for m in modules)
    errors = [m["error"] for m in modules if m["error"] is not None]
    return {
        "index": index,
        "sparsity": pruned / total if total else 0.0,
        "error": sum(errors) / len(errors) if errors else 0.0,
        "damping_retries": sum(m.get("damping_retries", 0) for m in modules),
        "seconds": round(seconds, 3),
        "modules": modules,
    }


def _ppl_block(dense: Perplexity | None, pruned: Perplexity | None, windows: Windows | None) -> dict | None:
    if windows is None:
        return None
    return {
        "eval": windows.describe(),
        "dense": dense.perplexity if dense else None,
        "pruned": pruned.perplexity if pruned else None,
        "increase": (pruned.perplexity / dense.perplexity - 1) if dense and pruned else None,
        "dense_detail": dense.as_dict() if dense else None,
        "pruned_detail": pruned.as_dict() if pruned else None,
    }


def _report(
    settings: Settings,
    folder: Path,
    pattern: Pattern,
    calib: Windows,
    eval_windows: Windows | None,
    layers: list[dict],
    save_dtype: torch.dtype,
    device: torch.device,
    batch: int,
) -> dict:
    import transformers

    pruned = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
    total = sum(m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
    return {
        "format_version": 1,
        "llmprune_version": __version__,
        "model": settings.model,
        "source_folder": str(folder),
        "method": settings.method,
        "pattern": str(pattern),
        "sparsity": pattern.sparsity,
        "achieved_sparsity": pruned / total if total else 0.0,
        "order": settings.order,
        "options": {"dampening": settings.dampening, "blocksize": settings.blocksize},
        "targets": {"include": list(settings.targets), "ignore": list(settings.ignore)},
        "calibration": calib.describe(),
        "dtype": str(save_dtype).removeprefix("torch."),
        "device": str(device),
        "batch_size": batch,
        "damping_retries": sum(lay["damping_retries"] for lay in layers),
        "layers": layers,
        "versions": {
            "llmprune": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }


def evaluate(
    model: str,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    samples: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    quiet: bool = False,
) -> dict:
    """Streamed perplexity of MODEL (a pruned folder or anything `prune` accepts) on `dataset`."""
    dev = resolve_device(device)
    folder = resolve_model(model, quiet=quiet)
    skeleton = build_skeleton(folder)
    limit = context_length(skeleton)
    seqlen = min(seqlen, limit) if limit else seqlen
    tokenizer = load_tokenizer(folder)
    source = TokenizedCorpus(resolve_source(dataset, split="test"), tokenizer)
    windows = evaluation_windows(source, seqlen, samples, spec=dataset)
    batch = batch_size or auto_batch_size(skeleton, seqlen, windows.count, dev, compute_dtype(dev, skeleton.dtype))
    result = perplexity(folder, windows, dev, batch, progress=not quiet, label="ppl")
    return {"model": model, "folder": str(folder), "eval": windows.describe(), **result.as_dict()}
