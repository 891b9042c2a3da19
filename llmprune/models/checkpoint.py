"""Read individual tensors from a folder of safetensors shards without loading the rest."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmprune.errors import LLMPruneError
from llmprune.models.tensorfile import Header, read_header, read_rows_into, read_tensors

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """The tensor-name -> shard-file map of a safetensors folder, with per-tensor reads.

    Every shard's header is parsed and checked once, up front (headers are small); tensors are then read
    by their byte ranges (models/tensorfile.py), so a shard of any size is read without mapping it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        self.headers: dict[Path, Header] = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise LLMPruneError(f"corrupt shard index {index}: {exc}") from exc
            for name, file in weight_map.items():
                self.files[name] = self.folder / file
            missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
            if missing:
                raise LLMPruneError(f"missing shard {missing[0]} listed in {index}")
            for shard in sorted(set(self.files.values())):
                present = self._header(shard).entries
                absent = [n for n, f in self.files.items() if f == shard and n not in present]
                if absent:
                    raise LLMPruneError(f"corrupt shard {shard.name}: it lacks {absent[0]} listed in {index.name}")
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise LLMPruneError(f"no safetensors files in {self.folder}")
            for shard in shards:
                for name in self._header(shard).entries:
                    self.files[name] = shard

    def _header(self, shard: Path) -> Header:
        if shard not in self.headers:
            self.headers[shard] = read_header(shard)
        return self.headers[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by shard, each file opened once), onto `device`."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise LLMPruneError(f"checkpoint {self.folder} has no tensor {name!r}")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            for name, tensor in read_tensors(self._header(file), file_names).items():
                out[name] = tensor.to(device)
        return out

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of `name`'s full shape in `dtype` in which only rows `rows` (sorted, unique) are read;
        the others are unset and, never touched, take no memory (embedding tables: see read_rows_into)."""
        if name not in self.files:
            raise LLMPruneError(f"checkpoint {self.folder} has no tensor {name!r}")
        header = self._header(self.files[name])
        out = torch.empty(header.entries[name].shape, dtype=dtype)
        read_rows_into(header, name, rows, out)
        return out

    def metadata(self, name: str) -> tuple[torch.dtype, list[int]]:
        """Dtype and shape of one tensor, from the shard header only."""
        entry = self._header(self.files[name]).entries[name]
        return entry.dtype, list(entry.shape)
