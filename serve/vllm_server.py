"""`llmprune serve --engine vllm`: vLLM's own OpenAI-compatible server with llmprune's checks on top.

The app is the one `vllm serve` builds (vLLM's FastAPI app, routers and serving classes), so every request
field and route vLLM supports behaves as it does there, generation defaults from the model's
generation_config.json included. llmprune adds, around it:

- the start-up perplexity check (run on vLLM's engine client once the server listens), gating `/ready` and
  every generation route (503 until it passes);
- `/v1/perplexity`, scored from vLLM's prompt logprobs;
- API keys (`--api-key`, LLMPRUNE_API_KEYS, VLLM_API_KEY) on vLLM's guarded prefixes, answered before
  anything else, and on `/metrics` and `/ready` with `--protect-metrics`;
- load shedding: past `--max-num-seqs` running plus `--max-queue` waiting, a 429 with Retry-After;
- a 400 naming any top-level field of a completions or chat request that vLLM's request model does not
  define (vLLM itself would ignore it with a debug log: no field is silently dropped);
- llmprune's metrics in the registry vLLM exports on `/metrics`, beside vLLM's own.

Every other flag goes to vLLM's own argument parser (`--tensor-parallel-size`, `--gpu-memory-utilization`,
`--max-num-seqs`, `--chat-template`, `--trust-remote-code`, `--config FILE.yaml`, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from argparse import Namespace

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmprune.errors import LLMPruneError
from llmprune_serve.auth import APIKeyMiddleware
from llmprune_serve.config import ServeConfig
from llmprune_serve.errors import APIError
from llmprune_serve.metrics import MetricsMiddleware

log = logging.getLogger("llmprune.serve")
CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU default reserves 90% of the machine's memory
# POST routes that need no generation: answered before the check passes (tokenizers, llmprune's scorer)
UNGATED = frozenset({"/tokenize", "/detokenize", "/v1/perplexity"})


def vllm_namespace(config: ServeConfig, dtype: str, engine_flags: list[str]) -> Namespace:
    """vLLM's serve arguments: llmprune's own flags translated, then `engine_flags` as `vllm serve` reads them."""
    import torch
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(config.folder), "--served-model-name", config.name, "--dtype", dtype, "--seed", "0"]
    argv += ["--host", config.host, "--port", str(config.port), "--uvicorn-log-level", config.log_level]
    if config.max_model_len is not None:
        argv += ["--max-model-len", str(config.max_model_len)]
    if config.enforce_eager:
        argv.append("--enforce-eager")
    given = {flag.split("=")[0] for flag in engine_flags if flag.startswith("--")}
    kv_gib = config.kv_cache_gib
    if kv_gib is None and not torch.cuda.is_available() and "--kv-cache-memory-bytes" not in given:
        kv_gib = CPU_KV_CACHE_GIB
    if kv_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_gib * 2**30))]
    if config.api_keys:  # vLLM guards its prefixes with them too (one --api-key taking every key)
        argv += ["--api-key", *config.api_keys]

    class Parser(FlexibleArgumentParser):
        def error(self, message: str):  # one line, not argparse's usage and exit
            raise LLMPruneError(f"vLLM rejects the engine flags {' '.join(engine_flags)}: {message}")

    parser = make_arg_parser(Parser(prog="llmprune serve --engine vllm"))
    args = parser.parse_args([*argv, *engine_flags])
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError) as exc:  # vLLM's own check of the combination
        raise LLMPruneError(f"vLLM rejects the engine flags {' '.join(engine_flags) or '(none)'}: {exc}") from exc
    return args


def request_fields() -> dict[str, frozenset[str]]:
    """The top-level fields (and aliases) of vLLM's completions and chat request models, by route."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def names(model) -> frozenset[str]:
        found = set(model.model_fields)
        found.update(f.alias for f in model.model_fields.values() if f.alias)
        return frozenset(found)

    return {"/v1/completions": names(CompletionRequest), "/v1/chat/completions": names(ChatCompletionRequest)}


class UnknownFields:
    """400 for a request field vLLM's request model does not define (vLLM would drop it silently)."""

    def __init__(self, app: ASGIApp, fields: dict[str, frozenset[str]]) -> None:
        self.app = app
        self.fields = fields

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        known = self.fields.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if known is None:
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:  # vLLM answers malformed JSON itself
            data = None
        unknown = sorted(set(data) - known) if isinstance(data, dict) else []
        if unknown:
            message = f"unknown field(s) {', '.join(unknown)}: vLLM's request model does not define them"
            await APIError(400, message, unknown[0]).response()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class GateAndShed:
    """503 for generation routes until the service is ready; 429 with Retry-After past `limit` requests in
    flight (vLLM's running batch plus the allowed queue). Counts in-flight requests for the metrics."""

    def __init__(self, app: ASGIApp, service, running: int, queue: int) -> None:
        self.app = app
        self.service = service
        self.running = running
        self.queue = queue
        self.in_flight = 0

    def _publish(self) -> None:
        self.service.metrics.in_flight.set(min(self.in_flight, self.running))
        self.service.metrics.queued.set(max(0, self.in_flight - self.running))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] in UNGATED:
            await self.app(scope, receive, send)
            return
        refusal = None
        if not self.service.ready:
            refusal = APIError(503, f"model not ready: {self.service.not_ready_reason()}", code="not_ready")
        elif self.in_flight >= self.running + self.queue:
            waiting = self.in_flight - self.running
            refusal = APIError(
                429,
                f"server overloaded: {self.running} requests running and {waiting} queued; retry later",
                code="overloaded",
                headers={"Retry-After": str(max(1, waiting // max(1, self.running) + 1))},
            )
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        self.in_flight += 1
        self._publish()
        done = False
        handler = asyncio.current_task()
        watcher: asyncio.Task | None = None

        async def cancel_on_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            handler.cancel()  # vLLM aborts a request whose generator is cancelled

        async def tracked(message: Message) -> None:
            nonlocal done, watcher
            if message["type"] == "http.response.start" and watcher is None:
                # The app has read the request by now, so only a disconnect can arrive on `receive`: a client
                # that leaves mid-stream frees its sequences at once instead of when the stream next writes.
                watcher = asyncio.create_task(cancel_on_disconnect())
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not done:
                done = True
                self.in_flight -= 1
                self._publish()

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if watcher is None or not watcher.done():
                raise  # cancelled from outside (shutdown), not by our disconnect watcher
            handler.uncancel()  # the request is over; the connection's task goes on normally
        finally:
            if watcher is not None:
                watcher.cancel()
            if not done:
                self.in_flight -= 1
                self._publish()


async def serve_vllm(config: ServeConfig, args: Namespace, make_service) -> object:
    """Start vLLM's engine and server for `args`, add llmprune's layer, serve until shut down.

    `make_service(scorer)` builds the Service around a scorer on vLLM's engine client; it is returned so
    the caller can report a fatal start-up error.
    """
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from llmprune_serve.app import ROUTES, api_error_response, llmprune_router
    from llmprune_serve.engines.vllm_engine import VLLMScorer

    # a dead engine leaves the server up, so /health and /ready answer 503 instead of the port going dark
    os.environ.setdefault("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "1")
    _, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as client:
        tasks = await client.get_supported_tasks()
        app = build_app(args, tasks, client.model_config)
        await init_app_state(client, app.state, args, tasks)
        service = make_service(VLLMScorer(client))
        app.include_router(llmprune_router(service, metrics_route=False))
        app.add_exception_handler(APIError, api_error_response)
        get_prometheus_registry().register(service.metrics.registry)
        running = client.vllm_config.scheduler_config.max_num_seqs
        outermost_last = [
            Middleware(GateAndShed, service=service, running=running, queue=config.max_queue),
            Middleware(UnknownFields, fields=request_fields()),
            Middleware(APIKeyMiddleware, keys=config.api_keys, protect_metrics=config.protect_metrics),
            Middleware(MetricsMiddleware, metrics=service.metrics, routes=ROUTES),
        ]
        for middleware in outermost_last:  # vLLM's app has built its middleware stack: rebuild it around ours
            app.user_middleware.insert(0, middleware)
        app.middleware_stack = app.build_middleware_stack()
        startup = asyncio.create_task(service.start())
        log.info("serving %s with vLLM's OpenAI server on http://%s:%d", config.folder, config.host, config.port)
        shutdown = await serve_http(
            app,
            sock=sock,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
        )
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
    await shutdown
    sock.close()
    return service
