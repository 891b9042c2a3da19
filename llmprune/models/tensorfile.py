"""Read safetensors files through their header: each tensor by positioned reads of its byte range.

safetensors' own `safe_open` maps the whole file privately, which fails for a shard larger than the
address space the process may use ("unable to mmap ... Cannot allocate memory"; transformers 5 saves
50 GB shards by default). Here a file is never mapped: the header (8-byte little-endian length, then
JSON) is parsed and checked against the file size, and a tensor is read with `os.preadv` straight into
its own buffer, so reading costs that tensor's bytes and nothing else, whatever the shard's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.errors import LLMPruneError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size
READ_BYTES = 256 * 2**20  # one positioned read at most (a partial read goes on where it stopped)


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype, shape and byte range from the start of the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


@dataclass(frozen=True)
class Header:
    """A parsed, checked safetensors header."""

    path: Path
    data_start: int  # 8 + header length
    entries: dict[str, Entry]
    raw: dict  # the header as written (with __metadata__), for tools that rewrite files


def read_header(path: Path) -> Header:
    """Parse and check `path`'s header: every tensor's range lies inside the file and matches its shape."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"{size} bytes is too short for a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER or 8 + length > size:
                raise _corrupt(path, f"header length {length} does not fit the file's {size} bytes")
            raw = json.loads(handle.read(length))
    except OSError as exc:
        raise LLMPruneError(f"cannot read shard {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"its header is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_start = 8 + length
    entries: dict[str, Entry] = {}
    for name, spec in raw.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"tensor {name!r} has a malformed entry ({exc})") from exc
        count = 1
        for dim in shape:
            count *= dim
        if end - begin != count * dtype.itemsize or begin < 0:
            raise _corrupt(path, f"tensor {name!r}: bytes {begin}-{end} do not hold a {list(shape)} {spec['dtype']}")
        if data_start + end > size:
            raise _corrupt(path, f"truncated: tensor {name!r} ends at byte {data_start + end}, the file at {size}")
        entries[name] = Entry(dtype, shape, data_start + begin, data_start + end)
    return Header(path, data_start, entries, raw)


def _corrupt(path: Path, reason: str) -> LLMPruneError:
    return LLMPruneError(f"corrupt shard {path.name} in {path.parent}: {reason}")


def _pread(fd: int, header: Header, name: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    """A fresh CPU tensor of `name`'s dtype and `shape`, filled by positioned reads from byte `offset`."""
    tensor = torch.empty(shape, dtype=header.entries[name].dtype)
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + READ_BYTES]], offset + done)
        if got <= 0:
            raise _corrupt(header.path, f"truncated while reading {name!r} (byte {offset + done})")
        done += got
    return tensor


@contextlib.contextmanager
def _opened(header: Header) -> Iterator[int]:
    """A read-only descriptor of the header's file; an OS error opening or reading it is one clear line."""
    try:
        fd = os.open(header.path, os.O_RDONLY)
    except OSError as exc:
        raise LLMPruneError(f"cannot read shard {header.path}: {exc.strerror or exc}") from exc
    try:
        yield fd
    except OSError as exc:
        raise LLMPruneError(f"cannot read shard {header.path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def read_tensors(header: Header, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one file, each read into a fresh CPU tensor by positioned reads."""
    out: dict[str, torch.Tensor] = {}
    with _opened(header) as fd:
        for name in names:
            entry = header.entries[name]
            out[name] = _pread(fd, header, name, entry.shape, entry.start)
    return out


def read_rows_into(header: Header, name: str, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Read only rows `rows` (sorted, unique) of 2-D tensor `name` into the same rows of `out` (cast to its
    dtype), one positioned read per run of consecutive rows. The other rows of `out` are not touched: an
    `out` fresh from torch.empty keeps their pages unbacked, so a large table costs only the rows read."""
    entry = header.entries[name]
    row_bytes = (entry.stop - entry.start) // max(1, entry.shape[0])
    runs = torch.nonzero(torch.diff(rows) != 1).flatten() + 1
    bounds = [0, *runs.tolist(), len(rows)]
    with _opened(header) as fd:
        for first, last in zip(bounds[:-1], bounds[1:]):
            if first == last:
                continue
            r0, r1 = int(rows[first]), int(rows[last - 1]) + 1
            out[r0:r1].copy_(_pread(fd, header, name, (r1 - r0, *entry.shape[1:]), entry.start + r0 * row_bytes))
