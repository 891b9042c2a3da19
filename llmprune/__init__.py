"""llmprune: one-shot pruning of Hugging Face causal LMs, streamed one decoder layer at a time."""

__version__ = "0.1.0"


def prune(model: str, **options) -> dict:
    """Prune `model` in one shot; options mirror the CLI flags. See llmprune.pipeline.prune."""
    from llmprune.pipeline import prune as _prune

    return _prune(model, **options)


def evaluate(model: str, **options) -> dict:
    """Streamed perplexity of `model`. See llmprune.pipeline.evaluate."""
    from llmprune.pipeline import evaluate as _evaluate

    return _evaluate(model, **options)


__all__ = ["__version__", "evaluate", "prune"]
