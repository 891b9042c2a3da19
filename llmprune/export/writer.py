"""Write the output folder safely: everything goes into a hidden `.NAME.partial` sibling, and the
folder is renamed into place only when complete. Each pruned layer is committed as its own
safetensors file (write, fsync, atomic rename); at the end the layer files become the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import INDEX_NAME
from llmprune.models.tensorfile import read_header
from llmprune.report import REPORT_NAME

AUX_SUFFIXES = {".json", ".model", ".txt", ".jinja", ".tiktoken", ".py"}  # .py: a custom model's own code
LEGAL_FILES = ("LICENSE", "LICENCE", "USE_POLICY", "NOTICE")
SKIP_FILES = {"config.json", INDEX_NAME, REPORT_NAME}


def fsync_write(path: Path, data: bytes | str) -> None:
    """Write a small file atomically: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file into a temp name, fsync it, then rename: a reader never sees a half file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing OUTPUT unless --overwrite; refuse a file in its place."""
    if output.exists() and not output.is_dir():
        raise LLMPruneError(f"--output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LLMPruneError(f"--output {output} exists and is not empty; pass --overwrite to replace it")


def partial_folder(output: Path) -> Path:
    """Where a run writing `output` builds it (renamed to `output` when complete)."""
    return Path(output).parent / f".{Path(output).name}.partial"


class OutputFolder:
    """A model folder under construction in `.NAME.partial`, moved to NAME by `commit()`."""

    def __init__(self, output: Path, overwrite: bool) -> None:
        self.output = Path(output).resolve()
        self.overwrite = overwrite
        self.partial = partial_folder(self.output)
        self.work = self.partial / ".work"

    def create(self, fresh: bool = True) -> None:
        check_output(self.output, self.overwrite)
        if fresh and self.partial.exists():
            shutil.rmtree(self.partial)
        self.work.mkdir(parents=True, exist_ok=True)

    def unit_path(self, name: str) -> Path:
        return self.work / f"{name}.safetensors"

    def write_unit(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors_atomic(tensors, self.unit_path(name))

    def has_unit(self, name: str) -> bool:
        return self.unit_path(name).is_file()

    def write_shards(self, units: list[str], max_shard_size: int) -> dict[str, str]:
        """Turn the committed unit files into model-0000x-of-0000y.safetensors plus the index.

        Consecutive units are grouped up to max_shard_size; a group of one is hard-linked (no copy),
        a larger group is concatenated byte by byte (constant memory). The units stay until commit,
        so a run interrupted here simply does this again on resume. Returns the weight map.
        """
        sizes = [self.unit_path(u).stat().st_size for u in units]
        groups: list[list[str]] = []
        current, current_size = [], 0
        for unit, size in zip(units, sizes):
            if current and current_size + size > max_shard_size:
                groups.append(current)
                current, current_size = [], 0
            current.append(unit)
            current_size += size
        if current:
            groups.append(current)
        weight_map: dict[str, str] = {}
        total = 0
        for number, group in enumerate(groups, 1):
            name = "model.safetensors" if len(groups) == 1 else f"model-{number:05d}-of-{len(groups):05d}.safetensors"
            target = self.partial / name
            paths = [self.unit_path(u) for u in group]
            header = concat_safetensors(paths, target) if len(paths) > 1 else _link_unit(paths[0], target)
            for tensor, entry in header.items():
                weight_map[tensor] = name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            fsync_write(self.partial / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return weight_map

    def write_json(self, name: str, data: dict) -> None:
        fsync_write(self.partial / name, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")

    def copy_aux(self, source: Path, config: dict) -> None:
        """config.json (as given, minus loader-breaking metadata), tokenizer/generation files, and the source's
        LICENSE / USE_POLICY / NOTICE files."""
        self.write_json("config.json", config)
        for path in sorted(Path(source).iterdir()):
            legal = path.name.upper().startswith(LEGAL_FILES)  # the source's licence terms travel with its weights
            if path.is_file() and (path.suffix in AUX_SUFFIXES or legal) and path.name not in SKIP_FILES:
                shutil.copyfile(path, self.partial / path.name)

    def commit(self) -> Path:
        """Remove the work folder and move the finished folder into place (replacing an old one)."""
        shutil.rmtree(self.work, ignore_errors=True)
        old = None
        if self.output.exists():
            check_output(self.output, self.overwrite)
            old = self.output.parent / f".{self.output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.output, old)
        os.replace(self.partial, self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


def _link_unit(path: Path, target: Path) -> dict:
    header = dict(read_header(path).raw)
    target.unlink(missing_ok=True)
    try:
        os.link(path, target)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, target)
    header.pop("__metadata__", None)
    return header


def concat_safetensors(paths: list[Path], target: Path) -> dict:
    """Concatenate safetensors files into one, streaming the data (never loading tensors)."""
    merged: dict[str, dict] = {}
    pieces: list[tuple[Path, int, int]] = []  # file, data start, data length
    offset = 0
    for path in paths:
        parsed = read_header(path)
        header = {k: v for k, v in parsed.raw.items() if k != "__metadata__"}
        data_length = max((e["data_offsets"][1] for e in header.values()), default=0)
        for tensor, entry in header.items():
            begin, end = entry["data_offsets"]
            merged[tensor] = {**entry, "data_offsets": [begin + offset, end + offset]}
        pieces.append((path, parsed.data_start, data_length))
        offset += data_length
    body = dict(sorted(merged.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    raw = json.dumps({"__metadata__": {"format": "pt"}, **body}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for path, start, length in pieces:
            with path.open("rb") as source:
                source.seek(start)
                shutil.copyfileobj(_Limited(source, length), out, 16 << 20)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    return body


class _Limited:
    """A read-only view of the next `remaining` bytes of a file object."""

    def __init__(self, handle, remaining: int) -> None:
        self.handle = handle
        self.remaining = remaining

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size < 0 else min(size, self.remaining)
        data = self.handle.read(size)
        self.remaining -= len(data)
        return data
