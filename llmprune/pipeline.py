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
    check_forward_mix,
    compute_dtype,
    cpu_has_native_bf16,
    current_rss,
    forward_dtype,
    is_absent,
    parse_dtype,
    parse_forward_dtype,
    peak_cuda,
    peak_rss,
    resolve_device,
    return_freed_memory,
    solver_devices,
    trim_heap,
    warm_up_kernels,
)
from llmprune.engine.loop import layer_unit, prune_layers
from llmprune.engine.parking import Parking
from llmprune.engine.plan import Geometry, MemoryPlan, Request, choice_from_dict, choice_to_dict, make_plan
from llmprune.engine.prune_layer import LayerPruner, TargetRule, find_targets
from llmprune.engine.resume import RunState, check_resumable, folder_identity, make_fingerprint
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
    forward_dtype: str = "auto"
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    order: str = "parallel"
    batch_size: int | None = None
    dampening: float = 0.01
    blocksize: int = 128
    inverse_dtype: str = "auto"
    max_shard_size: str = "5GB"
    park: str = "auto"
    max_memory: str | None = None
    activations: str = "auto"
    solver_devices: str | None = None
    remove: float | None = None
    target_flops: float | None = None
    heads_per_group: bool = False
    keep_heads: int | None = None
    keep_neurons: int | None = None
    mask_tuning: bool = True
    neuron_multiple: int = 64
    tuning_damping: float = 0.01
    fisher_batch: int | None = None
    resume: bool = False
    plan_only: bool = False
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


def default_chunk(windows: int, seqlen: int, device: torch.device) -> int:
    """Windows per forward chunk: about CHUNK_TOKENS tokens (efficient matmuls, small temporaries)."""
    return max(1, min(windows, CHUNK_TOKENS.get(device.type, 4096) // seqlen))


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
    from llmprune.structured.run import STRUCTURED_METHODS, prune_structured

    if settings.method in STRUCTURED_METHODS:
        return prune_structured(settings)
    if settings.method not in METHODS:
        raise LLMPruneError(
            f"unknown --method {settings.method!r}: choose from {', '.join([*METHODS, *STRUCTURED_METHODS])}"
        )
    if settings.remove is not None or settings.target_flops is not None:
        raise LLMPruneError(f"--remove/--target-flops are for structured methods ({', '.join(STRUCTURED_METHODS)})")
    pattern = Pattern.parse(settings.pattern, settings.sparsity)
    check_options(settings, pattern)
    device = resolve_device(settings.device, absent_ok=settings.plan_only)
    save_dtype_override = parse_dtype(settings.dtype)
    forward_request = parse_forward_dtype(settings.forward_dtype, device)
    budgets = parse_budgets(settings.max_memory, device)
    inverse_request = parse_inverse_dtype(settings.inverse_dtype)
    if settings.activations not in ("auto", "memory", "disk"):
        raise LLMPruneError(f"--activations must be auto, memory or disk (got {settings.activations!r})")
    output = Path(settings.output) if settings.output else default_output(model, settings.method, pattern)
    check_output(output, settings.overwrite)

    folder = resolve_model(model, quiet=settings.quiet)
    skeleton = build_skeleton(folder)
    save_dtype = save_dtype_override or skeleton.dtype
    fdtype = forward_dtype(device, skeleton.dtype, forward_request)
    cdtype = compute_dtype(device, skeleton.dtype, fdtype)
    check_forward_mix(cdtype, fdtype)
    if device.type == "cpu" and fdtype == torch.bfloat16 and not cpu_has_native_bf16():
        _log(settings, "note: this CPU has no native bfloat16 (AVX512-BF16 or AMX); a float32 forward is faster")
    limit = context_length(skeleton)
    seqlen = min(settings.seqlen, limit) if limit else settings.seqlen
    if seqlen != settings.seqlen:
        _log(settings, f"--seqlen capped at the model's context of {seqlen} tokens")

    rule = TargetRule(tuple(settings.targets), tuple(settings.ignore))
    targets = _check_targets(skeleton, rule, pattern)
    tokenizer = functools.cache(lambda: load_tokenizer(folder))  # not loaded at all for token files without eval
    if is_token_file(settings.calibration):
        calib_corpus, calib = None, windows_from_file(Path(settings.calibration))
        _check_token_windows(calib, skeleton, limit)
    else:
        calib_corpus = TokenizedCorpus(resolve_source(settings.calibration, split="train"), tokenizer())
        calib = calibration_windows(calib_corpus, settings.samples, seqlen, settings.seed)
    eval_windows = _eval_windows(settings, calib_corpus, tokenizer(), calib.seqlen) if not settings.no_eval else None

    writer = OutputFolder(output, settings.overwrite)
    fingerprint = make_fingerprint(
        model=folder_identity(folder),
        method=settings.method,
        pattern=str(pattern),
        sparsity=pattern.sparsity,
        calibration=calib.fingerprint(),
        eval=eval_windows.fingerprint() if eval_windows else None,
        targets=list(settings.targets),
        ignore=list(settings.ignore),
        order=settings.order,
        dtype=str(save_dtype),
        forward_dtype=str(fdtype),
        dampening=settings.dampening,
        blocksize=settings.blocksize,
        inverse_dtype=settings.inverse_dtype,
        batch_size=settings.batch_size,
        save_format=settings.save_format,
    )
    saved = _resumable_state(writer, fingerprint, settings)
    method_cls = METHODS[settings.method]
    request = Request(
        windows=calib.count,
        seqlen=calib.seqlen,
        eval_windows=eval_windows.count if eval_windows else 0,
        chunk=settings.batch_size or default_chunk(calib.count, calib.seqlen, device),
        order=settings.order,
        park=settings.park,
        method=method_cls,
        inverse_dtype=inverse_request,
        embedding_rows=int(torch.unique(calib.ids).numel()),
        activations=settings.activations,
        compute_dtype=cdtype,
        model_dtype=skeleton.dtype,
        save_dtype=save_dtype,
    )
    warm_up_kernels()
    trim_heap()
    overhead = current_rss()  # interpreter, libraries, skeleton, tokenizer: what the plan does not budget
    plan = make_plan(Geometry.of(skeleton, targets), request, device, budgets[0], budgets[1], overhead)
    if saved is not None:
        plan.choice = choice_from_dict(saved.choice)
        plan.adaptations.append(f"resuming at layer {saved.next_layer} with the saved choices")
    if is_absent(device):
        plan.notes.append(
            f"planned for {device}, which this machine does not have: the GPU defaults (layers in "
            f"{str(cdtype).removeprefix('torch.')}, chunks of up to {request.chunk} windows) and the budget given"
        )
    if not settings.quiet or settings.plan_only:
        print(plan.render(), flush=True)
    if settings.plan_only:
        return {"memory_plan": plan.as_dict(), "plan": plan.render()}
    choice = plan.choice
    _log(
        settings,
        f"{settings.method} {pattern} sparsity {pattern.sparsity:g} on {folder.name} "
        f"({skeleton.num_layers} layers, {device.type}, forward in {str(fdtype).removeprefix('torch.')}); "
        f"calibration {calib.count} x {calib.seqlen} tokens from {calib.source}",
    )
    method = method_cls(dampening=settings.dampening, blocksize=settings.blocksize, inverse_dtype=choice.inverse_dtype)
    solvers = solver_devices(device, settings.solver_devices)
    pruner = LayerPruner(
        method, pattern, rule, choice.order, save_dtype=save_dtype, parking=Parking(choice.park), devices=solvers
    )

    if saved is None:
        writer.create(fresh=True)
        state = RunState(fingerprint, choice=choice_to_dict(choice))
        state.save(writer.work)
    else:
        state = saved
        _log(settings, f"resuming {writer.partial.name} at layer {state.next_layer} of {skeleton.num_layers}")
    try:
        if eval_windows is not None and state.dense_perplexity is None:
            dense = perplexity(
                folder, eval_windows, device, choice.chunk, progress=not settings.quiet, label="dense ppl"
            )
            state.dense_perplexity = dense.as_dict()
            state.save(writer.work)
            _log(
                settings,
                f"dense perplexity {dense.perplexity:.3f} on {eval_windows.count} x {eval_windows.seqlen} tokens",
            )
        prune_layers(
            skeleton,
            calib.ids,
            device,
            cdtype,
            choice,
            pruner,
            writer,
            state,
            save_dtype,
            f"{settings.method} {pattern}",
            settings.quiet,
            forward_dtype=fdtype,
        )
        units = [layer_unit(i) for i in range(skeleton.num_layers)] + ["rest"]
        writer.write_unit("rest", _cast_all(skeleton.read(skeleton.rest_keys()), save_dtype))
        writer.write_shards(units, parse_size(settings.max_shard_size))
        writer.copy_aux(folder, output_config(folder, save_dtype_override))
        report = _report(settings, folder, pattern, calib, state.layers, save_dtype, device, plan)
        report["forward_dtype"] = str(fdtype).removeprefix("torch.")
        report["solver_devices"] = [str(d) for d in solvers]
        report["timings"] = {"prune_seconds": round(state.prune_seconds, 2)}
        writer.write_json(REPORT_NAME, report)
        pruned_ppl = None
        if eval_windows is not None:
            pruned_ppl = perplexity(
                writer.partial, eval_windows, device, choice.chunk, progress=not settings.quiet, label="pruned ppl"
            )
        dense_ppl = Perplexity(**state.dense_perplexity) if state.dense_perplexity else None
        report["perplexity"] = _ppl_block(dense_ppl, pruned_ppl, eval_windows)
        report["timings"]["total_seconds"] = round(time.perf_counter() - started, 2)
        report["peak_memory"] = {"rss_bytes": peak_rss(), "cuda_bytes": peak_cuda(device), "overhead_bytes": overhead}
        finish_folder(writer, report, settings, folder, REPORT_NAME)
        report["output"] = str(writer.commit())
    except BaseException:
        if state.next_layer == 0 and not state.dense_perplexity:
            writer.discard()
        elif not settings.quiet:
            print(f"llmprune: the run stopped; the same command resumes it from {writer.partial}", flush=True)
        raise
    report["hub"] = push_after_run(report, settings)
    return report


def _resumable_state(writer: OutputFolder, fingerprint: dict, settings: Settings) -> RunState | None:
    """The unfinished run to continue, if the partial folder holds this very run; None to start fresh."""
    saved = RunState.load(writer.work) if writer.work.is_dir() else None
    if saved is not None and not settings.overwrite:
        check_resumable(saved, fingerprint, writer.partial)
        return saved
    if settings.resume:
        raise LLMPruneError(f"--resume: there is no unfinished run to resume at {writer.partial}")
    if writer.partial.exists() and not settings.overwrite:
        raise LLMPruneError(f"{writer.partial} holds an unfinished run that cannot be resumed; pass --overwrite")
    return None


def parse_inverse_dtype(name: str) -> torch.dtype | None:
    """--inverse-dtype: None for auto (float64 unless the budget needs float32)."""
    choices = {"auto": None, "float64": torch.float64, "float32": torch.float32}
    if name not in choices:
        raise LLMPruneError(f"--inverse-dtype must be one of {', '.join(choices)} (got {name!r})")
    return choices[name]


def parse_budgets(text: str | None, device: torch.device) -> tuple[int, int | None]:
    """--max-memory: one SIZE for the compute device, or 'cpu=SIZE,cuda=SIZE' (cuda:N names the same
    budget). Default: what is free."""
    values: dict[str, int] = {}
    if text:
        for part in text.split(","):
            key, _, size = part.rpartition("=")
            key = key.strip().partition(":")[0] or device.type
            if key not in ("cpu", "cuda"):
                raise LLMPruneError(f"--max-memory: {part.strip()!r} names no device; use SIZE or cpu=SIZE,cuda=SIZE")
            values[key] = parse_size(size)
    budget = values[device.type] if device.type in values else available_memory(device)
    if device.type != "cuda":
        return budget, None
    return budget, values["cpu"] if "cpu" in values else available_memory(torch.device("cpu"))


def _check_token_windows(windows: Windows, skeleton: Skeleton, limit: int | None) -> None:
    vocab = getattr(skeleton.config.get_text_config(), "vocab_size", None)
    if vocab and int(windows.ids.max()) >= vocab or int(windows.ids.min()) < 0:
        raise LLMPruneError(f"token file {windows.source} holds ids outside the vocabulary [0, {vocab})")
    if limit and windows.seqlen > limit:
        raise LLMPruneError(
            f"token file {windows.source} has windows of {windows.seqlen} tokens, over the context {limit}"
        )


def _cast_all(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def _check_targets(skeleton: Skeleton, rule: TargetRule, pattern: Pattern) -> list[dict]:
    """Before any weight is read: targets exist and N:M fits their widths (shapes from the meta model)."""
    by_layer = []
    for index, layer in enumerate(skeleton.layers):
        prefix = f"{skeleton.layers_prefix}.{index}"
        targets = find_targets(layer, prefix, rule)
        by_layer.append(targets)
        for name, module in targets.items():
            pattern.check_width(module.in_features, f"{prefix}.{name}")
    if not any(by_layer):
        raise LLMPruneError(f"no Linear module matches --targets {' '.join(rule.include)} (minus --ignore)")
    return by_layer


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


def versions() -> dict:
    """Versions of what produced a report."""
    import transformers

    return {
        "llmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def report_head(settings: Settings, folder: Path) -> dict:
    """The fields every llmprune.json starts with, structured or not: format, version, model, method."""
    return {
        "format_version": 1,
        "llmprune_version": __version__,
        "model": settings.model,
        "source_folder": str(folder),
        "method": settings.method,
    }


def _report(
    settings: Settings,
    folder: Path,
    pattern: Pattern,
    calib: Windows,
    layers: list[dict],
    save_dtype: torch.dtype,
    device: torch.device,
    plan: MemoryPlan,
) -> dict:

    pruned = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
    total = sum(m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
    return {
        **report_head(settings, folder),
        "pattern": str(pattern),
        "sparsity": pattern.sparsity,
        "achieved_sparsity": pruned / total if total else 0.0,
        "order": plan.choice.order,
        "options": {
            "dampening": settings.dampening,
            "blocksize": settings.blocksize,
            "inverse_dtype": str(plan.choice.inverse_dtype).removeprefix("torch."),
        },
        "targets": {"include": list(settings.targets), "ignore": list(settings.ignore)},
        "calibration": calib.describe(),
        "dtype": str(save_dtype).removeprefix("torch."),
        "device": str(device),
        "batch_size": plan.choice.chunk,
        "memory_plan": plan.as_dict(),
        "damping_retries": sum(lay["damping_retries"] for lay in layers),
        "layers": layers,
        "versions": versions(),
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
    batch = batch_size or default_chunk(windows.count, seqlen, dev)
    result = perplexity(folder, windows, dev, batch, progress=not quiet, label="ppl")
    return {"model": model, "folder": str(folder), "eval": windows.describe(), **result.as_dict()}
