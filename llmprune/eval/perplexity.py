"""Perplexity through the same layer streaming as pruning: evaluating a model needs no more
memory than pruning it. Non-overlapping windows; perplexity = exp(mean next-token NLL)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune.data.windows import Windows
from llmprune.engine.activations import Activations
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.stream import LayerStream, open_stream
from llmprune.models.compressed import quantize_inputs
from llmprune.models.skeleton import build_skeleton


@dataclass
class Perplexity:
    """A perplexity with the token count and eval windows it came from."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    seconds: float

    def as_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "tokens": self.tokens,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "seconds": round(self.seconds, 2),
        }


def stream_folder(
    folder: Path, ids: torch.Tensor, device: torch.device, batch_size: int, progress: bool = False, label: str = "eval"
) -> tuple[LayerStream, Activations]:
    """Run all decoder layers of the model in `folder` over `ids`; returns the stream and last hidden states."""
    skeleton = build_skeleton(folder)
    quantize_inputs(skeleton.model, skeleton.checkpoint, skeleton.key_map)  # W8A8: inputs rounded as vLLM rounds them
    stream, hidden = open_stream(skeleton, ids, device, batch_size)
    for index in tqdm(range(skeleton.num_layers), desc=label, unit="layer", disable=not progress, leave=False):
        layer = skeleton.load_layer(index, device, stream.dtype)
        stream.forward(index, layer, hidden)
        skeleton.unload_layer(index)
    return stream, hidden


def perplexity(
    folder: Path,
    windows: Windows,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = False,
    label: str = "eval",
    ranks: Ranks = SINGLE,
) -> Perplexity:
    """Perplexity of the model in `folder` on `windows`, streamed layer by layer; with several ranks, each
    streams its shard of the windows and the summed log-likelihoods are added across ranks."""
    started = time.perf_counter()
    ids = ranks.part(windows.ids, batch_size)
    nll, tokens = 0.0, 0
    if ids.shape[0]:  # more ranks than windows: a rank may have none
        stream, hidden = stream_folder(folder, ids, device, batch_size, progress, label)
        nll, tokens = stream.nll(hidden)
        stream.close()
    nll, count = ranks.sum_numbers(nll, tokens)
    tokens = int(count)
    mean = nll / tokens
    return Perplexity(math.exp(mean), mean, tokens, windows.count, windows.seqlen, time.perf_counter() - started)


def streamed_logits(folder: Path, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of the model in `folder` for `ids`, computed by the streaming engine (for checks)."""
    stream, hidden = stream_folder(folder, ids, torch.device(device), batch_size=ids.shape[0])
    logits = stream.logits(hidden)
    stream.close()
    return logits
