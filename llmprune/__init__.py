"""llmprune: one-shot pruning of Hugging Face causal LMs, streamed one decoder layer at a time."""

from llmprune.version import __version__


def prune(model: str, **options) -> dict:
    """Prune `model` in one shot; options mirror the CLI flags. See llmprune.run.prune."""
    from llmprune.run import prune as _prune

    return _prune(model, **options)


def evaluate(model: str, **options) -> dict:
    """Streamed perplexity of `model`. See llmprune.eval.evaluate.evaluate."""
    from llmprune.eval.evaluate import evaluate as _evaluate

    return _evaluate(model, **options)


def load(folder: str, **kwargs):
    """A transformers model from an output folder, dense or packed 2:4. See llmprune.export.load.load."""
    from llmprune.export.load import load as _load

    return _load(folder, **kwargs)


def push(folder: str, repo_id: str, **options) -> dict:
    """Upload a finished output folder to the Hugging Face Hub. See llmprune.hub.push.push_folder."""
    from llmprune.hub.push import push_folder

    return push_folder(folder, repo_id, **options)


__all__ = ["__version__", "evaluate", "load", "prune", "push"]
