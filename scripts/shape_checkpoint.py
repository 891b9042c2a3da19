"""Write a checkpoint of a real model's shapes without its weights: config.json, shard headers of the
real names, dtypes and shapes, and sparse files (holes where the data would be), so `--plan-only`
can plan OPT-175B or Llama-3.1-405B on a laptop. A 350 GB checkpoint takes a few MB of disk.

    python scripts/shape_checkpoint.py opt-175b /tmp/shapes/opt-175b
    llmprune /tmp/shapes/opt-175b --calibration /tmp/shapes/opt-175b/calibration.safetensors \\
        --no-eval --plan-only --device cuda --max-memory cuda=80GB

The folder also gets a token file of random ids (`calibration.safetensors`, 128 windows of 2048 by
default), so no tokenizer is needed. Only plans can run on such a folder: its weights read as zeros.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path

import torch

LLAMA_3_1 = dict(  # what Llama 3.1's sizes share
    model_type="llama", num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
    rope_theta=500000.0, dtype="bfloat16",
)  # fmt: skip
SHAPES = {  # config fields: `model_type`, `dtype` (the checkpoint's) and the config's own keyword arguments
    "opt-175b": dict(
        model_type="opt", hidden_size=12288, ffn_dim=49152, num_hidden_layers=96, num_attention_heads=96,
        word_embed_proj_dim=12288, vocab_size=50272, max_position_embeddings=2048, dtype="float16",
    ),
    "llama-3.1-70b": dict(
        LLAMA_3_1, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
    "llama-3.1-405b": dict(
        LLAMA_3_1, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128
    ),
    "llama-1.8b": dict(  # the random-weight model of scripts/bench_memory.py
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True,
        dtype="bfloat16",
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
        dtype="bfloat16",
    ),
}  # fmt: skip
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes, from the model built on the meta device (a tied head is
    not a tensor of its own, and fused MoE experts are one tensor per expert and projection in the Qwen/OLMoE
    naming, as `save_pretrained` writes them)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings(), init_empty_weights():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        base, _, leaf = name.rpartition(".")
        if p.dim() == 3 and leaf in ("gate_up_proj", "down_proj"):  # fused experts: one tensor per expert
            parts = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
            rows = p.shape[1] // len(parts)
            shapes.update(
                {f"{base}.{e}.{part}.weight": (rows, p.shape[2]) for e in range(p.shape[0]) for part in parts}
            )
        else:
            shapes[name] = tuple(p.shape)
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def write_sparse_shard(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """A safetensors file whose header lists `shapes` and whose data is a hole of the right length."""
    offset, header = 0, {"__metadata__": {"format": "pt"}}
    for name, shape in shapes.items():
        size = dtype.itemsize * math.prod(shape)
        entry = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        header[name] = entry
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return offset


def model_config(fields: dict):
    """The transformers config of a SHAPES entry (or fields in its form); its `dtype` a torch dtype."""
    from transformers import AutoConfig

    fields = dict(fields)
    dtype = getattr(torch, fields.pop("dtype"))
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.dtype = dtype
    return config


def plan_shards(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shard_bytes: int | None = None
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The tensors in shards, in their order, by file name (model-00001-of-0000N.safetensors): shards of at
    most `shard_bytes` (a larger tensor alone), or with None one shard per decoder layer (the tensors outside
    the layers in shards of their own, before and after them)."""
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used, layer = 0, None
    for name, shape in shapes.items():
        size = dtype.itemsize * math.prod(shape)
        found = re.search(r"\.layers\.(\d+)\.", name)
        key = found[1] if found else None
        if shards[-1] and (used + size > shard_bytes if shard_bytes is not None else key != layer):
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used, layer = used + size, key
    return {f"model-{n:05d}-of-{len(shards):05d}.safetensors": shard for n, shard in enumerate(shards, 1)}


def write_index(folder: Path, weight_map: dict[str, str], total: int) -> None:
    """model.safetensors.index.json: which shard holds each tensor, and the data's total size."""
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_shape_checkpoint(
    folder: Path, config_fields: dict, shard_bytes: int = 5 * 10**9, windows: int = 128, seqlen: int = 2048
) -> Path:
    """config.json, sparse shards of at most `shard_bytes` with their index, and a random token file."""
    from safetensors.torch import save_file

    config = model_config(config_fields)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards = plan_shards(tensor_shapes(config), config.dtype, shard_bytes)
    total = sum(write_sparse_shard(folder / file, shard, config.dtype) for file, shard in shards.items())
    write_index(folder, {name: file for file, shard in shards.items() for name in shard}, total)
    vocab = int(config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(folder / "calibration.safetensors"))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GB (default 5)")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    args = parser.parse_args()
    folder = write_shape_checkpoint(
        args.folder, SHAPES[args.shape], int(args.shard_gb * 10**9), args.windows, args.seqlen
    )
    print(folder)


if __name__ == "__main__":
    main()
