"""Runs the choices of one request on the engine (n per prompt, concurrently) as one stream of events,
cutting each choice at its first stop sequence: the same for every engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

from llmprune_serve.engines.base import Engine, Sampling


@dataclass
class ChoiceEvent:
    """New text of choice `index`; `finish_reason` is set on its last event."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    token: int | None = None  # the generated token, its logprob and alternatives (when logprobs were asked for)
    logprob: float | None = None
    top: dict[int, float] | None = None


class StopScanner:
    """Holds back just enough streamed text to cut it exactly before the first stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; returns (text safe to emit, whether a stop sequence was reached)."""
        self.buffer += text
        hits = [self.buffer.find(s) for s in self.stops if s in self.buffer]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        keep = min(self.hold, len(self.buffer))
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


async def run_choices(
    engine: Engine,
    prompts: list[list[int]],
    n: int,
    sampling: Sampling,
    stops: list[str],
    on_tokens: Callable[[int], None],
) -> AsyncIterator[ChoiceEvent]:
    """Events of all prompts x n choices (choice index = prompt * n + k) as they are generated.

    Closing this iterator early (timeout, client gone) cancels every choice, which aborts it in the engine.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt: list[int], params: Sampling) -> None:
        scanner = StopScanner(stops)
        try:
            async with aclosing(engine.generate(prompt, params)) as deltas:
                async for delta in deltas:
                    on_tokens(delta.tokens)
                    text, stopped = scanner.push(delta.text)
                    finish = "stop" if stopped else delta.finish_reason
                    if finish and not stopped:
                        text += scanner.flush()
                    await queue.put(
                        ChoiceEvent(index, text, delta.tokens, finish, delta.token, delta.logprob, delta.top)
                    )
                    if finish:
                        return
            await queue.put(ChoiceEvent(index, scanner.flush(), 0, "stop"))
        except Exception as exc:
            await queue.put(exc)

    tasks = []
    for p, prompt in enumerate(prompts):
        for k in range(n):
            params = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + k)
            tasks.append(asyncio.create_task(pump(p * n + k, prompt, params)))
    try:
        finished = 0
        while finished < len(tasks):
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            finished += item.finish_reason is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
