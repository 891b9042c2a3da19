"""Park a waiting chunk's big tensors: move their bytes out (to disk or host memory) and free them.

While every chunk waits at a lockstep barrier, each holds its state at that point of the layer
forward; the largest piece is the input of the module at the barrier (e.g. the down projection's
4x-wide input). Parking copies the tensor's storage out and resizes it to zero; unparking
re-allocates it and copies the bytes back, bit for bit, before the forward goes on. The tensor
object (and any view of it) stays valid because only its storage is emptied and refilled.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import torch

PARK_MODES = ("memory", "host", "disk")


class Parked:
    """One parked storage and where its bytes went."""

    def __init__(self, storage: torch.UntypedStorage, nbytes: int, where) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.where = where


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _buffer(raw: torch.Tensor) -> memoryview:
    """A zero-copy buffer over a CPU byte tensor (numpy export would pin the storage's size)."""
    return memoryview((ctypes.c_ubyte * raw.numel()).from_address(raw.data_ptr())).cast("B")


class Parking:
    """mode "memory": leave tensors alone; "host": copy to CPU RAM (GPU runs); "disk": to temp files."""

    def __init__(self, mode: str = "memory", folder: Path | None = None, min_bytes: int = 1 << 20) -> None:
        if mode not in PARK_MODES:
            raise ValueError(f"parking mode must be one of {PARK_MODES}")
        self.mode = mode
        self.folder = folder
        self.min_bytes = min_bytes
        self.parked_bytes = 0

    def park(self, tensor: torch.Tensor) -> Parked | None:
        """Free `tensor`'s storage after copying its bytes out; None when not worth it or disabled."""
        if self.mode == "memory":
            return None
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes < self.min_bytes:
            return None
        raw = _bytes_of(storage)
        if self.mode == "host":
            where = torch.empty(nbytes, dtype=torch.uint8, pin_memory=raw.is_cuda)
            where.copy_(raw)
        else:
            where = tempfile.TemporaryFile(dir=self.folder)
            where.write(_buffer(raw.cpu()))
            where.flush()
        del raw
        storage.resize_(0)
        self.parked_bytes += nbytes
        return Parked(storage, nbytes, where)

    def unpark(self, parked: Parked | None) -> None:
        """Re-allocate the storage and copy its bytes back."""
        if parked is None:
            return
        parked.storage.resize_(parked.nbytes)
        raw = _bytes_of(parked.storage)
        if self.mode == "host":
            raw.copy_(parked.where)
        else:
            parked.where.seek(0)
            if raw.is_cuda:
                host = torch.empty(parked.nbytes, dtype=torch.uint8)
                parked.where.readinto(_buffer(host))
                raw.copy_(host)
            else:
                parked.where.readinto(_buffer(raw))
            parked.where.close()
        self.parked_bytes -= parked.nbytes
