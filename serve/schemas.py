"""Request bodies of the OpenAI-compatible routes, validated by pydantic (failures become 400s).

Static bounds live here; bounds that depend on the server (largest max_tokens, context length) are
checked by the service once the prompt is tokenized.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 8
MAX_PROMPTS = 32
MAX_STOPS = 4
MAX_PERPLEXITY_TEXTS = 64
MAX_LOGPROBS = 5  # as OpenAI's completions API


class Strict(BaseModel):
    """A request body that refuses fields it does not know (a 400 naming the field), never drops them."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """POST /v1/completions: a prompt (text, token ids, or a batch of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if len(value) > MAX_PROMPTS and not isinstance(value[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a token-id prompt must not be empty")
        return value

    @field_validator("best_of", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value not in {"best_of": (None, 1), "suffix": (None, "")}[info.field_name]:
            raise ValueError(f"{info.field_name} is not supported by the transformers engine (vLLM's is)")
        return value

    @model_validator(mode="after")
    def _scored_whole(self):
        """Logprobs and echo come with the whole response, of text not cut by stop sequences."""
        if self.stream and (self.echo or self.logprobs is not None):
            raise ValueError("stream: echo and logprobs are not streamed by the transformers engine (vLLM's are)")
        if self.stop and self.logprobs is not None:
            raise ValueError("stop: logprobs with stop sequences are not supported by the transformers engine")
        return self

    def wants_logprobs(self) -> bool:
        return self.echo or self.logprobs is not None


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value):
        if value:
            raise ValueError("logprobs is not supported by the transformers engine for chat (vLLM's is)")
        return value


class PerplexityRequest(Strict):
    """POST /v1/perplexity: perplexity of text(s) under the serving engine."""

    model: str | None = None
    text: str | list[str]
    seqlen: int | None = Field(default=None, ge=2)

    @field_validator("text")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_PERPLEXITY_TEXTS:
            raise ValueError(f"give 1 to {MAX_PERPLEXITY_TEXTS} texts")
        return value

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class TokenizeRequest(Strict):
    """POST /tokenize: a text's token ids, as vLLM's route gives them."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    """POST /detokenize: the text of token ids."""

    model: str | None = None
    tokens: list[int]
