"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class LLMPruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class QualityGateError(LLMPruneError):
    """The quality gate failed or was not evaluated: exit status 3 rather than 2."""

    exit_code = 3
