"""Bounded concurrency with a bounded queue (429 with Retry-After past it) and per-request deadlines."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from serve.errors import APIError


class Limiter:
    """At most `concurrency` requests run and `queue` wait; the next one is refused with 429.

    Retry-After is the recent mean time a slot is held, scaled by how many are ahead, at least 1 s.
    """

    def __init__(self, concurrency: int, queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self.active = 0
        self.waiting = 0
        self._free = asyncio.Condition()
        self._mean_hold = 1.0
        self._on_change = on_change or (lambda active, waiting: None)

    def retry_after(self) -> int:
        ahead = (self.waiting + 1) / self.concurrency
        return max(1, math.ceil(self._mean_hold * ahead))

    async def acquire(self, deadline: float) -> float:
        """Take a slot before `deadline` (time.monotonic()); returns the time it was taken."""
        if self.active >= self.concurrency and self.waiting >= self.queue:
            raise APIError(
                429,
                f"server overloaded: {self.active} requests running and {self.waiting} queued; retry later",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after())},
            )
        async with self._free:
            self.waiting += 1
            self._on_change(self.active, self.waiting)
            try:
                await asyncio.wait_for(
                    self._free.wait_for(lambda: self.active < self.concurrency), timeout=remaining(deadline)
                )
            except asyncio.TimeoutError as exc:
                raise timeout_error() from exc
            finally:
                self.waiting -= 1
                self._on_change(self.active, self.waiting)
            self.active += 1
            self._on_change(self.active, self.waiting)
        return time.monotonic()

    async def release(self, taken: float) -> None:
        """Give a slot back (taken = what acquire returned)."""
        self._mean_hold = 0.8 * self._mean_hold + 0.2 * (time.monotonic() - taken)
        async with self._free:
            self.active -= 1
            self._on_change(self.active, self.waiting)
            self._free.notify()


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
