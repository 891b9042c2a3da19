"""The integer grid one weight matrix is quantized onto: its scales, fit as a solve reaches each group of
columns, and the rounding of a column onto it (the GPTQ paper's quantizer, symmetric)."""

from __future__ import annotations

import torch

from llmprune.scheme import QuantScheme


class Grid:
    """Scales of a [rows, cols] weight under `scheme`: one per row, or per row and group of `group_size` columns.

    Each scale is rounded to `scale_dtype` (the dtype the checkpoint stores it in) as soon as it is fit, so the
    values a solve settles on are exactly the ones the checkpoint encodes. A group whose weights are all zero
    gets scale 1 (its codes are 0 whatever the scale)."""

    def __init__(self, scheme: QuantScheme, rows: int, cols: int, scale_dtype: torch.dtype, device: torch.device):
        self.scheme = scheme
        self.group = scheme.group_size or cols
        self.scale_dtype = scale_dtype
        self.scale = torch.ones(rows, -(-cols // self.group), dtype=torch.float32, device=device)

    def fit(self, weight: torch.Tensor, start: int) -> None:
        """Set the scales of the groups that columns start .. start + weight.shape[1] cover, from those columns'
        current values (start is a group boundary)."""
        for offset in range(0, weight.shape[1], self.group):
            absmax = weight[:, offset : offset + self.group].abs().amax(dim=1)
            scale = (absmax / self.scheme.half_range).to(self.scale_dtype).float()
            self.scale[:, (start + offset) // self.group] = torch.where(scale > 0, scale, torch.ones_like(scale))

    def round(self, column: torch.Tensor, index: int) -> torch.Tensor:
        """Column `index` of the weight rounded onto the grid (a zero stays exactly zero)."""
        scale = self.scale[:, index // self.group]
        return torch.clamp(torch.round(column / scale), self.scheme.qmin, self.scheme.qmax) * scale

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The whole weight rounded onto the grid (round to nearest, no error feedback)."""
        scale = self.scale.repeat_interleave(self.group, dim=1)[:, : weight.shape[1]]
        return torch.clamp(torch.round(weight / scale), self.scheme.qmin, self.scheme.qmax) * scale
