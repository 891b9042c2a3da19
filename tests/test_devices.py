"""engine/devices.py: the forward and compute dtypes chosen for a device."""

from __future__ import annotations

import pytest
import torch


def test_forward_dtype_choice():
    from llmprune.engine.devices import check_forward_mix, compute_dtype, forward_dtype, parse_forward_dtype
    from llmprune.errors import LLMPruneError

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert forward_dtype(cpu, torch.float32) == torch.float32
    assert forward_dtype(cpu, torch.bfloat16) == torch.float32  # bf16 on a CPU is opt-in (costs quality at 2:4)
    assert forward_dtype(cpu, torch.float16) == torch.float32
    assert forward_dtype(gpu, torch.float16) == torch.float16
    assert forward_dtype(cpu, torch.float32, parse_forward_dtype("bfloat16", cpu)) == torch.bfloat16
    assert parse_forward_dtype("auto", cpu) is None and parse_forward_dtype("float16", gpu) == torch.float16
    # the layers are held at least as wide as the forward: a float32 forward of a bf16 model on a GPU
    # loads float32 layers (autocast cannot widen), a bf16 forward keeps them in the model's dtype
    assert compute_dtype(gpu, torch.bfloat16, torch.float32) == torch.float32
    assert compute_dtype(gpu, torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert compute_dtype(gpu, torch.float32, torch.bfloat16) == torch.float32
    assert compute_dtype(cpu, torch.bfloat16, torch.bfloat16) == torch.float32
    check_forward_mix(torch.float32, torch.bfloat16)
    check_forward_mix(torch.bfloat16, torch.bfloat16)
    with pytest.raises(LLMPruneError, match="mixes half types"):
        check_forward_mix(torch.bfloat16, torch.float16)
