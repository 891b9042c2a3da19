"""The service behind the routes: engine lifecycle, readiness, prompt encoding and request bounds."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from llmprune_serve.check import CheckResult, run_check
from llmprune_serve.config import DEFAULT_CONCURRENCY, ServeConfig
from llmprune_serve.engines.base import Engine, Sampling, Scorer
from llmprune_serve.errors import APIError
from llmprune_serve.generation import ChoiceEvent, run_choices
from llmprune_serve.limits import Limiter, before_deadline
from llmprune_serve.metrics import CHECK_STATES, Metrics
from llmprune_serve.schemas import ChatMessage

log = logging.getLogger("llmprune.serve")
MAX_PERPLEXITY_WINDOWS = 64


def generation_defaults(folder) -> dict[str, float]:
    """temperature and top_p from the model's generation_config.json (vLLM's defaults too); none if it has none."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        return {}
    given = config.to_diff_dict()
    return {key: float(given[key]) for key in ("temperature", "top_p") if given.get(key) is not None}


class Service:
    """One model served by one engine; ready once the engine is up and the perplexity check passed."""

    def __init__(
        self,
        config: ServeConfig,
        engine: Engine | Scorer,
        tokenizer,
        context: int,
        report: dict | None,
        check_mode: str,
    ) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.context = context
        self.report = report
        self.check_mode = check_mode
        self.metrics = Metrics()
        self.limiter = Limiter(config.max_concurrency or DEFAULT_CONCURRENCY, config.max_queue, self._track_slots)
        self.check = CheckResult("pending", "loading the model")
        self.engine_up = False
        self.fatal: BaseException | None = None
        self.created = time.time()
        self.on_fatal: Callable[[], None] = lambda: None
        self.defaults = generation_defaults(config.folder)

    @property
    def ready(self) -> bool:
        return self.engine_up and self.engine.alive and self.check.status in ("passed", "skipped")

    async def start(self) -> None:
        """Load the engine, then run the perplexity check (in the background: /health answers meanwhile)."""
        try:
            await self.engine.start()
        except Exception as exc:
            self.fatal = exc
            self._set_check(CheckResult("failed", f"engine {self.engine.name} failed to start: {exc}"))
            log.exception("engine %s failed to start", self.engine.name)
            self.on_fatal()
            return
        self.engine_up = True
        if self.check_mode == "skip":
            self._set_check(CheckResult("skipped", "perplexity check skipped (--skip-ppl-check)"))
        else:
            self._set_check(CheckResult("pending", "measuring perplexity"))
            self._set_check(
                await run_check(self.config, self.report, self.check_mode, self.engine, self.tokenizer, self.context)
            )
        if self.ready:
            log.info("ready: %s", self.check.reason)
        else:
            log.error("NOT READY: %s", self.check.reason)

    def _set_check(self, result: CheckResult) -> None:
        self.check = result
        self.metrics.check_state.set(CHECK_STATES[result.status])
        if result.perplexity is not None:
            self.metrics.check_ppl.set(result.perplexity)
        if result.reference is not None:
            self.metrics.check_reference.set(result.reference)
        self.metrics.ready.set(1 if self.ready else 0)

    async def stop(self) -> None:
        if self.engine_up:
            await self.engine.close()

    def not_ready_reason(self) -> str:
        return self.check.reason if self.engine.alive or not self.engine_up else f"engine {self.engine.name} died"

    def require_ready(self) -> None:
        if not self.ready:
            raise APIError(503, f"model not ready: {self.not_ready_reason()}", code="not_ready")

    def require_engine(self) -> None:
        if not self.engine_up:
            raise APIError(503, f"engine not started: {self.check.reason}", code="not_ready")

    def require_model(self, name: str | None) -> None:
        if name not in (None, self.config.name, self.config.model):
            raise APIError(404, f"the model {name!r} does not exist (this server has {self.config.name!r})", "model")

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """Token ids of each prompt of a completions request (text, ids, or a list of either)."""
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if all(isinstance(p, int) for p in prompt):
            return [self._checked_ids(prompt)]
        return [self.encode(p) if isinstance(p, str) else self._checked_ids(p) for p in prompt]

    def _checked_ids(self, ids: list[int]) -> list[int]:
        return self.checked_ids(ids, "prompt")

    def checked_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = len(self.tokenizer)
        if any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"{param} token ids must be in [0, {vocab})", param)
        return list(ids)

    def sampling(self, body, max_tokens: int, logprobs: int | None) -> Sampling:
        """The request's sampling, with the model's generation_config.json defaults where it gives none."""
        temperature = body.temperature if body.temperature is not None else self.defaults.get("temperature", 1.0)
        top_p = body.top_p if body.top_p is not None else self.defaults.get("top_p", 1.0)
        return Sampling(max_tokens, temperature, top_p, body.seed, logprobs)

    async def echo_and_logprobs(
        self, body, prompts: list[list[int]], texts: dict[int, str], scored: dict[int, list]
    ) -> dict[int, dict] | None:
        """Completions' `echo` (the prompt put before each choice's text, in place) and `logprobs` (OpenAI's
        object: tokens, token_logprobs, top_logprobs, text_offset; the prompt's tokens first when echoed)."""
        given = [body.prompt] if isinstance(body.prompt, str) or isinstance(body.prompt[0], int) else body.prompt
        n = len(texts) // len(prompts)
        logprobs = {}
        for p, prompt in enumerate(prompts):
            entries: list[tuple[int, float | None, dict | None]] = []
            if body.echo and body.logprobs is not None:
                scores = await self.engine.prompt_logprobs(prompt, body.logprobs)
                entries = [(token, *(score or (None, None))) for token, score in zip(prompt, scores)]
            for index in range(p * n, (p + 1) * n):
                if body.echo:
                    echoed = given[p] if isinstance(given[p], str) else self.tokenizer.decode(prompt)
                    texts[index] = echoed + texts[index]
                if body.logprobs is not None:
                    logprobs[index] = self._logprobs_object(entries + scored[index])
        return logprobs if body.logprobs is not None else None

    def _logprobs_object(self, entries: list[tuple[int, float | None, dict | None]]) -> dict:
        def text(token: int) -> str:
            return self.tokenizer.decode([token])

        offsets, at = [], 0
        for token, _, _ in entries:
            offsets.append(at)
            at += len(text(token))
        return {
            "tokens": [text(token) for token, _, _ in entries],
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [None if top is None else {text(t): v for t, v in top.items()} for _, _, top in entries],
            "text_offset": offsets,
        }

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """Messages rendered with the model's chat template (or plain `role: content` lines without one)."""
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates raise on role orders they do not accept
                raise APIError(400, f"the chat template rejects these messages: {exc}", "messages") from exc
            return self.encode(text, special=False)
        text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
        return self.encode(text)

    def max_tokens(self, requested: int | None, prompts: list[list[int]], param: str = "max_tokens") -> int:
        """The request's max_tokens, checked against --max-tokens and the context left after its prompt."""
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(
                400,
                f"the prompt is {longest} tokens; this model's maximum context length is {self.context} tokens",
                "prompt" if param == "max_tokens" else "messages",
            )
        if requested is None:
            return min(self.config.max_tokens, self.context - longest)
        if requested > self.config.max_tokens:
            raise APIError(400, f"{param} must be at most {self.config.max_tokens} (got {requested})", param)
        if longest + requested > self.context:
            raise APIError(
                400,
                f"this model's maximum context length is {self.context} tokens; you requested {longest + requested} "
                f"({longest} in the prompt, {requested} to generate)",
                param,
            )
        return requested

    def _track_slots(self, active: int, waiting: int) -> None:
        self.metrics.in_flight.set(active)
        self.metrics.queued.set(waiting)

    def choices(
        self, prompts: list[list[int]], n: int, sampling: Sampling, stops: list[str], deadline: float
    ) -> AsyncIterator[ChoiceEvent]:
        """The request's choices as events, cut off with a 504 at `deadline`."""
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        events = run_choices(self.engine, prompts, n, sampling, stops, self.metrics.generated_tokens.inc)
        return before_deadline(events, deadline)

    async def perplexity(self, texts: list[str], seqlen: int | None, deadline: float) -> dict:
        """Perplexity of each text and of all of them, scored by the serving engine.

        Each text is tokenized as llmprune does and cut into consecutive windows of at most `seqlen` tokens
        (default: the context minus one); each window's first token is not predicted, as in `llmprune eval`.
        """
        size = min(seqlen or self.context - 1, self.context - 1)
        per_text = []
        for text in texts:
            ids = self.encode(text)
            windows = [ids[i : i + size] for i in range(0, len(ids), size)]
            per_text.append([w for w in windows if len(w) >= 2])
        count = sum(len(w) for w in per_text)
        if count == 0:
            raise APIError(400, "text must be at least 2 tokens long", "text")
        if count > MAX_PERPLEXITY_WINDOWS:
            raise APIError(400, f"at most {MAX_PERPLEXITY_WINDOWS} windows of {size} tokens per request", "text")
        started = time.perf_counter()
        try:
            scores = await asyncio.wait_for(
                asyncio.gather(*(self.engine.score(w) for w in per_text if w)),
                timeout=max(0.0, deadline - time.monotonic()),
            )
        except asyncio.TimeoutError as exc:
            raise APIError(504, "request timed out (see --request-timeout)", code="timeout") from exc
        results = iter(scores)
        items = []
        for windows in per_text:
            nll, tokens = next(results) if windows else (0.0, 0)
            ppl = math.exp(nll / tokens) if tokens else None
            items.append({"perplexity": ppl, "tokens": tokens, "windows": len(windows)})
        nll = math.fsum(s[0] for s in scores)
        tokens = sum(s[1] for s in scores)
        return {
            "object": "perplexity",
            "model": self.config.name,
            "engine": self.engine.name,
            "dtype": self.engine.dtype,
            "perplexity": math.exp(nll / tokens),
            "nll": nll / tokens,
            "tokens": tokens,
            "windows": count,
            "seqlen": size,
            "texts": items,
            "seconds": round(time.perf_counter() - started, 3),
        }
