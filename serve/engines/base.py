"""The interface both serving engines implement: token-level generation and perplexity scoring.

The service tokenizes, applies chat templates, validates and formats; an engine only turns prompt token
ids into generated text deltas and scores token windows, so both engines answer the same API identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings (temperature 0 means greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None  # with each token, its logprob and the `logprobs` most likely tokens'


@dataclass
class Delta:
    """New text and token count of one generation step; `finish_reason` ("stop" or "length") on the last."""

    text: str
    tokens: int
    finish_reason: str | None = None
    token: int | None = None
    logprob: float | None = None  # of `token` under the model (log-softmax of its logits)
    top: dict[int, float] | None = None  # the most likely tokens' logprobs, when asked for


@dataclass(frozen=True)
class EngineSettings:
    """What an engine needs to load a model folder."""

    folder: Path
    dtype: str
    device: str = "auto"
    max_model_len: int = 2048
    max_batch: int = 8
    served_model_name: str | None = None


class Scorer(ABC):
    """A loaded model that scores token windows (the perplexity check and /v1/perplexity)."""

    name: str = "engine"

    @property
    @abstractmethod
    def dtype(self) -> str:
        """The dtype the engine computes in (e.g. float32), known after start()."""

    @property
    def alive(self) -> bool:
        """False once a started engine has died (the service then stops calling itself ready)."""
        return True

    @abstractmethod
    async def start(self) -> None:
        """Load the model (may take a while: the service answers /health meanwhile)."""

    @abstractmethod
    async def score(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed next-token NLL over the windows and the count of predicted tokens (each window's
        first token is not predicted), as in llmprune's streamed perplexity."""

    @abstractmethod
    async def close(self) -> None:
        """Free the model and any engine processes."""


class Engine(Scorer):
    """A scorer that also generates: the transformers engine behind llmprune's own app."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings

    @abstractmethod
    async def prompt_logprobs(self, prompt: list[int], top: int) -> list[tuple[float, dict[int, float]] | None]:
        """Each prompt token's logprob and the `top` most likely tokens' at its position (None for the first)."""

    @abstractmethod
    def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Delta]:
        """Stream the completion of `prompt`; closing the iterator early aborts the generation."""
