"""Shared by the benchmark scripts: a one-line description of the machine they ran on."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, core count and Python version (plus the GPU, if torch sees one)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{platform.machine()} {model}, {os.cpu_count()} cores, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text
