"""The packed 2:4 checkpoint format: each 2:4-sparse matrix stored as its kept values plus 2-bit positions.

A packed tensor takes (1/2 + 1/16) of its dense 16-bit bytes (0.5625x; 0.53x for float32). Every
other tensor is stored as is. Unpacking restores the dense shards byte for byte: each packed shard
carries the exact header of the dense shard it came from. The layout is specified in docs/publishing.md
("Packed 2:4 format") and versioned in llmprune.json under "packed".
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmprune.errors import LLMPruneError
from llmprune.export.card import refresh_card
from llmprune.export.writer import OutputFolder, fsync_write
from llmprune.models.checkpoint import INDEX_NAME
from llmprune.report import update_report
from llmprune.settings import PACKED_FORMAT

FORMAT = PACKED_FORMAT
FORMAT_VERSION = 1
VALUES_SUFFIX = ".packed_values"
POSITIONS_SUFFIX = ".packed_positions"
PACKED_INDEX_NAME = "packed.safetensors.index.json"
META_FORMAT = "llmprune.format"
META_VERSION = "llmprune.format_version"
META_DENSE_FILE = "llmprune.dense_file"
META_DENSE_HEADER = "llmprune.dense_header"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _lookup_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each 4-bit nonzero mask of a group: its position code (i0 | i1 << 2, 255 if more than 2 nonzeros)
    and its kept slots; for each position code: its kept slots (all False if the code is invalid)."""
    code_of_mask = np.full(16, 255, np.uint8)
    kept_of_mask = np.zeros((16, 4), bool)
    kept_of_code = np.zeros((16, 4), bool)
    for mask in range(16):
        nonzero = [k for k in range(4) if mask >> k & 1]
        if len(nonzero) <= 2:
            zeros = [k for k in range(4) if not mask >> k & 1]
            first, second = sorted(nonzero + zeros[: 2 - len(nonzero)])
            code_of_mask[mask] = first | second << 2
            kept_of_mask[mask, [first, second]] = True
            kept_of_code[first | second << 2, [first, second]] = True
    return code_of_mask, kept_of_mask, kept_of_code


CODE_OF_MASK, KEPT_OF_MASK, KEPT_OF_CODE = _lookup_tables()


def pack_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values [R, C/2], positions uint8 [R, ceil(C/8)]) of a 2:4-sparse matrix, or None if it is not one.

    "Zero" means the bit pattern of +0.0: a -0.0 counts as a value to keep, so unpacking is bit-exact.
    A group with fewer than two such values also keeps its lowest-indexed zeros, to always store two.
    """
    if weight.ndim != 2 or not weight.is_floating_point() or weight.shape[1] % 4 or weight.numel() == 0:
        return None
    rows, cols = weight.shape
    bits = weight.contiguous().view(_INT_VIEW[weight.element_size()]).numpy().reshape(rows, cols // 4, 4)
    masks = np.packbits(bits != 0, axis=-1, bitorder="little")[..., 0]
    codes = CODE_OF_MASK[masks]
    if (codes == 255).any():
        return None
    values = bits[KEPT_OF_MASK[masks]].reshape(rows, cols // 2)
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    positions = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return torch.from_numpy(values).view(weight.dtype), torch.from_numpy(np.ascontiguousarray(positions))


def unpack_tensor(values: torch.Tensor, positions: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """The dense [R, 2 * values.shape[1]] matrix whose 2:4 groups `values`/`positions` describe."""
    rows, half = values.shape
    groups = half // 2
    if half % 2 or positions.dtype != torch.uint8 or tuple(positions.shape) != (rows, (groups + 1) // 2):
        raise LLMPruneError(
            f"corrupt packed tensor {name}: values {list(values.shape)}, positions "
            f"{list(positions.shape)} {positions.dtype}"
        )
    packed = positions.numpy()
    codes = np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(rows, -1)[:, :groups]
    kept = KEPT_OF_CODE[codes]
    if kept.sum() != 2 * codes.size:
        raise LLMPruneError(f"corrupt packed tensor {name}: invalid position codes")
    bits = values.contiguous().view(_INT_VIEW[values.element_size()]).numpy()
    dense = np.zeros((rows, groups, 4), bits.dtype)
    dense[kept] = bits.reshape(-1)
    return torch.from_numpy(dense.reshape(rows, groups * 4)).view(values.dtype)


@dataclass
class PackStats:
    """What packing a folder did: how many tensors were packed, their dense and packed bytes."""

    packed_tensors: int = 0
    other_tensors: int = 0
    dense_bytes: int = 0
    packed_bytes: int = 0
    files: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "packed_tensors": self.packed_tensors,
            "other_tensors": self.other_tensors,
            "dense_bytes_of_packed_tensors": self.dense_bytes,
            "packed_bytes": self.packed_bytes,
            "ratio": round(self.packed_bytes / self.dense_bytes, 6) if self.dense_bytes else None,
            "files": self.files,
        }


def read_raw_header(path: Path) -> bytes:
    """The exact header bytes of a safetensors file (its JSON, with padding)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length)


def packed_name(dense_name: str) -> str:
    """model-00001-of-00002.safetensors -> packed-00001-of-00002.safetensors (stock loaders ignore it)."""
    return "packed" + dense_name[len("model") :] if dense_name.startswith("model") else "packed-" + dense_name


def pack_shard(source: Path, target: Path, stats: PackStats) -> dict[str, str]:
    """Pack one dense safetensors file into `target`; returns the packed tensor names -> target file name."""
    header = read_raw_header(source)
    out: dict[str, torch.Tensor] = {}
    with _open(source) as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            packed = pack_tensor(tensor)
            if packed is None:
                out[name] = tensor
                stats.other_tensors += 1
                continue
            values, positions = packed
            out[name + VALUES_SUFFIX], out[name + POSITIONS_SUFFIX] = values, positions
            stats.packed_tensors += 1
            stats.dense_bytes += tensor.numel() * tensor.element_size()
            stats.packed_bytes += values.numel() * values.element_size() + positions.numel()
    metadata = {
        "format": "pt",
        META_FORMAT: FORMAT,
        META_VERSION: str(FORMAT_VERSION),
        META_DENSE_FILE: source.name,
        META_DENSE_HEADER: header.decode("utf-8"),
    }
    tmp = target.with_name(target.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    stats.files[target.name] = source.name
    return {name: target.name for name in out}


def unpack_shard(source: Path, target_folder: Path) -> str:
    """Write the dense file a packed shard came from, byte for byte, into `target_folder`; returns its name."""
    with _open(source) as handle:
        metadata = handle.metadata() or {}
        if metadata.get(META_FORMAT) != FORMAT:
            raise LLMPruneError(f"{source.name} is not a {FORMAT} shard")
        if int(metadata.get(META_VERSION, "0")) > FORMAT_VERSION:
            raise LLMPruneError(
                f"{source.name} is packed with format version {metadata[META_VERSION]}; "
                f"this llmprune reads up to {FORMAT_VERSION}: upgrade llmprune"
            )
        raw = metadata[META_DENSE_HEADER].encode("utf-8")
        entries = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        keys = set(handle.keys())
        target = target_folder / metadata[META_DENSE_FILE]
        tmp = target.with_name(target.name + ".tmp")
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            offset = 0
            for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = entry["data_offsets"]
                data = _tensor_bytes(_dense_tensor(handle, keys, name))
                if begin != offset or end - begin != len(data):
                    raise LLMPruneError(f"corrupt packed shard {source.name}: {name} does not fit its dense header")
                out.write(data)
                offset = end
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, target)
    return target.name


def _dense_tensor(handle, keys: set[str], name: str) -> torch.Tensor:
    if name in keys:
        return handle.get_tensor(name)
    if name + VALUES_SUFFIX in keys and name + POSITIONS_SUFFIX in keys:
        return unpack_tensor(handle.get_tensor(name + VALUES_SUFFIX), handle.get_tensor(name + POSITIONS_SUFFIX), name)
    raise LLMPruneError(f"packed shard lacks tensor {name}")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise LLMPruneError(f"corrupt shard {path.name}: {exc}") from exc


def is_packed(folder: Path) -> bool:
    """True for a folder written in the packed 2:4 format."""
    return any(Path(folder).glob("packed*.safetensors"))


def dense_shards(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.safetensors") if not p.name.startswith("packed"))


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a packed folder, dense again (in memory)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("packed*.safetensors")):
        with _open(shard) as handle:
            keys = set(handle.keys())
            for name in sorted(keys):
                if not name.endswith(POSITIONS_SUFFIX):
                    base = name.removesuffix(VALUES_SUFFIX)
                    tensors[base] = _dense_tensor(handle, keys, base)
    return tensors


def pack_shards(source: Path, target: Path) -> dict:
    """Pack the dense shards of `source` into `target` (the same folder packs in place) and write the packed
    index; returns the stats (the report's "packed" block)."""
    source, target = Path(source), Path(target)
    shards = dense_shards(source)
    if not shards:
        raise LLMPruneError(f"no dense safetensors shards in {source}")
    stats = PackStats()
    weight_map: dict[str, str] = {}
    for shard in shards:
        weight_map.update(pack_shard(shard, target / packed_name(shard.name), stats))
        if source == target:  # in place (a run's partial folder, discarded on error): free the disk as we go
            shard.unlink()
    if stats.packed_tensors == 0:
        raise LLMPruneError(f"no 2:4-sparse matrix in {source}: prune with --pattern 2:4 before packing")
    index = source / INDEX_NAME
    if index.is_file():
        packed_index = {
            "metadata": {"format": FORMAT, "format_version": FORMAT_VERSION, "dense_index": index.read_text()},
            "weight_map": dict(sorted(weight_map.items())),
        }
        fsync_write(target / PACKED_INDEX_NAME, json.dumps(packed_index, indent=2) + "\n")
        if source == target:
            index.unlink()
    return stats.as_dict()


def unpack_shards(source: Path, target: Path) -> None:
    """Write the dense shards that the packed shards of `source` came from into `target` (or in place)."""
    source, target = Path(source), Path(target)
    shards = sorted(source.glob("packed*.safetensors"))
    if not shards:
        raise LLMPruneError(f"{source} is not a packed folder (no packed*.safetensors)")
    for shard in shards:
        unpack_shard(shard, target)
        if source == target:
            shard.unlink()
    index = source / PACKED_INDEX_NAME
    if index.is_file():
        fsync_write(target / INDEX_NAME, json.loads(index.read_text())["metadata"]["dense_index"])
        if source == target:
            index.unlink()


def convert_folder(source: Path, output: Path, overwrite: bool, pack: bool) -> Path:
    """`llmprune pack`/`unpack`: write the converted copy of `source` into `output` (atomically)."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if not source.is_dir() or not (source / "config.json").is_file():
        raise LLMPruneError(f"{source} is not a model folder (no config.json)")
    if source == output:
        raise LLMPruneError("OUT must differ from DIR (the conversion never overwrites its input)")
    if pack and is_packed(source):
        raise LLMPruneError(f"{source} is already packed")
    if not pack and not is_packed(source):
        raise LLMPruneError(f"{source} is not a packed folder (no packed*.safetensors)")
    folder = OutputFolder(output, overwrite)
    folder.create()
    try:
        shutil.rmtree(folder.work)
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix != ".safetensors" and path.name not in (INDEX_NAME, PACKED_INDEX_NAME):
                shutil.copyfile(path, folder.partial / path.name)
        if pack:
            packed = pack_shards(source, folder.partial)
        else:
            unpack_shards(source, folder.partial)
            packed = None
        before, after = update_report(folder.partial, packed=packed)
        refresh_card(folder.partial, before, after)
        return folder.commit()
    except BaseException:
        folder.discard()
        raise
