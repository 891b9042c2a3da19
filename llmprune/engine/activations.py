"""The calibration activations between two decoder layers, held as a list of chunk tensors.

One tensor per chunk of windows (not one big tensor) so that a chunk's input can be dropped as
soon as the layer has consumed it, and replaced by that chunk's output.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class Activations:
    """Hidden states of N windows, as chunks of `chunk` windows each ([b, L, D] tensors)."""

    def __init__(self, chunks: list[torch.Tensor]) -> None:
        self.chunks = chunks

    @property
    def count(self) -> int:
        return sum(int(c.shape[0]) for c in self.chunks)

    @property
    def chunk_size(self) -> int:
        return int(self.chunks[0].shape[0]) if self.chunks else 0

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def take(self, index: int) -> torch.Tensor:
        """Hand chunk `index` over to the caller (the list no longer references it)."""
        chunk = self.chunks[index]
        self.chunks[index] = torch.empty(0)
        return chunk

    def windows(self, start: int, stop: int) -> torch.Tensor:
        """Windows [start, stop) as one tensor (for the small per-window tail computations)."""
        parts, offset = [], 0
        for chunk in self.chunks:
            size = int(chunk.shape[0])
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:
                parts.append(chunk[lo:hi])
            offset += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def first(self, windows: int = 1) -> torch.Tensor:
        return self.windows(0, windows)

    def to_tensor(self) -> torch.Tensor:
        return torch.cat(self.chunks)
