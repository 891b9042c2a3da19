"""Scoring on vLLM's engine client: perplexity from vLLM's own prompt logprobs.

Generation on the vLLM engine is vLLM's own server (`vllm_server.py`); llmprune only scores windows on the
same engine client, for the start-up check and /v1/perplexity, so the numbers are the serving engine's.
"""

from __future__ import annotations

import asyncio
import math
import uuid

from llmprune_serve.engines.base import Scorer


class VLLMScorer(Scorer):
    """Token windows scored by a running vLLM engine client (AsyncLLM)."""

    name = "vllm"

    def __init__(self, client) -> None:
        self.client = client

    @property
    def dtype(self) -> str:
        return str(self.client.model_config.dtype).removeprefix("torch.")

    @property
    def alive(self) -> bool:
        return not self.client.errored

    async def start(self) -> None:
        """Nothing to load: vLLM's server has built the engine client."""

    async def score(self, windows: list[list[int]]) -> tuple[float, int]:
        results = await asyncio.gather(*(self._score_window(window) for window in windows))
        return math.fsum(nll for nll, _ in results), sum(count for _, count in results)

    async def _score_window(self, window: list[int]) -> tuple[float, int]:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        outputs = [o async for o in self.client.generate(tokens_input(window), params, uuid.uuid4().hex)]
        output = outputs[-1]
        assert output.prompt_logprobs is not None
        nll = -math.fsum(
            entry[token].logprob for token, entry in zip(window, output.prompt_logprobs) if entry is not None
        )
        return nll, len(window) - 1

    async def close(self) -> None:
        """Nothing to free: vLLM's server shuts its engine client down."""
