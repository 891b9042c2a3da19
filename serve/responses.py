"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict | str) -> str:
    """One server-sent event: `data: JSON` (or `data: [DONE]`) and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@dataclass
class Formatter:
    """Builds the bodies of one response: `chat` selects chat.completion over text_completion."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        """A stream chunk: new text of choice `index` (chat: a delta, with the role on the first)."""
        if not self.chat:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        else:
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice], chunk=True)

    def usage_chunk(self, counts: dict) -> dict:
        return {**self._envelope([], chunk=True), "usage": counts}

    def body(
        self, texts: dict[int, str], finishes: dict[int, str], counts: dict, logprobs: dict[int, dict] | None = None
    ) -> dict:
        """The whole (non-streamed) response; `logprobs` by choice index (completions)."""
        choices = []
        for index in sorted(texts):
            if self.chat:
                choice = {"index": index, "message": {"role": "assistant", "content": texts[index]}}
            else:
                choice = {"index": index, "text": texts[index]}
            scores = (logprobs or {}).get(index)
            choices.append({**choice, "logprobs": scores, "finish_reason": finishes.get(index, "stop")})
        return {**self._envelope(choices, chunk=False), "usage": counts}
