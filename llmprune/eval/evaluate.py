"""`llmprune eval`: the streamed perplexity of a model or a pruned folder on a dataset."""

from __future__ import annotations

from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, evaluation_windows
from llmprune.engine.devices import default_chunk, resolve_device
from llmprune.engine.ranks import device_for, joined
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
    `trust_remote_code` allows a model that ships its own code. Under torchrun the windows are split across the
    ranks and every rank returns the same result (with `rank` and `world_size`)."""
    dev = resolve_device(device)
    with joined(dev) as ranks, remote_code.consent(trust_remote_code) as grant:
        dev = device_for(dev, ranks)
        folder = ranks.rank0_first(lambda: resolve_model(model, quiet=quiet or not ranks.main))
        grant(folder)
        skeleton = build_skeleton(folder)
        limit = context_length(skeleton)
        seqlen = min(seqlen, limit) if limit else seqlen
        source = TokenizedCorpus(resolve_source(dataset, split="test"), load_tokenizer(folder))
        windows = evaluation_windows(source, seqlen, samples, spec=dataset)
        batch = batch_size or default_chunk(windows.count, seqlen, dev)
        if windows.count >= ranks.world:  # whole chunks for every rank (with fewer windows, some ranks idle)
            batch = ranks.chunk_for(windows.count, batch)
        result = perplexity(folder, windows, dev, batch, progress=not quiet and ranks.main, label="ppl", ranks=ranks)
    launch = {"rank": ranks.rank, "world_size": ranks.world} if ranks.active else {}
    return {"model": model, "folder": str(folder), "eval": windows.describe(), **result.as_dict(), **launch}
