"""`llmprune.load(DIR)`: a transformers model from an output folder, dense or packed 2:4."""

from __future__ import annotations

from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.export.packed import is_packed, read_state_dict


def load(folder: str | Path, **kwargs):
    """AutoModelForCausalLM for `folder`; a packed folder is unpacked in memory. kwargs go to from_pretrained."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LLMPruneError(f"{folder} is not a model folder (no config.json)")
    kwargs.setdefault("dtype", "auto")
    if not is_packed(folder):
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    config = AutoConfig.from_pretrained(folder)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=read_state_dict(folder), **kwargs)
