"""Bounded concurrency with a bounded queue (429 with Retry-After past it) and per-request deadlines."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from llmprune_serve.errors import APIError


class Limiter:
    """At most `concurrency` requests run and `queue` wait, first come first served (a freed slot is handed
    to the longest waiter); the next one is refused with 429.

    Retry-After is the recent mean time a slot is held, scaled by how many are ahead, at least 1 s.
    """

    def __init__(self, concurrency: int, queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.active = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._mean_hold = 1.0
        self._on_change = on_change or (lambda active, waiting: None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        ahead = (self.waiting + 1) / self.concurrency
        return max(1, math.ceil(self._mean_hold * ahead))

    async def acquire(self, deadline: float) -> float:
        """Take a slot before `deadline` (time.monotonic()); returns the time it was taken."""
        if self.active < self.concurrency and not self._waiters:
            self.active += 1
            self._on_change(self.active, self.waiting)
            return time.monotonic()
        if self.waiting >= self.queue:
            raise APIError(
                429,
                f"server overloaded: {self.active} requests running and {self.waiting} queued; retry later",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after())},
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        self._on_change(self.active, self.waiting)
        try:
            await asyncio.wait_for(turn, timeout=remaining(deadline))
        except BaseException as exc:
            if turn in self._waiters:
                self._waiters.remove(turn)
            elif turn.done() and not turn.cancelled():
                self._hand_off()  # the slot came just as this request gave up: pass it on
            self._on_change(self.active, self.waiting)
            if isinstance(exc, asyncio.TimeoutError):
                raise timeout_error() from exc
            raise
        self._on_change(self.active, self.waiting)
        return time.monotonic()

    def release(self, taken: float) -> None:
        """Give a slot back (taken = what acquire returned)."""
        self._mean_hold = 0.8 * self._mean_hold + 0.2 * (time.monotonic() - taken)
        self._hand_off()
        self._on_change(self.active, self.waiting)

    def _hand_off(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def timeout_error() -> APIError:
    return APIError(504, "request timed out (see --request-timeout)", code="timeout")


async def before_deadline(items: AsyncIterator, deadline: float) -> AsyncIterator:
    """Yield from `items` until `deadline`, then raise a 504 APIError (closing `items`, which aborts it)."""
    async with aclosing(items) as stream:
        iterator = stream.__aiter__()
        while True:
            try:
                item = await asyncio.wait_for(iterator.__anext__(), timeout=remaining(deadline))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError as exc:
                raise timeout_error() from exc
            yield item
