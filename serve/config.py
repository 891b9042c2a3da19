"""Everything `llmprune serve` is configured with (mirrors its CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8000
DEFAULT_CONCURRENCY = 16


@dataclass
class ServeConfig:
    """Settings of one service: model, engine, network, limits and the perplexity check."""

    model: str
    folder: Path
    engine: str = "auto"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_model_name: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool = False
    max_batch: int = 8
    api_keys: tuple[str, ...] = ()
    protect_metrics: bool = False
    max_concurrency: int | None = None  # transformers engine (DEFAULT_CONCURRENCY); vLLM batches to --max-num-seqs
    max_queue: int = 64
    request_timeout: float = 120.0
    max_tokens: int = 2048
    check_text: Path | None = None
    check_seqlen: int | None = None
    check_samples: int = 8
    expect_ppl: float | None = None
    ppl_tolerance: float = 0.05
    max_ppl_increase: float | None = None
    skip_ppl_check: bool = False
    log_level: str = "info"

    @property
    def name(self) -> str:
        """The model id clients send and `/v1/models` lists."""
        return self.served_model_name or self.folder.name
