"""Run one layer over all chunks in lockstep, so each chunk is computed once ("one forward").

Each chunk's forward runs in its own thread, but only one thread runs at a time: a baton passes
round-robin in chunk order. A forward pauses at a barrier (a module's pre-hook) and hands the baton
on; when the last chunk reaches the barrier, every chunk has contributed its statistics, the barrier
action runs once (pruning the module group), and the chunks continue, in order, to the next barrier.
The order of every statistic update is fixed (chunk 0, 1, ...), so results are deterministic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from llmprune.engine.parking import Parking


class _Aborted(Exception):
    """Another chunk failed; this one stops."""


class Lockstep:
    """Round-robin baton over `count` chunk threads with barriers."""

    def __init__(self, count: int, parking: Parking | None = None) -> None:
        self.count = count
        self.parking = parking or Parking("memory")
        self.turn = 0
        self.failure: BaseException | None = None
        self._cond = threading.Condition()
        self._local = threading.local()

    @property
    def chunk(self) -> int:
        """Index of the chunk whose thread is calling."""
        return self._local.index

    def _wait_turn(self, index: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.turn == index or self.failure is not None)
            if self.failure is not None:
                raise _Aborted

    def _pass_turn(self, index: int) -> None:
        with self._cond:
            self.turn = (index + 1) % self.count
            self._cond.notify_all()

    def barrier(self, on_last: Callable[[], None], park: list[torch.Tensor] = ()) -> None:
        """Pause this chunk until every chunk has arrived; the last one to arrive runs `on_last`.

        The tensors in `park` (big state this chunk holds) are parked while it waits.
        """
        index = self.chunk
        if index == self.count - 1:
            on_last()
        parked = [self.parking.park(t) for t in park] if self.count > 1 else []
        self._pass_turn(index)
        self._wait_turn(index)
        for item in parked:
            self.parking.unpark(item)

    def run(self, work: Callable[[int], Any]) -> list[Any]:
        """Call work(i) for every chunk i in lockstep threads; returns the results in chunk order."""
        results: list[Any] = [None] * self.count

        def body(index: int) -> None:
            self._local.index = index
            try:
                self._wait_turn(index)
                results[index] = work(index)
                self._pass_turn(index)
            except _Aborted:
                pass
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                with self._cond:
                    if self.failure is None:
                        self.failure = exc
                    self._cond.notify_all()

        if self.count == 1:
            self._local.index = 0
            return [work(0)]
        threads = [threading.Thread(target=body, args=(i,), name=f"llmprune-chunk-{i}") for i in range(self.count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.failure is not None:
            raise self.failure
        return results
