"""`llmprune serve DIR_OR_MODEL`: check the arguments, build the engine and the app, run uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import fields
from pathlib import Path

from llmprune.argparsing import Parser
from llmprune.errors import LLMPruneError
from llmprune_serve.config import DEFAULT_PORT, ServeConfig

log = logging.getLogger("llmprune.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_CONTEXT = 2048


def serve_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llmprune serve",
        description="Serve a (pruned) model over an OpenAI-compatible HTTP API, ready only once its perplexity "
        "checks out.",
    )
    parser.add_argument("model", metavar="DIR_OR_MODEL", help="pruned folder, local folder, .gguf, Hub id or alias")
    parser.add_argument("--engine", default="auto", help="auto (vllm if installed), vllm or transformers")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--served-model-name", default=None, metavar="NAME", help="model id (default: folder name)")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (vllm: the checkpoint's, but bfloat16 for a float32 quantized one; transformers: float32 on CPU)",
    )
    parser.add_argument("--device", default="auto", help="transformers engine and check reference: auto, cpu, cuda")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="N", help="context (default: model's)")
    parser.add_argument("--kv-cache-gib", type=float, default=None, metavar="F", help="vLLM KV cache (CPU default 1)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM: no compilation (starts much faster)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N", help="transformers: rows per batch (8)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY", help="required bearer key")
    parser.add_argument("--protect-metrics", action="store_true", help="/metrics and /ready need a key too")
    parser.add_argument(
        "--max-concurrency", type=int, default=None, metavar="N", help="transformers: requests run at once (16)"
    )
    parser.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests that may wait (64)")
    parser.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="seconds (120)")
    parser.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="largest max_tokens (2048)")
    parser.add_argument("--check-text", type=Path, default=None, metavar="FILE", help="held-out text to check on")
    parser.add_argument("--check-seqlen", type=int, default=None, metavar="L", help="--check-text window (512)")
    parser.add_argument("--check-samples", type=int, default=8, metavar="N", help="--check-text windows (8)")
    parser.add_argument("--expect-ppl", type=float, default=None, metavar="X", help="--check-text reference")
    parser.add_argument("--ppl-tolerance", type=float, default=0.05, metavar="F", help="allowed gap (0.05 = 5%%)")
    parser.add_argument("--max-ppl-increase", type=float, default=None, metavar="F", help="gate vs dense (recorded)")
    parser.add_argument("--skip-ppl-check", action="store_true", help="ready without the perplexity check")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own code (auto_map models); both engines"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def build_config(args: argparse.Namespace, folder: Path) -> ServeConfig:
    """The validated settings (one clear error per bad value)."""
    from llmprune.settings import check_max_ppl_increase
    from llmprune_serve.auth import api_keys

    positive = {
        "--request-timeout": args.request_timeout,
        "--max-tokens": args.max_tokens,
        "--max-batch": args.max_batch,
        "--check-samples": args.check_samples,
        "--ppl-tolerance": args.ppl_tolerance,
    }
    optional = {
        "--expect-ppl": args.expect_ppl,
        "--kv-cache-gib": args.kv_cache_gib,
        "--max-concurrency": args.max_concurrency,
    }
    for flag, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
        if not value > 0:
            raise LLMPruneError(f"{flag} must be positive (got {value})")
    if args.max_queue < 0:
        raise LLMPruneError(f"--max-queue must be 0 or more (got {args.max_queue})")
    if not 0 < args.port < 65536:
        raise LLMPruneError(f"--port must be in 1..65535 (got {args.port})")
    if args.check_seqlen is not None and args.check_seqlen < 2:
        raise LLMPruneError(f"--check-seqlen must be at least 2 (got {args.check_seqlen})")
    if args.max_ppl_increase is not None:
        check_max_ppl_increase(args.max_ppl_increase)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise LLMPruneError(f"--max-model-len must be at least 2 (got {args.max_model_len})")
    options = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name in vars(args)}
    return ServeConfig(folder=folder, api_keys=api_keys(args.api_key), **options)


def main(argv: list[str]) -> int:
    """Parse, validate, then serve until interrupted (an engine that fails to start is an error).

    Flags llmprune does not know go to vLLM's own parser with `--engine vllm` (and are an error otherwise).
    """
    from llmprune.engine.devices import parse_dtype
    from llmprune.models import remote_code
    from llmprune.models.resolve import resolve_model
    from llmprune_serve.engines import pick_engine

    args, engine_flags = serve_parser().parse_known_args(argv)
    kind = pick_engine(args.engine)
    if engine_flags and kind != "vllm":  # (--trust-remote-code is added for vLLM below)
        raise LLMPruneError(f"unknown flags for the {kind} engine: {' '.join(engine_flags)} (vLLM's flags need vLLM)")
    if kind == "vllm" and args.max_concurrency is not None:
        raise LLMPruneError("--max-concurrency is for the transformers engine; vLLM batches up to --max-num-seqs")
    parse_dtype(args.dtype)
    config = build_config(args, resolve_model(args.model))
    if args.trust_remote_code:
        engine_flags = [*engine_flags, "--trust-remote-code"]  # vLLM's own flag, for its engine
    with remote_code.consent(args.trust_remote_code) as grant:  # for as long as this server runs
        grant(config.folder)
        return _serve(args, engine_flags, kind, config)


def _serve(args: argparse.Namespace, engine_flags: list[str], kind: str, config: ServeConfig) -> int:
    """Check the folder, start the engine and serve until interrupted."""
    import uvicorn

    from llmprune.export.packed import is_packed
    from llmprune.models.compressed import half_activations_only
    from llmprune.models.skeleton import build_skeleton
    from llmprune.models.text import context_length, load_tokenizer
    from llmprune_serve.app import create_app
    from llmprune_serve.check import check_mode, load_report
    from llmprune_serve.engines import EngineSettings, create_engine
    from llmprune_serve.service import Service
    from llmprune_serve.vllm_cpu import check_quantized_on_cpu

    if is_packed(config.folder):
        raise LLMPruneError(
            f"{config.folder} is in the packed 2:4 format, which vLLM and transformers do not load: "
            f"run `llmprune unpack {config.folder} OUT` and serve OUT"
        )
    report = load_report(config.folder)
    mode = check_mode(config, report)
    skeleton = build_skeleton(config.folder)
    native = context_length(skeleton) or DEFAULT_CONTEXT
    if config.max_model_len is not None and config.max_model_len > native:
        raise LLMPruneError(f"--max-model-len {config.max_model_len} exceeds the model's context of {native}")
    context = config.max_model_len or native
    tokenizer = load_tokenizer(config.folder)
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if config.host not in LOOPBACK and not config.api_keys:
        log.warning("listening on %s without an API key: anyone who can reach it may use it", config.host)
    dtype = str(skeleton.dtype).removeprefix("torch.") if args.dtype == "auto" and kind == "vllm" else args.dtype
    if args.dtype == "auto" and kind == "vllm" and dtype == "float32" and half_activations_only(skeleton.checkpoint):
        log.info("quantized checkpoint: vLLM's kernels for it take no float32 inputs everywhere, serving in bfloat16")
        dtype = "bfloat16"
    if kind == "vllm":
        check_quantized_on_cpu(skeleton.checkpoint)
        return _serve_vllm(config, dtype, engine_flags, tokenizer, context, report, mode)
    settings = EngineSettings(
        folder=config.folder,
        dtype=dtype,
        device=config.device,
        max_model_len=context,
        max_batch=config.max_batch,
        served_model_name=config.name,
    )
    service = Service(config, create_engine(kind, settings, tokenizer), tokenizer, context, report, mode)
    server = uvicorn.Server(
        uvicorn.Config(create_app(service), host=config.host, port=config.port, log_level=config.log_level)
    )
    service.on_fatal = lambda: setattr(server, "should_exit", True)
    log.info("serving %s with the %s engine on http://%s:%d", config.folder, kind, config.host, config.port)
    asyncio.run(server.serve())
    if service.fatal is not None:
        raise LLMPruneError(f"engine {kind} failed to start: {service.fatal}")
    return 0


def _serve_vllm(config: ServeConfig, dtype: str, engine_flags: list[str], tokenizer, context, report, mode) -> int:
    """vLLM's own OpenAI server with llmprune's layer (see vllm_server.py)."""
    import uvloop

    from llmprune_serve.service import Service
    from llmprune_serve.vllm_server import serve_vllm, vllm_namespace

    args = vllm_namespace(config, dtype, engine_flags)
    try:
        uvloop.run(serve_vllm(config, args, lambda scorer: Service(config, scorer, tokenizer, context, report, mode)))
    except Exception as exc:  # vLLM's engine failed to build (bad model, no memory...)
        raise LLMPruneError(f"engine vllm failed to start: {exc}") from exc
    return 0
