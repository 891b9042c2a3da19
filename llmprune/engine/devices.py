"""Device choice, compute dtype, free memory and peak-memory readings."""

from __future__ import annotations

import ctypes
import functools
import resource
import sys

import torch

from llmprune.errors import LLMPruneError
from llmprune.settings import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_device(name: str, absent_ok: bool = False) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error unless `absent_ok`
    (a plan for a device this machine does not have)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise LLMPruneError(f"--device {name}: not a device name ({exc})") from exc
        if not torch.cuda.is_available() and not absent_ok:
            raise LLMPruneError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
        return device
    raise LLMPruneError(f"--device must be auto, cpu or cuda (got {name!r})")


def solver_devices(device: torch.device, spec: str | None = None) -> list[torch.device]:
    """Devices that run the per-module solves: --solver-devices, else every visible GPU for --device cuda."""
    if spec:
        try:
            devices = [torch.device(part.strip()) for part in spec.split(",") if part.strip()]
        except RuntimeError as exc:
            raise LLMPruneError(f"--solver-devices {spec!r}: not a list of device names ({exc})") from exc
        for dev in devices:
            if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
                raise LLMPruneError(f"--solver-devices: {dev} is not a visible GPU")
        return devices
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [device]


CHUNK_TOKENS = {"cpu": 4096, "cuda": 16384}


def default_chunk(windows: int, seqlen: int, device: torch.device) -> int:
    """Windows per forward chunk: about CHUNK_TOKENS tokens (efficient matmuls, small temporaries)."""
    return max(1, min(windows, CHUNK_TOKENS.get(device.type, 4096) // seqlen))


def parse_dtype(name: str | None, flag: str = "--dtype") -> torch.dtype | None:
    """A dtype flag's value as a dtype (None for auto); `flag` names it in the error."""
    if name in (None, "auto"):
        return None
    if name not in DTYPES:
        raise LLMPruneError(f"{flag} must be one of auto, {', '.join(DTYPES)} (got {name!r})")
    return DTYPES[name]


def compute_dtype(device: torch.device, weights: torch.dtype, forward: torch.dtype | None = None) -> torch.dtype:
    """Dtype the layers are loaded and kept in: the model's own on a GPU, float32 on a CPU (exact for
    every half-precision input), and never narrower than the forward (autocast only narrows)."""
    dtype = weights if device.type == "cuda" else torch.float32
    return forward if forward is not None and forward.itemsize > dtype.itemsize else dtype


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo's first `flags` line); empty where that file is not readable."""
    try:
        with open("/proc/cpuinfo") as handle:
            return frozenset(next((line for line in handle if line.startswith("flags")), "").split()[2:])
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): oneDNN's bf16 matmuls then
    run about twice as fast as float32 ones; without it they are emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def parse_forward_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """--forward-dtype as a dtype (None for auto), rejected before any work when it cannot run."""
    dtype = parse_dtype(name, "--forward-dtype")
    if device.type == "cpu" and dtype == torch.float16:
        raise LLMPruneError("--forward-dtype float16 needs a GPU; on a CPU use bfloat16 or float32")
    return dtype


def check_forward_mix(layers: torch.dtype, forward: torch.dtype) -> None:
    """Refuse a forward in the other half type than the layers' (bf16 layers, fp16 forward or back):
    mixing them promotes the residual stream to float32, which the memory plan does not count (measured
    on an H200: 22.2 GiB against a 18.9 GiB plan)."""
    half = (torch.float16, torch.bfloat16)
    if layers in half and forward in half and layers != forward:
        name = str(layers).removeprefix("torch.")
        raise LLMPruneError(
            f"--forward-dtype {str(forward).removeprefix('torch.')} on {name} layers mixes half "
            f"types; use {name} or float32"
        )


def forward_dtype(device: torch.device, model: torch.dtype, requested: torch.dtype | None = None) -> torch.dtype:
    """Dtype of the calibration forward's matmuls and attention (--forward-dtype).

    auto: the layers' own dtype (the model's on a GPU, float32 on a CPU). bfloat16 on a CPU is opt-in:
    measured on SmolLM2-135M, Wanda ran 1.3x faster but lost 6% perplexity at 2:4, SparseGPT 1.1x
    faster (docs/benchmark-log.md). Statistics, solves and saved weights stay in full precision either way.
    """
    return requested if requested is not None else compute_dtype(device, model)


def is_absent(device: torch.device) -> bool:
    """A CUDA device this machine does not have (only a plan can target it)."""
    return device.type == "cuda" and not torch.cuda.is_available()


def available_memory(device: torch.device) -> int:
    """Bytes free for this process on `device` (MemAvailable for the CPU)."""
    if is_absent(device):
        raise LLMPruneError(
            f"{device} is not on this machine: a plan for it needs its budget, e.g. --max-memory {device.type}=80GB"
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _proc_status_bytes(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    return _proc_status_bytes("VmRSS") or peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    VmHWM where /proc has it: unlike getrusage's ru_maxrss, it is not raised by the resident size
    of the parent that forked this process (a big parent, e.g. a notebook, would inflate it).
    """
    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_cuda(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, loaded once (trim_heap runs after every group of solves); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Make glibc give large freed buffers back to the OS at once (activations come and go in
    tens of MB per chunk, from several threads; per-thread malloc arenas would otherwise keep them)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: buffers >= 1 MiB are mmapped and unmapped on free
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def trim_heap() -> None:
    """Give the free pages of the malloc heap back to the OS (glibc malloc_trim). Small tensors and
    Python objects freed between layers fragment the heap; without a trim, RSS crept ~2 MiB per layer."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def warm_up_kernels() -> None:
    """Run each kind of CPU kernel the engine uses once, on tiny tensors, so that the libraries' code
    pages (BLAS, LAPACK, sort, attention), paged in lazily, are resident when the fixed overhead is
    measured: measured here, they add ~17 MiB of RSS at the first layer that the plan would not see."""
    with torch.no_grad():
        a = torch.randn(64, 64)
        h = a @ a.T + torch.eye(64)
        for dtype in (torch.float64, torch.float32):
            factor = torch.linalg.cholesky_ex(h.to(dtype))[0]
            torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
        torch.sort(a, dim=1, stable=True)
        a.reshape(-1).kthvalue(10)
        q = torch.randn(1, 2, 16, 32)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.nn.functional.silu(a.bfloat16()).float().masked_fill(a > 0, 0.0)
