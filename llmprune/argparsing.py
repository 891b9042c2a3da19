"""argparse as every llmprune command uses it: one-line errors and a fraction type. At the bottom of the
import graph, so that the pruning CLI and the serving CLI share it without importing each other."""

from __future__ import annotations

import argparse

from llmprune.errors import LLMPruneError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other llmprune error."""

    def error(self, message: str):  # type: ignore[override]
        raise LLMPruneError(f"{message} (see {self.prog} --help)")


def fraction(text: str) -> float:
    """A float flag value, or argparse's one-line 'not a number' error."""
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
