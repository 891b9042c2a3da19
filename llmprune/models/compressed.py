"""The compressed-tensors checkpoint format (what vLLM and transformers load natively), written and read through
the compressed-tensors library itself.

Writing: a quantized Linear's weight is stored as its integer codes and scales (`weight` int8 + `weight_scale`
for int-quantized; `weight_packed` int32 + `weight_scale` + `weight_shape` for pack-quantized), and config.json
gets a `quantization_config` naming the scheme, with every Linear that was not quantized (lm_head included) in
its `ignore` list. Never a `sparsity_config`: stock vLLM refuses one, and zeros need no metadata.

Reading: `CompressedCheckpoint` presents such a folder as the dense checkpoint it encodes (each quantized weight
under its dense name, dequantized when read), so the streamed evaluator and the engine read it like any other;
`quantize_inputs` makes the Linears of a W8A8 model quantize their inputs per token as the int8 kernels do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import Checkpoint
from llmprune.scheme import QuantScheme

QUANT_METHOD = "compressed-tensors"
READABLE_FORMATS = ("int-quantized", "pack-quantized", "naive-quantized")
PART_SUFFIXES = ("weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_g_idx")


def compress_weight(weight: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The tensors that stand for a Linear's `weight` (values on the grid of `scale`, [rows, groups]) in the
    checkpoint, by their name under the module: int8 codes as they are (int-quantized), or packed into int32 words,
    32 / bits codes each, the first in the lowest bits, every code offset by 2^(bits-1) (pack-quantized).

    Written here rather than by the library's compressors because importing those costs the pruning process about
    50 MiB (they load triton and sympy), as much as a layer of a small model; a test checks these bytes against the
    library's own encoding, and reading goes through the library."""
    group = weight.shape[1] // scale.shape[1]
    codes = torch.round(weight.float() / scale.float().repeat_interleave(group, dim=1))
    codes = codes.clamp(scheme.qmin, scheme.qmax).to(torch.int8)
    if scheme.format == "int-quantized":
        return {"weight": codes, "weight_scale": scale.contiguous()}
    per_word = 32 // scheme.bits
    rows, cols = codes.shape
    unsigned = torch.nn.functional.pad(codes.to(torch.int32) - scheme.qmin, (0, -cols % per_word))  # zero-padded
    unsigned = unsigned.reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=codes.device) * scheme.bits
    words = (unsigned.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    return {"weight_packed": packed, "weight_scale": scale.contiguous(), "weight_shape": torch.tensor([rows, cols])}


def quantization_config(scheme: QuantScheme, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for a model whose Linears are quantized with `scheme`, but `ignore`: the
    dict compressed-tensors' QuantizationConfig serializes to (a test validates it with the library)."""
    weights = {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": True,
        "group_size": scheme.group_size,
        "strategy": "group" if scheme.group_size else "channel",
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }
    inputs = (
        {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token", "dynamic": True}
        if scheme.dynamic_activations
        else None
    )
    group = {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None}
    return {
        "quant_method": QUANT_METHOD,
        "format": scheme.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def is_compressed(config: dict | None) -> bool:
    """Whether a quantization_config (config.json's) is a compressed-tensors one."""
    return bool(config) and config.get("quant_method") == QUANT_METHOD


class CompressedCheckpoint(Checkpoint):
    """A compressed-tensors checkpoint read as the dense checkpoint it encodes: each quantized Linear's weight is
    listed under its dense name, with the dtype of its scale and its dense shape, and is dequantized by the
    library's compressor when read."""

    def __init__(self, folder: Path, config: dict) -> None:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig

        super().__init__(folder)
        if config.get("sparsity_config"):
            raise LLMPruneError(f"{folder}: sparse compressed-tensors checkpoints are not supported (dense ones are)")
        parsed = QuantizationConfig.model_validate(config)
        groups = list(parsed.config_groups.values())
        fmt = str(getattr(parsed.format, "value", parsed.format))
        if len(groups) != 1 or fmt not in READABLE_FORMATS:
            raise LLMPruneError(
                f"{folder}: llmprune reads compressed-tensors checkpoints with one scheme in formats "
                f"{', '.join(READABLE_FORMATS)} (this one: {len(groups)} schemes, {fmt})"
            )
        self.scheme = groups[0]
        self.compressor = BaseCompressor.get_value_from_registry(fmt)
        stored = super().keys()
        self.modules = sorted(name.removesuffix(".weight_scale") for name in stored if name.endswith(".weight_scale"))
        parts = {f"{module}.{suffix}" for module in self.modules for suffix in PART_SUFFIXES}
        dense = [f"{module}.weight" for module in self.modules]
        self.dense_keys = [k for k in stored if k not in parts and k not in dense] + dense

    def keys(self) -> list[str]:
        return list(self.dense_keys)

    def __contains__(self, name: str) -> bool:
        return name in self.dense_keys

    def _module(self, name: str) -> str | None:
        module = name.removesuffix(".weight")
        return module if name.endswith(".weight") and f"{module}.weight_scale" in self.files else None

    def _parts(self, module: str) -> list[str]:
        return [f"{module}.{s}" for s in ("weight", *PART_SUFFIXES) if f"{module}.{s}" in self.files]

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        plain = [n for n in names if self._module(n) is None]
        out = super().read(plain, device)
        for name in names:
            module = self._module(name)
            if module is not None:
                stored = super().read(self._parts(module), "cpu")
                local = {key.removeprefix(module + "."): tensor for key, tensor in stored.items()}
                out[name] = self.compressor.decompress(local, self.scheme)["weight"].to(device)
        return out

    def metadata(self, name: str) -> tuple[torch.dtype, list[int]]:
        module = self._module(name)
        if module is None:
            return super().metadata(name)
        scale_dtype, _ = super().metadata(f"{module}.weight_scale")
        if f"{module}.weight_shape" in self.files:
            return scale_dtype, [int(v) for v in super().read([f"{module}.weight_shape"])[f"{module}.weight_shape"]]
        return scale_dtype, super().metadata(name)[1]


def open_checkpoint(folder: Path, quantization: dict | None) -> Checkpoint:
    """The folder's checkpoint, read through its compression when config.json names a compressed-tensors one."""
    if quantization is not None and not is_compressed(quantization):
        method = quantization.get("quant_method", "unknown")
        raise LLMPruneError(f"{folder}: {method} quantized checkpoints are not supported (compressed-tensors ones are)")
    return CompressedCheckpoint(folder, quantization) if quantization else Checkpoint(folder)


def half_activations_only(checkpoint: Checkpoint) -> bool:
    """Whether vLLM's kernels for a checkpoint's quantized weights take bfloat16 or float16 activations only: the
    weight-only schemes (W4A16, W8A16) everywhere, and W8A8 too on CPUs whose oneDNN int8 GEMM is AMX's
    (int8_scaled_mm_with_quant refuses float32 there, e.g. on Sapphire Rapids; AMD's AVX-512 path takes float32).
    Every quantized checkpoint is served in bfloat16 from float32, so a folder serves alike on both."""
    return isinstance(checkpoint, CompressedCheckpoint)


def quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded as vLLM's dynamic per-token int8 quantization rounds it (symmetric, scale absmax / 127)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.clamp(torch.round(x.float() / scale), -128, 127) * scale).to(x.dtype)


def quantize_inputs(model: nn.Module, checkpoint: Checkpoint, key_map: dict[str, str]) -> list:
    """For a checkpoint whose scheme quantizes activations per token: make every quantized Linear of `model`
    round its input as the int8 kernels will (a forward pre-hook). Returns the hook handles (none otherwise)."""
    if not isinstance(checkpoint, CompressedCheckpoint) or checkpoint.scheme.input_activations is None:
        return []
    stored = {key_map.get(f"{name}.weight"): module for name, module in model.named_modules()}
    return [
        stored[f"{module}.weight"].register_forward_pre_hook(lambda _, args: (quantize_per_token(args[0]), *args[1:]))
        for module in checkpoint.modules
        if isinstance(stored.get(f"{module}.weight"), nn.Linear)
    ]
