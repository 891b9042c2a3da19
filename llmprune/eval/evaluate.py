"""`llmprune eval`: the streamed perplexity of a model or a pruned folder on a dataset."""

from __future__ import annotations

from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, evaluation_windows
from llmprune.engine.devices import default_chunk, resolve_device
from llmprune.eval.perplexity import perplexity
from llmprune.models import remote_code
from llmprune.models.resolve import resolve_model
from llmprune.models.skeleton import build_skeleton
from llmprune.models.text import context_length, load_tokenizer
from llmprune.settings import DEFAULT_EVAL


def evaluate(
    model: str,
    dataset: str = DEFAULT_EVAL,
    seqlen: int = 2048,
    samples: int | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """Streamed perplexity of MODEL (a pruned folder or anything `prune` accepts) on `dataset`;
    `trust_remote_code` allows a model that ships its own code."""
    dev = resolve_device(device)
    folder = resolve_model(model, quiet=quiet)
    with remote_code.consent(trust_remote_code) as grant:
        grant(folder)
        skeleton = build_skeleton(folder)
        limit = context_length(skeleton)
        seqlen = min(seqlen, limit) if limit else seqlen
        source = TokenizedCorpus(resolve_source(dataset, split="test"), load_tokenizer(folder))
        windows = evaluation_windows(source, seqlen, samples, spec=dataset)
        batch = batch_size or default_chunk(windows.count, seqlen, dev)
        result = perplexity(folder, windows, dev, batch, progress=not quiet, label="ppl")
    return {"model": model, "folder": str(folder), "eval": windows.describe(), **result.as_dict()}
