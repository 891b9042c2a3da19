"""Cooperative stop: a request to end a run at its next layer boundary rather than in the middle of a layer.

`request_stop` may be called from a signal handler or another thread (the prune service's worker calls it on
SIGTERM); every layer loop passes through `Skeleton.load_layer`, which calls `stop_point`, so the run raises
`StopRequested` before it starts the next layer. The resumable loop commits each layer before loading the next,
so a stopped run's partial output is always a consistent resume point (or is removed by whoever asked).
"""

from __future__ import annotations

import threading

from llmprune.errors import LLMPruneError

_requested = threading.Event()


class StopRequested(LLMPruneError):
    """The run was asked to stop and did so at a layer boundary."""


def request_stop() -> None:
    """Ask the running prune to stop before its next layer (safe in a signal handler)."""
    _requested.set()


def clear_stop() -> None:
    """Forget a stop request (before starting another run in the same process)."""
    _requested.clear()


def stop_point(where: str) -> None:
    """Raise StopRequested if a stop was requested; `where` names the boundary for the message."""
    if _requested.is_set():
        raise StopRequested(f"stopped as requested before {where}")
