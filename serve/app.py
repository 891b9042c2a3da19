"""The FastAPI application: OpenAI-compatible routes, /v1/perplexity, health, readiness and metrics.

Order of refusals: 401 (API key, before the body is read), 400 (invalid body), 404 (unknown model),
503 (not ready), 429 (concurrency and queue full, with Retry-After), 504 (past --request-timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmprune.version import __version__
from llmprune_serve.auth import APIKeyMiddleware
from llmprune_serve.errors import APIError, error_body
from llmprune_serve.generation import ChoiceEvent
from llmprune_serve.metrics import MetricsMiddleware
from llmprune_serve.responses import Formatter, sse, usage
from llmprune_serve.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    PerplexityRequest,
    SamplingFields,
    TokenizeRequest,
)
from llmprune_serve.service import Service

log = logging.getLogger("llmprune.serve")
ROUTES = {
    "/health",
    "/version",
    "/tokenize",
    "/detokenize",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/perplexity",
}


class SlotStreamingResponse(StreamingResponse):
    """A streamed response that gives its concurrency slot back however the stream ends (done, error,
    client gone), even if it never started."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line (and the offending parameter) from pydantic's errors; a field this engine does not
    know or honour is named ("top_k is not supported ..."), never dropped."""
    parts, param = [], None
    for error in exc.errors()[:3]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        kind, message = error.get("type"), str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "json_invalid":
            return "request body is not valid JSON", None
        if kind == "extra_forbidden":
            param = param or (loc[0] if len(loc) > 1 else loc[-1])
            parts.append(f"{loc[-1]} is not supported by the transformers engine (use --engine vllm)")
            continue
        if not loc and ": " in message:  # a check across fields names the field it refuses first
            field, message = message.split(": ", 1)
            loc = [field]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {message}")
    return "invalid request: " + "; ".join(parts), param


async def stream_events(
    formatter: Formatter, events: AsyncIterator[ChoiceEvent], choices: int, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI chunk format, ending with `data: [DONE]` (an error becomes a last
    `data: {"error": ...}` event, since the status line has been sent)."""
    if formatter.chat:
        for index in range(choices):
            yield sse(formatter.chunk(index, None, role=True))
    tokens = 0
    try:
        async with aclosing(events) as stream:
            async for event in stream:
                tokens += event.tokens
                if formatter.chat and event.finish_reason and event.text:
                    yield sse(formatter.chunk(event.index, event.text))
                    yield sse(formatter.chunk(event.index, None, event.finish_reason))
                elif event.text or event.finish_reason:
                    yield sse(formatter.chunk(event.index, event.text, event.finish_reason))
        if include_usage:
            yield sse(formatter.usage_chunk(usage(prompt_tokens, tokens)))
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:
        log.exception("generation failed")
        yield sse(error_body(500, f"generation failed: {exc}"))
    yield sse("[DONE]")


async def api_error_response(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


def llmprune_router(service: Service, metrics_route: bool) -> APIRouter:
    """The routes llmprune adds to either app: /ready, /v1/perplexity, and /metrics where the app has none."""
    router = APIRouter()
    config = service.config

    @router.get("/ready")
    async def ready() -> JSONResponse:
        body = {"ready": service.ready, "model": config.name, "engine": service.engine.name}
        body["engine_alive"] = service.engine_up and service.engine.alive
        return JSONResponse({**body, "check": service.check.as_dict()}, status_code=200 if service.ready else 503)

    if metrics_route:

        @router.get("/metrics")
        async def metrics() -> Response:
            service.metrics.ready.set(1 if service.ready else 0)
            return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.post("/v1/perplexity")
    async def perplexity(body: PerplexityRequest) -> dict:
        service.require_model(body.model)
        service.require_engine()
        deadline = time.monotonic() + config.request_timeout
        taken = await service.limiter.acquire(deadline)
        try:
            return await service.perplexity(body.texts(), body.seqlen, deadline)
        finally:
            service.limiter.release(taken)

    return router


def create_app(service: Service) -> FastAPI:
    """The ASGI app for `service`; its lifespan loads the engine and runs the check in the background."""
    config = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        startup = asyncio.create_task(service.start())
        yield
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
        await service.stop()

    app = FastAPI(title="llmprune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    app.add_exception_handler(APIError, api_error_response)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return APIError(400, message, param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def failure(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {exc}"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine is loading or alive; 503 once a started engine died (as vLLM's /health)."""
        dead = service.engine_up and not service.engine.alive
        return JSONResponse({"status": "dead" if dead else "ok"}, status_code=503 if dead else 200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__, "engine": service.engine.name}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        service.require_model(body.model)
        ids = service.encode(body.prompt, special=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": service.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        service.require_model(body.model)
        return {"prompt": service.tokenizer.decode(service.checked_ids(body.tokens, "tokens"))}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": config.name,
            "object": "model",
            "created": int(service.created),
            "owned_by": "llmprune",
            "root": str(config.folder),
            "max_model_len": service.context,
        }
        return {"object": "list", "data": [card]}

    async def generate(
        formatter: Formatter, body: SamplingFields, prompts: list[list[int]], max_tokens: int
    ) -> Response | dict:
        deadline = time.monotonic() + config.request_timeout
        wants_logprobs = isinstance(body, CompletionRequest) and body.wants_logprobs()
        sampling = service.sampling(body, max_tokens, body.logprobs if wants_logprobs else None)
        taken = await service.limiter.acquire(deadline)
        prompt_tokens = sum(len(p) for p in prompts)
        choices = len(prompts) * body.n
        events = service.choices(prompts, body.n, sampling, body.stop_list(), deadline)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            content = stream_events(formatter, events, choices, prompt_tokens, include_usage)
            return SlotStreamingResponse(content, lambda: service.limiter.release(taken))
        texts, finishes, tokens = dict.fromkeys(range(choices), ""), {}, 0
        scored: dict[int, list] = {index: [] for index in range(choices)}
        try:
            async with aclosing(events) as stream:
                async for event in stream:
                    texts[event.index] += event.text
                    tokens += event.tokens
                    if event.token is not None:
                        scored[event.index].append((event.token, event.logprob, event.top))
                    if event.finish_reason:
                        finishes[event.index] = event.finish_reason
            logprobs = await service.echo_and_logprobs(body, prompts, texts, scored) if wants_logprobs else None
        finally:
            service.limiter.release(taken)
        return formatter.body(texts, finishes, usage(prompt_tokens, tokens), logprobs)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        service.require_model(body.model)
        service.require_ready()
        prompts = service.completion_prompts(body.prompt)
        max_tokens = service.max_tokens(body.max_tokens, prompts)
        return await generate(Formatter(chat=False, model=config.name), body, prompts, max_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        service.require_model(body.model)
        service.require_ready()
        prompt = service.chat_prompt(body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = service.max_tokens(body.max_completion_tokens or body.max_tokens, [prompt], param)
        return await generate(Formatter(chat=True, model=config.name), body, [prompt], max_tokens)

    app.include_router(llmprune_router(service, metrics_route=True))
    app.add_middleware(APIKeyMiddleware, keys=config.api_keys, protect_metrics=config.protect_metrics)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, routes=ROUTES)
    return app
