"""The one run skeleton behind `llmprune MODEL ...` and `llmprune.prune()`:

resolve -> calibration and eval windows -> output folder -> dense perplexity -> BODY -> shards ->
pruned perplexity -> gate, card, report -> push.

The body is the kind of pruning the method belongs to (unstructured / N:M, or structured); everything
else is shared, so every kind gets the same checks, logs, resume rules, report and publishing.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmprune.body import Body, RunContext, log
from llmprune.data.sources import resolve_source
from llmprune.data.windows import (
    TokenizedCorpus,
    Windows,
    calibration_windows,
    evaluation_windows,
    is_token_file,
    windows_from_file,
)
from llmprune.depth import DEPTH, DepthBody
from llmprune.engine.devices import (
    current_rss,
    parse_dtype,
    peak_cuda,
    peak_rss,
    resolve_device,
    return_freed_memory,
    trim_heap,
    warm_up_kernels,
)
from llmprune.engine.loop import layer_unit
from llmprune.engine.ranks import Ranks, device_for, joined
from llmprune.engine.resume import RunState, check_resumable, folder_identity, make_fingerprint
from llmprune.engine.unstructured import UnstructuredBody
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import Perplexity, perplexity
from llmprune.experts import EXPERTS, ExpertsBody
from llmprune.export.card import base_model_of, license_of, write_card
from llmprune.export.gate import quality_gate
from llmprune.export.packed import FORMAT, pack_shards
from llmprune.export.writer import OutputFolder, check_output, partial_folder
from llmprune.methods import METHODS
from llmprune.models import remote_code
from llmprune.models.resolve import resolve_model
from llmprune.models.skeleton import Skeleton, build_skeleton, cast_floating
from llmprune.models.text import context_length, load_tokenizer
from llmprune.report import PeakMemory, PerplexitySection, Report, write_report
from llmprune.settings import DEFAULT_EVAL, Option, Publish, Settings, parse_size, validate
from llmprune.speed import SPEED, SpeedBody
from llmprune.structured.body import StructuredBody
from llmprune.structured.methods import STRUCTURED

LOADER_BREAKING_KEYS = ("quantization_config", "sparsity_config", "compression_config")

# each kind of pruning, by its body's name for it: its methods and its body
KINDS: dict[str, tuple[dict[str, type], type[Body]]] = {
    body.kind: (registry, body)
    for registry, body in (
        (METHODS, UnstructuredBody),
        (STRUCTURED, StructuredBody),
        (DEPTH, DepthBody),
        (EXPERTS, ExpertsBody),
        (SPEED, SpeedBody),
    )
}


def all_methods() -> dict[str, tuple[str, type]]:
    """Every method by name: (kind, class)."""
    return {name: (kind, cls) for kind, (registry, _) in KINDS.items() for name, cls in registry.items()}


def method_options() -> dict[str, tuple[Option, ...]]:
    """The options each method declares, by method name."""
    return {name: cls.options for name, (_, cls) in all_methods().items()}


def make_settings(model: str, **options) -> Settings:
    """Settings from the Python API's keywords, validated for the method's kind."""
    settings = Settings.from_options(model, method_options(), **options)
    kind, method = all_methods()[settings.method]
    validate(settings, kind, KINDS[kind][1].sections, method.options)
    return settings


def default_output(model: str, method: str, tag: str) -> Path:
    """./MODEL-METHOD-TAG, MODEL being the last part of a Hub id or the stem of a .gguf file."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).stem if model.endswith(".gguf") else model.split("/")[-1])
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


def eval_windows_for(settings: Settings, calibration: TokenizedCorpus | None, tokenizer, seqlen: int) -> Windows | None:
    """The eval windows: --eval, else the held-out part of a local calibration corpus, else wikitext2."""
    common = settings.common
    if common.no_eval:
        return None
    if common.eval is None and calibration is not None and calibration.corpus.local:
        source, spec = calibration, common.calibration
    else:
        spec = common.eval or DEFAULT_EVAL
        try:
            source = TokenizedCorpus(resolve_source(spec, split="test"), tokenizer)
        except LLMPruneError as exc:
            if common.eval is None:
                raise LLMPruneError(f"{exc} (or pass --eval FILE, or --no-eval)") from exc
            raise
    return evaluation_windows(source, seqlen, common.eval_samples, spec=spec)


def check_token_windows(windows: Windows, skeleton: Skeleton, limit: int | None) -> None:
    """A token file's ids must be in the vocabulary and its windows within the context."""
    vocab = getattr(skeleton.config.get_text_config(), "vocab_size", None)
    if vocab and int(windows.ids.max()) >= vocab or int(windows.ids.min()) < 0:
        raise LLMPruneError(f"token file {windows.source} holds ids outside the vocabulary [0, {vocab})")
    if limit and windows.seqlen > limit:
        raise LLMPruneError(
            f"token file {windows.source} has windows of {windows.seqlen} tokens, over the context {limit}"
        )


def api_call(settings: Settings) -> str:
    """The Python call equivalent to `settings`: llmprune.prune('MODEL', option=value, ...)."""
    defaults = {o.name: o.default for o in all_methods()[settings.method][1].options}
    changed = settings.changed(defaults)
    options = [f"{name}={'***' if name == 'token' else repr(value)}" for name, value in changed.items()]
    return f"llmprune.prune({', '.join([repr(settings.common.model), *options])})"


def prune(model: str, **options) -> dict:
    """Prune `model` in one shot and write the result; returns the report (also in llmprune.json).

    Keyword options mirror the CLI flags (see llmprune.settings), e.g.
    `prune("opt-125m", method="wanda", pattern="2:4", calibration="corpus.txt", output="out")`.

    Under torchrun, every rank calls it with the same arguments: the windows are split across the ranks
    (docs/distributed.md) and rank 0 writes the output; every rank returns the report.
    """
    started = time.perf_counter()
    return_freed_memory()
    settings = make_settings(model, **options)
    launch = resolve_device(settings.common.device, absent_ok=True)
    with remote_code.consent(settings.common.trust_remote_code) as grant:
        with joined(launch, settings.common.reduce_dtype) as ranks:
            return _prune(model, settings, started, grant, ranks)


def check_launch(settings: Settings, body: Body, ranks: Ranks) -> None:
    """A torchrun launch: every rank was given the same arguments, and the run can be split across ranks."""
    if not ranks.active:
        return
    if not body.distributed:
        raise LLMPruneError(f"--method {settings.method} does not run across torchrun ranks yet; run it as one process")
    if settings.publish.eval_tasks:
        raise LLMPruneError("--eval-tasks under torchrun: run `llmprune eval OUTPUT --tasks ...` once the run is done")
    if settings.unstructured.plan_only:
        raise LLMPruneError(
            f"--plan-only under torchrun: plan one rank as one process with --plan-only --plan-ranks {ranks.world}"
        )
    ranks.agree("arguments", {k: v for k, v in settings.flat().items() if k != "command"})


def _prune(model: str, settings: Settings, started: float, grant: Callable[..., None], ranks: Ranks) -> dict:
    """prune() once its settings are valid; `grant` records consent to run the model's own code, for this run."""
    common = settings.common
    kind, method = all_methods()[settings.method]
    body = KINDS[kind][1](settings, method)
    check_launch(settings, body, ranks)
    device = resolve_device(common.device, absent_ok=body.plans_absent_devices)
    device = device_for(device, ranks)
    body.check_device(device)
    save_override = parse_dtype(common.dtype)
    output = Path(common.output) if common.output else default_output(model, settings.method, body.tag)
    ranks.decide(lambda: check_output(output, common.overwrite))
    if common.resume and not body.resumable:
        raise LLMPruneError(f"--resume: {kind} runs are not resumable (they are short); run the command again")
    if settings.publish.push_to_hub:
        from llmprune.hub.push import require_token

        require_token()

    def resolve() -> Path:
        return resolve_model(model, quiet=common.quiet, revision=common.source_revision, token=common.token)

    folder = ranks.rank0_first(resolve)  # one download (or GGUF conversion) into a cache the ranks share
    grant(folder, output, partial_folder(output))  # the source, and the output that carries its code
    skeleton = build_skeleton(folder)
    limit = context_length(skeleton)
    seqlen = min(common.seqlen, limit) if limit else common.seqlen
    ctx = RunContext(settings, folder, skeleton, device, save_override, ranks=ranks)
    body.check_model(ctx)
    tokenizer = functools.cache(lambda: load_tokenizer(folder))  # not loaded at all for token files without eval
    if is_token_file(common.calibration):
        calib_corpus, ctx.calib = None, windows_from_file(Path(common.calibration))
        check_token_windows(ctx.calib, skeleton, limit)
    else:
        calib_corpus = TokenizedCorpus(resolve_source(common.calibration, split="train"), tokenizer())
        ctx.calib = calibration_windows(calib_corpus, common.samples, seqlen, common.seed)
    if not common.no_eval:
        ctx.eval_windows = eval_windows_for(settings, calib_corpus, tokenizer(), ctx.calib.seqlen)
    if seqlen != common.seqlen:  # said once the inputs are known to be good (bad input gets one line)
        log.info("--seqlen capped at the model's context of %d tokens", seqlen)

    writer = OutputFolder(output, common.overwrite)
    fingerprint = functools.cache(lambda: fingerprint_of(ctx, body))  # hashes the shard headers once
    saved = ranks.decide(lambda: resumable_state(writer, fingerprint, settings, body.resumable))
    warm_up_kernels()
    trim_heap()
    ctx.overhead = current_rss()  # interpreter, libraries, skeleton, tokenizer: what a plan does not budget
    planned = body.plan(ctx, saved)
    if planned is not None:
        return planned
    log.info("%s", body.describe(ctx))

    if saved is None:
        state = RunState(fingerprint() if body.resumable else {}, choice=body.state_choice())
        if ranks.main:
            writer.create(fresh=True)
            if body.resumable:
                state.save(writer.work)
        ranks.barrier()  # the partial folder exists before any rank writes into it
    else:
        state = saved
        log.info("resuming %s at layer %d of %d", writer.partial.name, state.next_layer, skeleton.num_layers)
    try:
        result = _run(ctx, body, writer, state, started)
        if ranks.main:
            result["output"] = str(writer.commit())
    except BaseException:
        if not ranks.main:
            raise
        if not body.resumable or (state.next_layer == 0 and not state.dense_perplexity and not state.profile):
            writer.discard()
        else:
            log.warning("the run stopped; the same command resumes it from %s", writer.partial)
        raise
    result = ranks.broadcast_object(result)  # before the push: the other ranks need not wait for an upload
    if ranks.main:
        result["hub"] = push_after_run(result, settings)
    return result


def _run(ctx: RunContext, body: Body, writer: OutputFolder, state: RunState, started: float) -> dict:
    """From the dense perplexity to the finished (uncommitted) folder; returns its report."""
    settings, eval_windows, device, ranks = ctx.settings, ctx.eval_windows, ctx.device, ctx.ranks
    if eval_windows is not None and state.dense_perplexity is None:
        dense = perplexity(
            ctx.folder, eval_windows, device, body.eval_chunk, progress=ctx.progress, label="dense ppl", ranks=ranks
        )
        state.dense_perplexity = dense.as_dict()
        if body.resumable and ranks.main:
            state.save(writer.work)
        log.info("dense perplexity %.3f on %d x %d tokens", dense.perplexity, eval_windows.count, eval_windows.seqlen)
    body.prune(ctx, writer, state)
    skeleton = ctx.skeleton
    if ranks.main:
        writer.write_unit(
            "rest", {k: cast_floating(v, ctx.save_dtype) for k, v in skeleton.read(skeleton.rest_keys()).items()}
        )
        units = [layer_unit(i) for i in range(body.output_layers(ctx))] + ["rest"]
        writer.write_shards(units, parse_size(settings.common.max_shard_size))
        writer.copy_aux(ctx.folder, body.config(output_config(ctx.folder, ctx.save_override)))
    ranks.barrier()  # the pruned folder is complete before the ranks read it back
    pruned = None
    if eval_windows is not None:
        pruned = perplexity(
            writer.partial, eval_windows, device, body.eval_chunk, progress=ctx.progress, label="pruned ppl",
            ranks=ranks,
        )  # fmt: skip
    peaks = ranks.gather_objects({"rank": ranks.rank, "rss_bytes": peak_rss(), "cuda_bytes": peak_cuda(device)})
    if not ranks.main:
        return {}
    tasks = task_results(ctx.folder, writer.partial, settings.publish, device) if settings.publish.eval_tasks else None
    part = body.report(ctx, state)
    if ranks.active:
        part.sections["distributed"] = ranks.describe()
    ppl = None
    if eval_windows is not None:
        dense_block = Perplexity(**state.dense_perplexity).as_dict() if state.dense_perplexity else None
        ppl = PerplexitySection(eval_windows.describe(), dense_block, pruned.as_dict() if pruned else None)
    publish = settings.publish
    base = base_model_of(settings.common.model, ctx.folder)
    report = Report(
        model=settings.common.model,
        source_folder=str(ctx.folder),
        method=settings.method,
        pattern=part.pattern,
        sparsity=part.sparsity,
        achieved_sparsity=part.achieved_sparsity,
        options=part.options,
        sections=part.sections,
        calibration=ctx.calib.describe(),
        dtype=str(ctx.save_dtype).removeprefix("torch."),
        device=str(device),
        layers=part.layers,
        damping_retries=part.damping_retries,
        timings={**part.timings, "total_seconds": round(time.perf_counter() - started, 2)},
        perplexity=ppl,
        peak_memory=PeakMemory(peak_rss(), peak_cuda(device), ctx.overhead, peaks if ranks.active else None),
        command=settings.common.command or api_call(settings),
        base_model=base,
        license=license_of(base, ctx.folder),
        save_format=publish.save_format,
        quality_gate=quality_gate(
            ppl.as_dict() if ppl else None, publish.max_ppl_increase, tasks, publish.max_acc_drop
        ),
        tasks=tasks,
    )
    if publish.save_format == FORMAT:
        report.packed = pack_shards(writer.partial, writer.partial)
    data = report.as_dict()
    write_card(writer.partial, data)
    write_report(writer.partial, data)
    return data


def task_results(dense: Path, pruned: Path, publish: Publish, device: torch.device) -> dict:
    """--eval-tasks: lm-eval's accuracy of the dense source and of the pruned folder, task by task."""
    from llmprune.eval.tasks import task_accuracy, task_manager
    from llmprune.settings import parse_tasks

    names = parse_tasks(publish.eval_tasks)
    options = dict(include_path=publish.eval_tasks_path, limit=publish.eval_tasks_limit, device=str(device))
    options["manager"] = task_manager(names, publish.eval_tasks_path)  # indexed once for both models
    log.info("task accuracy (lm-eval) of dense and pruned on %s", ", ".join(names))
    scores = {which: task_accuracy(path, names, **options) for which, path in (("dense", dense), ("pruned", pruned))}
    results = {
        name: {
            "metric": scores["pruned"]["tasks"][name]["metric"],
            "dense": scores["dense"]["tasks"][name]["accuracy"],
            "pruned": scores["pruned"]["tasks"][name]["accuracy"],
            "stderr": scores["pruned"]["tasks"][name]["stderr"],
            "samples": scores["pruned"]["tasks"][name]["samples"],
        }
        for name in names
    }
    version = scores["pruned"]["lm_eval_version"]
    return {"results": results, "limit": publish.eval_tasks_limit, "lm_eval_version": version}


def fingerprint_of(ctx: RunContext, body: Body) -> dict:
    """What a resumed run must match: the settings the result depends on, with the model, the windows and the
    dtype by what they resolved to, and what the body resolved (pattern, forward dtype). `--plan-ranks N` plans
    as a launch of N ranks would, resuming its run included."""
    world = ctx.ranks.planned(ctx.settings.unstructured.plan_ranks).world
    resolved = {
        "model": folder_identity(ctx.folder),
        "calibration": ctx.calib.fingerprint(),
        "eval": ctx.eval_windows.fingerprint() if ctx.eval_windows else None,
        "dtype": str(ctx.save_dtype),
        **({"world_size": world} if world > 1 else {}),  # the shards of windows each rank holds
        **body.fingerprint(ctx),
    }
    return make_fingerprint(**{**ctx.settings.fingerprint_parts(body.sections), **resolved})


def resumable_state(
    writer: OutputFolder, fingerprint: Callable[[], dict], settings: Settings, resumable: bool
) -> RunState | None:
    """The unfinished run to continue, if the partial folder holds this very run; None to start fresh. An
    unfinished folder that cannot be continued is never replaced without --overwrite."""
    overwrite = settings.common.overwrite
    saved = RunState.load(writer.work) if resumable and writer.work.is_dir() else None
    if saved is not None and not overwrite:
        check_resumable(saved, fingerprint(), writer.partial)
        return saved
    if settings.common.resume:
        raise LLMPruneError(f"--resume: there is no unfinished run to resume at {writer.partial}")
    if writer.partial.exists() and not overwrite:
        raise LLMPruneError(f"{writer.partial} holds an unfinished run that cannot be resumed; pass --overwrite")
    return None


def push_after_run(report: dict, settings: Settings) -> dict | None:
    """Push the committed folder when --push-to-hub was given and the gate passed; returns what happened."""
    publish = settings.publish
    if not publish.push_to_hub:
        return None
    if not report["quality_gate"]["passed"]:
        return {"pushed": False, "repo_id": publish.push_to_hub, "reason": "the quality gate failed"}
    from llmprune.hub.push import push_folder

    try:
        result = push_folder(
            Path(report["output"]),
            publish.push_to_hub,
            private=publish.private,
            revision=publish.revision,
            commit_message=publish.commit_message,
        )
    except LLMPruneError as exc:
        raise type(exc)(
            f"{exc} ({report['output']} is complete: retry with `llmprune push {report['output']} "
            f"{publish.push_to_hub}`)"
        ) from exc
    return {"pushed": True, **result}
