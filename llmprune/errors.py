"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class LLMPruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""
