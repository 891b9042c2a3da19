"""Which device each of the service's workers runs on: one worker per device by default, each given its own
GPU through CUDA_VISIBLE_DEVICES (so a job's `device: auto` is that GPU, and its memory plan sees only it)."""

from __future__ import annotations

from llmprune.errors import LLMPruneError


def parse_devices(spec: str, cuda_count: int) -> list[str]:
    """`auto` (every visible GPU, else the CPU), `cpu`, or GPU indices `0,1,3` checked against `cuda_count`."""
    if spec == "auto":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    if spec == "cpu":
        return ["cpu"]
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise LLMPruneError(f"--devices must be auto, cpu or GPU indices such as 0,1 (got {spec!r})") from None
    if len(set(indices)) != len(indices):
        raise LLMPruneError(f"--devices {spec}: a GPU is named twice (use --workers-per-device for more jobs on one)")
    missing = [i for i in indices if not 0 <= i < cuda_count]
    if missing:
        raise LLMPruneError(f"--devices {spec}: no GPU {missing[0]} (this machine has {cuda_count} CUDA devices)")
    return [f"cuda:{i}" for i in indices]


def worker_env(device: str) -> dict[str, str]:
    """The environment that confines a worker to `device` (the CPU: no GPU visible at all)."""
    return {"CUDA_VISIBLE_DEVICES": device.removeprefix("cuda:") if device.startswith("cuda:") else ""}
