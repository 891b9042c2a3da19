"""API keys: with any configured, every route but /health needs `Authorization: Bearer KEY` (else 401)."""

from __future__ import annotations

import hmac
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from llmprune_serve.errors import APIError

ENV_VAR = "LLMPRUNE_API_KEYS"
OPEN_PATHS = frozenset({"/health"})


def api_keys(flags: list[str] | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from --api-key flags and the comma-separated LLMPRUNE_API_KEYS variable, blanks dropped."""
    env = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    keys = [k.strip() for k in [*(flags or []), *env.split(",")]]
    return tuple(dict.fromkeys(k for k in keys if k))


class APIKeyMiddleware:
    """Rejects requests without a valid bearer key before any body is read (constant-time comparison)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        return any(hmac.compare_digest(given, key) for key in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] not in OPEN_PATHS and not self._authorized(scope):
            error = APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
