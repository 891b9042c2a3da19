"""What a quantization scheme is: integer bits, scale granularity and activation handling. Plain data at the
bottom of the import graph (settings validate the name, methods quantize onto it, the checkpoint writes it).

Every scheme is symmetric (no zero point), with the scale convention of compressed-tensors and GPTQ: a scale is
the group's largest |w| over half the integer range (absmax / 127.5 for 8 bits, / 7.5 for 4 bits), and a
weight's code is round(w / scale) clamped to [-2^(b-1), 2^(b-1) - 1], so zero is always exactly representable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llmprune.errors import LLMPruneError

GROUP_SIZE = 128  # 4-bit weights: one scale per 128 consecutive inputs of a row


@dataclass(frozen=True)
class QuantScheme:
    """Integer weights of `bits`, one scale per output row (group_size None) or per row and group of inputs;
    `dynamic_activations`: inputs quantized to int8 per token at run time (W8A8)."""

    name: str
    bits: int
    group_size: int | None
    dynamic_activations: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def half_range(self) -> float:
        """The divisor of a scale: (qmax - qmin) / 2."""
        return (self.qmax - self.qmin) / 2

    @property
    def format(self) -> str:
        """The compressed-tensors format of its checkpoint: int8 codes as they are when the activations are
        quantized too (the int8 GEMM kernels read them), else codes packed into int32 (the W*A16 kernels)."""
        return "int-quantized" if self.dynamic_activations else "pack-quantized"

    def for_widths(self, widths: set[int]) -> QuantScheme:
        """This scheme with a group size that divides every input width it quantizes: its own, else the largest
        power of two below it that does (one scheme has one group size, and the kernels need whole groups; e.g.
        64 for SmolLM2's 576-wide inputs). Refused below 16."""
        if self.group_size is None:
            return self
        size = self.group_size
        while size >= 16 and any(width % size for width in widths):
            size //= 2
        if size < 16:
            raise LLMPruneError(
                f"--quantize {self.name}: no group size of 16 or more divides every input width ({sorted(widths)})"
            )
        return replace(self, group_size=size)


SCHEMES: dict[str, QuantScheme] = {
    "w8a8": QuantScheme("w8a8", 8, None, True),
    "w4a16": QuantScheme("w4a16", 4, GROUP_SIZE, False),
    "w8a16": QuantScheme("w8a16", 8, None, False),
}


def quant_scheme(name: str | None) -> QuantScheme | None:
    """The scheme named by --quantize (None: no quantization)."""
    if name is None:
        return None
    if name not in SCHEMES:
        raise LLMPruneError(f"--quantize must be one of {', '.join(SCHEMES)} (got {name!r})")
    return SCHEMES[name]
