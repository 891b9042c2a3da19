"""Prometheus metrics of one service (its own registry) and the ASGI middleware that records requests."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CHECK_STATES = {"pending": -1, "failed": 0, "passed": 1, "skipped": 2}


class Metrics:
    """Requests by route and status, latency, tokens, queue depth and the perplexity-check result."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmprune_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "llmprune_request_seconds",
            "Request latency to the last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("llmprune_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("llmprune_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.in_flight = Gauge("llmprune_requests_running", "Requests holding a concurrency slot", registry=r)
        self.queued = Gauge("llmprune_requests_queued", "Requests waiting for a slot", registry=r)
        self.ready = Gauge("llmprune_ready", "1 when the service is ready to generate", registry=r)
        self.check_state = Gauge(
            "llmprune_ppl_check_state",
            "Start-up perplexity check: -1 pending, 0 failed, 1 passed, 2 skipped",
            registry=r,
        )
        self.check_ppl = Gauge("llmprune_ppl_check_perplexity", "Perplexity measured by the serving engine", registry=r)
        self.check_reference = Gauge("llmprune_ppl_check_reference", "Perplexity it was compared to", registry=r)
        self.check_state.set(CHECK_STATES["pending"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every request by route template and status, and times it to the last body byte (so a
    streamed response is timed whole, not to its headers)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = time.perf_counter()
        status = {"code": 500, "recorded": False}

        def record() -> None:
            if not status["recorded"]:
                status["recorded"] = True
                self.metrics.requests.labels(route, str(status["code"])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - started)

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, observe)
        finally:
            record()
