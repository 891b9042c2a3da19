"""What a model folder says about text: its tokenizer and its context length (shared by pruning,
evaluation and the serving package)."""

from __future__ import annotations

from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.models.remote_code import allowed
from llmprune.models.skeleton import Skeleton


def load_tokenizer(folder: Path):
    """The folder's tokenizer through transformers' AutoTokenizer, or a one-line error."""
    from transformers import AutoTokenizer

    trust = allowed(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise LLMPruneError(f"cannot load the tokenizer of {folder}: {str(exc).splitlines()[0][:160]}") from exc


def context_length(skeleton: Skeleton) -> int | None:
    """The model's context window in tokens, from the first config key that names one (None if none does)."""
    text = skeleton.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
