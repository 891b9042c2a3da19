"""Shards of any size: tensors are read by positioned reads of their byte ranges, never by mapping the file."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmprune.models.checkpoint import Checkpoint

LIMIT = 2 << 30  # the address space each child may use: a normal prune needs less (tested below)
PADDING = 4 << 30  # a shard twice that size


def _pad_shard(shard: Path, extra: int) -> None:
    """Append an `extra`-byte tensor to a safetensors file as a hole (a sparse file: no disk used)."""
    with shard.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        data = handle.read()
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["zz_padding"] = {"dtype": "U8", "shape": [extra], "data_offsets": [end, end + extra]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with shard.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw + data[:end])
    os.truncate(shard, 8 + len(raw) + end + extra)


def _limited(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python `code` in a child whose address space is capped at LIMIT (`ulimit -v`)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))\n"
    return subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True, timeout=600)


def test_a_shard_larger_than_the_address_space_is_read_tensor_by_tensor(tiny_models, tmp_path):
    source = tiny_models("llama", layers=2)
    folder = tmp_path / "padded"
    shutil.copytree(source, folder)
    shard = folder / "model.safetensors"
    _pad_shard(shard, PADDING)
    assert shard.stat().st_size > LIMIT

    # the whole-file mapping of safetensors' own reader cannot open it under the limit
    mapped = _limited("import sys; from safetensors import safe_open; safe_open(sys.argv[1], 'pt')", str(shard))
    assert mapped.returncode != 0 and "Cannot allocate memory" in mapped.stderr

    # llmprune's reader reads every tensor of it, each equal to the original
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))}, str(ids))
    out = tmp_path / "out"
    run = _limited(
        "import sys; from llmprune.cli import main; sys.exit(main(sys.argv[1:]))",
        *[str(folder), "--method", "sparsegpt", "--calibration", str(ids), "--no-eval", "--output", str(out)],
        "--quiet",
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        expected = {k: handle.get_tensor(k) for k in handle.keys()}
    read = Checkpoint(folder).read(sorted(expected))
    assert all(torch.equal(read[k], expected[k]) for k in expected)
    assert (out / "model.safetensors").stat().st_size < (1 << 20)  # the padding is no tensor of the model


def test_reading_some_rows_of_a_large_table_backs_only_their_pages(tmp_path):
    """The embedding lookup of a CPU forward reads only the calibration ids' rows: the rest of the table is
    never written, so its pages are never resident."""
    from llmprune.engine.devices import current_rss, return_freed_memory

    return_freed_memory()  # as every run does: a large buffer is its own mapping
    table = torch.randn(40000, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"embed.weight": table}, str(tmp_path / "model.safetensors"))
    rows = torch.tensor([0, 1, 2, 7, 500, 501, 39999])
    checkpoint = Checkpoint(tmp_path)
    checkpoint.read_rows("embed.weight", rows[:2], torch.float32)  # the code paths' own pages, paged in once
    before = current_rss()
    out = checkpoint.read_rows("embed.weight", rows, torch.float32)
    grown = current_rss() - before
    assert out.shape == (40000, 256) and out.dtype == torch.float32
    assert torch.equal(out[rows], table[rows].float())
    assert grown < 2**20 < out.numel() * 4 // 32  # a few pages, not the 39 MiB table
