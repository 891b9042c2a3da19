"""API keys: with any configured, the API routes need `Authorization: Bearer KEY` (else 401).

As in `vllm serve`, the guarded routes are those under /v1, /v2, /inference and /cohere; /health, /version,
/tokenize and /detokenize stay open, and so do /metrics and /ready unless `--protect-metrics`.
"""

from __future__ import annotations

import hmac
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from llmprune_serve.errors import APIError

ENV_VAR = "LLMPRUNE_API_KEYS"
VLLM_ENV_VAR = "VLLM_API_KEY"
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")  # vLLM's AuthenticationMiddleware's
MONITORING = frozenset({"/metrics", "/ready"})


def api_keys(flags: list[str] | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from --api-key flags, the comma-separated LLMPRUNE_API_KEYS and vLLM's VLLM_API_KEY, blanks dropped."""
    environ = environ if environ is not None else os.environ
    env = [*environ.get(ENV_VAR, "").split(","), environ.get(VLLM_ENV_VAR, "")]
    keys = [k.strip() for k in [*(flags or []), *env]]
    return tuple(dict.fromkeys(k for k in keys if k))


class APIKeyMiddleware:
    """Rejects requests without a valid bearer key before any body is read (constant-time comparison)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], protect_metrics: bool = False) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.protect_metrics = protect_metrics

    def _guarded(self, path: str) -> bool:
        return path.startswith(GUARDED_PREFIXES) or (self.protect_metrics and path in MONITORING)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        return any(hmac.compare_digest(given, key) for key in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope.get("method") != "OPTIONS" and self._guarded(scope["path"])
        if guarded and self.keys and not self._authorized(scope):
            error = APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
