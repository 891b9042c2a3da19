"""The calibration activations between two decoder layers, held as a list of chunk tensors.

One tensor per chunk of windows (not one big tensor) so that a chunk's input can be dropped as
soon as the layer has consumed it, and replaced by that chunk's output. When memory is short the
chunks live in files instead ("spilled"): a chunk is read when a forward needs it and written as
soon as its output exists, so only the chunks being computed are in memory.

Files come in two sides, A and B: a layer reads one side and writes the other, so a layer's inputs
stay intact on disk until its outputs are complete; that is also what makes a run resumable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.engine.parking import buffer_of


@dataclass(frozen=True)
class DiskChunk:
    """A chunk stored as raw bytes in a file."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self, device: torch.device | str = "cpu") -> torch.Tensor:
        tensor = torch.empty(self.shape, dtype=self.dtype)
        with self.path.open("rb") as handle:
            handle.readinto(buffer_of(tensor))
        return tensor.to(device)


def write_chunk(tensor: torch.Tensor, path: Path) -> DiskChunk:
    """Write a chunk's raw bytes (fsync is done per side by `sync_side`)."""
    tensor = tensor.detach().contiguous().cpu()
    with path.open("wb") as handle:
        handle.write(buffer_of(tensor))
    return DiskChunk(path, tuple(tensor.shape), tensor.dtype)


def sync_side(folder: Path) -> None:
    """fsync every chunk file of one side and the folder itself."""
    for path in sorted(folder.glob("chunk-*.bin")):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Activations:
    """Hidden states of N windows, as chunks ([b, L, D] tensors, or DiskChunks when spilled)."""

    def __init__(self, chunks: list, spill_to: Path | None = None) -> None:
        self.chunks = chunks
        self.spill_to = spill_to  # folder of the side that outputs go to, when spilled

    @property
    def count(self) -> int:
        return sum(int(c.shape[0]) for c in self.chunks)

    @property
    def spilled(self) -> bool:
        return self.spill_to is not None

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(len(self.chunks)):
            yield self.get(index)

    def get(self, index: int) -> torch.Tensor:
        """Chunk `index` as a tensor (read from its file if spilled)."""
        chunk = self.chunks[index]
        return chunk.load() if isinstance(chunk, DiskChunk) else chunk

    def take(self, index: int) -> torch.Tensor:
        """Hand chunk `index` over to the caller (the list no longer holds it in memory)."""
        chunk = self.get(index)
        self.chunks[index] = _Gone(tuple(chunk.shape))
        return chunk

    def put(self, index: int, tensor: torch.Tensor) -> None:
        """Store chunk `index`'s new value (written to the output side at once when spilled)."""
        if self.spill_to is not None:
            self.chunks[index] = write_chunk(tensor, self.spill_to / f"chunk-{index:05d}.bin")
        else:
            self.chunks[index] = tensor

    def windows(self, start: int, stop: int) -> torch.Tensor:
        """Windows [start, stop) as one tensor (for the small per-window tail computations)."""
        parts, offset = [], 0
        for index, chunk in enumerate(self.chunks):
            size = int(chunk.shape[0])
            lo, hi = max(start - offset, 0), min(stop - offset, size)
            if lo < hi:
                parts.append(self.get(index)[lo:hi])
            offset += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def first(self, windows: int = 1) -> torch.Tensor:
        return self.windows(0, windows)

    def to_tensor(self) -> torch.Tensor:
        return torch.cat([self.get(i) for i in range(len(self.chunks))])

    def save_side(self, folder: Path) -> list[DiskChunk]:
        """Write every chunk to `folder` (durably) and return the handles; memory chunks stay in memory."""
        folder.mkdir(parents=True, exist_ok=True)
        handles = []
        for index in range(len(self.chunks)):
            chunk = self.chunks[index]
            target = folder / f"chunk-{index:05d}.bin"
            if isinstance(chunk, DiskChunk) and chunk.path == target:
                handles.append(chunk)
            else:
                handles.append(write_chunk(self.get(index), target))
        sync_side(folder)
        return handles


@dataclass(frozen=True)
class _Gone:
    """Placeholder for a chunk handed to a forward; only its shape remains."""

    shape: tuple[int, ...]
