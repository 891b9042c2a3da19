"""Park a waiting chunk's big tensors: move their bytes out (to disk or host memory) and free them.

While every chunk waits at a lockstep barrier, each holds its state at that point of the layer
forward; the largest piece is the input of the module at the barrier (e.g. the down projection's
4x-wide input). Parking copies the tensor's storage out and resizes it to zero; unparking
re-allocates it and copies the bytes back, bit for bit, before the forward goes on. The tensor
object (and any view of it) stays valid because only its storage is emptied and refilled.
"""

from __future__ import annotations

import contextlib
import ctypes
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily

from llmprune.settings import PARK_MODES


class Parked:
    """One parked storage and where its bytes went."""

    def __init__(self, storage: torch.UntypedStorage, nbytes: int, where) -> None:
        self.storage = storage
        self.nbytes = nbytes
        self.where = where


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def buffer_of(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte buffer over a contiguous CPU tensor (numpy export would pin its storage's size)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


class Parking:
    """mode "memory": leave tensors alone; "host": copy to CPU RAM (GPU runs); "disk": to temp files."""

    def __init__(self, mode: str = "memory", folder: Path | None = None, min_bytes: int = 1 << 20) -> None:
        if mode not in PARK_MODES:
            raise ValueError(f"parking mode must be one of {PARK_MODES}")
        self.mode = mode
        self.folder = folder
        self.min_bytes = min_bytes
        self.parked_bytes = 0

    def park(self, tensor: torch.Tensor | torch.UntypedStorage) -> Parked | None:
        """Free a tensor's (or a storage's) bytes after copying them out; None when not worth it or disabled."""
        if self.mode == "memory":
            return None
        storage = tensor if isinstance(tensor, torch.UntypedStorage) else tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes < self.min_bytes:
            return None
        raw = _bytes_of(storage)
        if self.mode == "host":
            where = torch.empty(nbytes, dtype=torch.uint8, pin_memory=raw.is_cuda)
            where.copy_(raw)
        else:
            where = tempfile.TemporaryFile(dir=self.folder)
            where.write(buffer_of(raw.cpu()))
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
                parked.where.readinto(buffer_of(host))
                raw.copy_(host)
            else:
                parked.where.readinto(buffer_of(raw))
            parked.where.close()
        self.parked_bytes -= parked.nbytes


class ChunkTracker(TorchDispatchMode):
    """Records the storages that ops allocate during one chunk's forward (this thread only), so that
    everything the chunk holds can be parked while it waits at a barrier.

    Only fresh storages count: an op output that shares an input's storage (a view, an in-place
    op) is not the chunk's to park, which keeps weights, shared arguments (rotary tables) and the
    statistics out. Code of our own that runs inside the forward (hooks) is `paused()`.
    """

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self._refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        inputs = None
        for tensor in results:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() < self.min_bytes:
                continue
            if inputs is None:
                inputs = {_storage_id(a) for a in _flat_tensors(args, kwargs)}
            if _storage_id(tensor) not in inputs:
                self._refs.append(weakref.ref(tensor))
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave this tracker (the innermost mode) while our own code runs: its ops are not recorded
        and skip the Python dispatch (SparseGPT's solves, many small ops, took a third longer through it)."""
        if _get_current_dispatch_mode() is not self:
            raise RuntimeError("ChunkTracker.paused() outside its own forward")
        with _pop_mode_temporarily():
            yield

    def alive(self) -> list[torch.UntypedStorage]:
        """Distinct storages still referenced by the chunk (each parked once, views included)."""
        seen, storages, live = set(), [], []
        for ref in self._refs:
            tensor = ref()
            if tensor is None:
                continue
            live.append(ref)
            key = _storage_id(tensor)
            if key not in seen and tensor.untyped_storage().nbytes() >= self.min_bytes:
                seen.add(key)
                storages.append(tensor.untyped_storage())
        self._refs = live
        return storages


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _flat_tensors(args, kwargs) -> Iterator[torch.Tensor]:
    stack = [args, kwargs or {}]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
