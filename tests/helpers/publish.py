"""What the publishing tests share: the prune command line of the trained tiny Llama, the fake Hub's token,
byte-level comparisons of folders and tensors."""

from __future__ import annotations

from pathlib import Path

import torch

BASE_MODEL = "llmprune-tests/tiny-llama"
TOKEN = "hf_test_write_token"


def prune_args(model: Path, corpus: Path, out: Path, *extra) -> list[str]:
    """`llmprune MODEL` arguments of a small Wanda 2:4 run with evaluation, as strings."""
    common = ["--calibration", corpus, "--samples", 4, "--seqlen", 32, "--eval-samples", 4, "--quiet"]
    return [str(a) for a in [model, "--method", "wanda", "--pattern", "2:4", *common, "--output", out, *extra]]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))
    )


def files(folder: Path) -> dict[str, bytes]:
    """The bytes of each file directly in `folder`, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
