"""Consent to run a model folder's own Python code (a config.json with `auto_map`, as for models whose
architecture is not in transformers).

transformers executes such code only with `trust_remote_code=True`. The consent is given per folder, for one run,
by whoever resolved the model (`--trust-remote-code`, `trust_remote_code=True`), and every loader of that
folder (config, skeleton, tokenizer, evaluation, the pruned output) asks `allowed(folder)`, so the flag
does not have to be threaded through each of them; it ends with the run. A folder with custom code and no
consent is refused in one line before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmprune.errors import LLMPruneError

_trusted: set[Path] = set()


@contextmanager
def consent(enabled: bool) -> Iterator[Callable[..., None]]:
    """Within the block, `grant(*folders)` allows those folders' own code (a no-op unless `enabled`); the
    consent is withdrawn when the block ends, so it never outlives the run that was given it."""
    granted: list[Path] = []

    def grant(*folders: Path) -> None:
        for folder in folders if enabled else ():
            path = Path(folder).resolve()
            if path not in _trusted:
                _trusted.add(path)
                granted.append(path)

    try:
        yield grant
    finally:
        _trusted.difference_update(granted)


def has_custom_code(folder: Path) -> bool:
    """Whether the folder's config.json points transformers at code shipped in the folder (auto_map)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("auto_map"))


def allowed(folder: Path) -> bool:
    """The `trust_remote_code` value for loading `folder`: True only with consent; custom code without
    consent is an error, so transformers never gets to ask interactively."""
    folder = Path(folder)
    if folder.resolve() in _trusted:
        return True
    if has_custom_code(folder):
        raise LLMPruneError(
            f"{folder} ships its own model code (auto_map in config.json); pass --trust-remote-code "
            "(trust_remote_code=True) if you trust it"
        )
    return False
