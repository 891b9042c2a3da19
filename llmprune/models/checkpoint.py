"""Read individual tensors from a folder of safetensors shards without loading the rest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmprune.errors import LLMPruneError

INDEX_NAME = "model.safetensors.index.json"


class Checkpoint:
    """The tensor-name -> shard-file map of a safetensors folder, with per-tensor reads."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
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
            for shard in sorted(set(self.files.values())):  # headers are small: catch a corrupt shard up front
                present = set(self._keys_of(shard))
                absent = [n for n, f in self.files.items() if f == shard and n not in present]
                if absent:
                    raise LLMPruneError(f"corrupt shard {shard.name}: it lacks {absent[0]} listed in {index.name}")
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise LLMPruneError(f"no safetensors files in {self.folder}")
            for shard in shards:
                for name in self._keys_of(shard):
                    self.files[name] = shard

    @staticmethod
    def _keys_of(shard: Path) -> list[str]:
        try:
            with safe_open(str(shard), framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise LLMPruneError(f"corrupt shard {shard.name}: {exc}") from exc

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self) -> list[str]:
        return list(self.files)

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by shard, each file opened once)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise LLMPruneError(f"checkpoint {self.folder} has no tensor {name!r}")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as handle:
                    for name in file_names:
                        out[name] = handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise LLMPruneError(f"corrupt shard {file.name}: {exc}") from exc
        return out

    def metadata(self, name: str) -> tuple[torch.dtype, list[int]]:
        """Dtype and shape of one tensor, read from the shard header only."""
        with safe_open(str(self.files[name]), framework="pt") as handle:
            piece = handle.get_slice(name)
            return _DTYPES[piece.get_dtype()], list(piece.get_shape())


_DTYPES = {
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
