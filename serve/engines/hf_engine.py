"""The transformers engine: simple static batching on one worker thread, with a KV cache.

Waiting generation requests are taken together (up to --max-batch), left-padded, and decoded step by step
until every row is done; requests that arrive meanwhile wait for the next batch. Scoring runs on the same
thread, one window per forward, so the model is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from llmprune_serve.engines.base import Delta, Engine, EngineSettings, Sampling


@dataclass
class _Generation:
    prompt: list[int]
    sampling: Sampling
    out: asyncio.Queue
    cancelled: bool = False


@dataclass
class _Scoring:
    windows: list[list[int]]
    future: asyncio.Future
    cancelled: bool = False
    top: int | None = None  # set: per-token logprobs of windows[0] with this many alternatives, not the NLL


class IncrementalDecoder:
    """Token-by-token detokenization that never splits a multi-byte character (prefix-offset method)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int, final: bool = False) -> str:
        """Add `token`; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (a partial character at the end)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One next token from a row of logits: greedy at temperature 0, else temperature and top-p sampling."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _token_logprobs(logprobs: torch.Tensor, token: int, top: int) -> tuple[float, dict[int, float]]:
    """`token`'s logprob in a row of logprobs, and the `top` most likely tokens' (with `token`'s, as vLLM gives)."""
    values, ids = torch.topk(logprobs, top) if top > 0 else (logprobs[:0], logprobs[:0].long())
    alternatives = {int(i): float(v) for i, v in zip(ids, values)}
    return float(logprobs[token]), {**alternatives, token: float(logprobs[token])}


class TransformersEngine(Engine):
    """Hugging Face transformers on CPU (float32, as llmprune evaluates) or CUDA (the checkpoint's dtype)."""

    name = "transformers"

    def __init__(self, settings: EngineSettings, tokenizer) -> None:
        super().__init__(settings)
        self.tokenizer = tokenizer
        self.model = None
        self._jobs: deque = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dtype = "unknown"

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._work, name="llmprune-transformers-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, GenerationConfig

        from llmprune.engine.devices import compute_dtype, parse_dtype, resolve_device
        from llmprune.models import remote_code
        from llmprune.models.skeleton import build_skeleton

        device = resolve_device(self.settings.device)
        weights = build_skeleton(self.settings.folder).dtype
        dtype = parse_dtype(self.settings.dtype) or compute_dtype(device, weights)
        trust = remote_code.allowed(self.settings.folder)
        model = AutoModelForCausalLM.from_pretrained(self.settings.folder, dtype=dtype, trust_remote_code=trust)
        self.model = model.to(device).eval()
        self.device = device
        self._dtype = str(dtype).removeprefix("torch.")
        self._positions = "position_ids" in inspect.signature(model.forward).parameters
        try:
            eos = GenerationConfig.from_pretrained(self.settings.folder).eos_token_id
        except OSError:
            eos = None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(eos_ids) if eos_ids else 0)

    async def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Delta]:
        job = _Generation(prompt, sampling, asyncio.Queue())
        self._submit(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"generation failed: {item}") from item
                yield item
                if item.finish_reason:
                    return
        finally:
            job.cancelled = True

    async def score(self, windows: list[list[int]]) -> tuple[float, int]:
        assert self._loop is not None
        job = _Scoring(windows, self._loop.create_future())
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True

    async def prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float, dict[int, float]] | None]:
        assert self._loop is not None
        job = _Scoring([prompt], self._loop.create_future(), top=top)
        self._submit(job)
        try:
            return await job.future
        finally:
            job.cancelled = True

    async def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.model = None

    def _submit(self, job: _Generation | _Scoring) -> None:
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()

    def _next_jobs(self) -> list | None:
        """The next scoring job alone, or up to max_batch generation jobs that were waiting together."""
        with self._wake:
            while not self._jobs and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            first = self._jobs.popleft()
            batch = [first]
            if isinstance(first, _Generation):
                while self._jobs and isinstance(self._jobs[0], _Generation) and len(batch) < self.settings.max_batch:
                    batch.append(self._jobs.popleft())
            return [job for job in batch if not job.cancelled]

    def _work(self) -> None:
        while (jobs := self._next_jobs()) is not None:
            if not jobs:
                continue
            try:
                with torch.inference_mode():
                    if isinstance(jobs[0], _Scoring):
                        job = jobs[0]
                        top = job.top
                        result = self._score(job.windows) if top is None else self._logprobs(job.windows[0], top)
                        self._resolve(job.future, result)
                    else:
                        self._generate(jobs)
            except Exception as exc:  # delivered to the waiting requests, the worker keeps serving
                for job in jobs:
                    if isinstance(job, _Scoring):
                        self._resolve(job.future, exc)
                    else:
                        self._emit(job, exc)

    def _resolve(self, future: asyncio.Future, result) -> None:
        def settle() -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _emit(self, job: _Generation, item: Delta | BaseException) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(job.out.put_nowait, item)

    def _score(self, windows: list[list[int]]) -> tuple[float, int]:
        total, count = 0.0, 0
        for window in windows:
            ids = torch.tensor([window], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])
            total -= float(logprobs.double().sum())
            count += len(window) - 1
        return total, count

    def _logprobs(self, prompt: list[int], top: int) -> list[tuple[float, dict[int, float]] | None]:
        ids = torch.tensor([prompt], device=self.device)
        logprobs = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        return [None] + [_token_logprobs(row, token, top) for row, token in zip(logprobs, prompt[1:])]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        extra = {"position_ids": positions} if self._positions else {}
        return self.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **extra)

    def _generate(self, jobs: list[_Generation]) -> None:
        rows, width = len(jobs), max(len(job.prompt) for job in jobs)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - len(job.prompt) :] = torch.tensor(job.prompt)
            mask[row, width - len(job.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generators = [self._generator(job.sampling.seed) for job in jobs]
        decoders = [IncrementalDecoder(self.tokenizer) for _ in jobs]
        produced = [0] * rows
        done = [False] * rows
        out = self._forward(ids, mask, positions, None)
        while True:
            logits = out.logits[:, -1, :]
            next_ids = []
            for row, job in enumerate(jobs):
                if not done[row] and job.cancelled:
                    done[row] = True
                if done[row]:
                    next_ids.append(self.pad_id)
                    continue
                token = sample_token(logits[row], job.sampling, generators[row])
                produced[row] += 1
                finish = (
                    "stop" if token in self.eos_ids else "length" if produced[row] >= job.sampling.max_tokens else None
                )
                text = decoders[row].flush() if token in self.eos_ids else decoders[row].push(token, finish is not None)
                delta = Delta(text, 1, finish, token)
                if job.sampling.logprobs is not None:
                    row_logprobs = torch.log_softmax(logits[row].float(), dim=-1)
                    delta.logprob, delta.top = _token_logprobs(row_logprobs, token, job.sampling.logprobs)
                self._emit(job, delta)
                done[row] = finish is not None
                next_ids.append(token)
            if all(done):
                return
            step = torch.tensor(next_ids, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=self.device)], dim=1)
            positions = positions[:, -1:] + 1
            out = self._forward(step, mask, positions, out.past_key_values)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)
