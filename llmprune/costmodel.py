"""What a decoder's units cost at decode time, measured on the run's device in transformers.

Greedy generation (a batch of prompts, a fixed number of new tokens, as a benchmark of generation speed runs
it) is timed on random-weight models of the run's architecture, built from its config with fewer layers or
narrower layers. The times fit a linear model of one generated token's cost,

    step(layers, kv_groups, neurons) = base + layers * (layer + kv_groups * group + neurons * neuron),

where `base` is what does not scale with depth (embeddings, the head, sampling, the framework) and `layer`
the fixed part of a layer (norms, rotary, the per-module overhead that dominates small models on CPU). The
model predicts the speedup of any depth and width cut; it is measured once per shape, device and software
versions and cached (no weights are read, so a 175B model's layer costs what one of its layers costs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from llmprune.models.gguf import cache_root
from llmprune.structured.arch import Shape, Structure, per_layer_lists, smaller_config

log = logging.getLogger("llmprune")
COST_MODEL_VERSION = 1


@dataclass(frozen=True)
class DecodeShape:
    """A decoder's depth and per-layer widths."""

    layers: int
    kv_groups: int
    neurons: int


@dataclass(frozen=True)
class Architecture:
    """What the random-weight models are built from: the text config, and where its heads and neurons are."""

    text_config: dict
    structure: Structure
    shape: Shape


@dataclass(frozen=True)
class Timing:
    """How generation is timed: prompts in one batch, prompt tokens, new tokens, interleaved rounds."""

    batch: int = 16
    prompt: int = 32
    new_tokens: int = 32
    rounds: int = 3


@dataclass(frozen=True)
class DecodeCosts:
    """Seconds per generated token (all prompts of the batch together) of each part; see the module doc."""

    base: float
    layer: float
    group: float
    neuron: float
    measured: dict  # the shapes timed and their median seconds per token
    timing: dict
    device: str

    def step(self, shape: DecodeShape) -> float:
        """Predicted seconds per generated token of a decoder of this shape."""
        return self.base + shape.layers * (self.layer + shape.kv_groups * self.group + shape.neurons * self.neuron)

    def speedup(self, dense: DecodeShape, small: DecodeShape) -> float:
        """Predicted decode speedup of `small` over `dense`."""
        return self.step(dense) / self.step(small)

    def as_dict(self) -> dict:
        return asdict(self)


def random_model(arch: Architecture, shape: DecodeShape, dtype: torch.dtype, device):
    """A random-weight causal LM of `arch` with this depth and these widths (the configs a depth or width cut
    writes, so the timed model is the one a cut produces)."""
    import transformers

    text, size = arch.text_config, arch.shape.group_size
    config = per_layer_lists(text, int(text["num_hidden_layers"]), list(range(shape.layers)))
    config = smaller_config(config, arch.structure, arch.shape, shape.kv_groups * size, shape.kv_groups, shape.neurons)
    model_type = config.pop("model_type")
    built = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(built, dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model.eval()


def seconds_per_token(model, timing: Timing, vocab: int) -> float:
    """Wall seconds per generated token of greedy generation (prefill included, as a user sees it)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (timing.batch, timing.prompt), generator=generator).to(device)
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=timing.new_tokens,
            min_new_tokens=timing.new_tokens,
            do_sample=False,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / (timing.batch * timing.new_tokens)


def time_shapes(arch: Architecture, shapes: list[DecodeShape], dtype, device, timing: Timing) -> list[float]:
    """Median seconds per token of each shape, the shapes timed in interleaved rounds (a shared machine's
    drift falls on all of them alike); one warm-up generation per model."""
    vocab = int(arch.text_config["vocab_size"])
    models = [random_model(arch, shape, dtype, device) for shape in shapes]
    warm = Timing(timing.batch, timing.prompt, 2, 1)
    for model in models:
        seconds_per_token(model, warm, vocab)
    samples: list[list[float]] = [[] for _ in shapes]
    for _ in range(timing.rounds):
        for i, model in enumerate(models):
            samples[i].append(seconds_per_token(model, timing, vocab))
    return [statistics.median(s) for s in samples]


def fit(dense: DecodeShape, times: dict[DecodeShape, float], low: int, high: int, narrow: int, few: int) -> tuple:
    """(base, layer, group, neuron) from four timed shapes: `low` and `high` full-width layers, `high` layers with
    `narrow` neurons, `high` layers with `few` KV groups. Negative parts (noise) are clipped to zero, the layer's
    total kept."""
    full_low = times[DecodeShape(low, dense.kv_groups, dense.neurons)]
    full_high = times[DecodeShape(high, dense.kv_groups, dense.neurons)]
    per_layer = max((full_high - full_low) / (high - low), 1e-12)
    base = max(full_low - low * per_layer, 0.0)
    narrowed = times[DecodeShape(high, dense.kv_groups, narrow)]
    neuron = max((full_high - narrowed) / (high * (dense.neurons - narrow)), 0.0)
    group = 0.0
    if few < dense.kv_groups:
        fewer = times[DecodeShape(high, few, dense.neurons)]
        group = max((full_high - fewer) / (high * (dense.kv_groups - few)), 0.0)
    width = group * dense.kv_groups + neuron * dense.neurons
    if width > per_layer:  # noise made the widths cost more than the whole layer: scale them into it
        group, neuron = group * per_layer / width, neuron * per_layer / width
        width = per_layer
    return base, per_layer - width, group, neuron


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cache_key(text_config: dict, dtype: torch.dtype, device: torch.device, timing: Timing) -> str:
    """What the costs depend on: the architecture's shape, dtype, device, software and timing."""
    import transformers

    volatile = ("transformers_version", "architectures", "dtype", "torch_dtype", "name_or_path")
    shape = {
        k: v
        for k, v in sorted(text_config.items())
        if isinstance(v, (int, float, str, bool, list)) and not k.startswith("_") and k not in volatile
    }
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    parts = [
        COST_MODEL_VERSION,
        shape,
        str(dtype),
        device.type,
        processor,
        torch.get_num_threads(),
        torch.__version__,
        transformers.__version__,
        asdict(timing),
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def decode_costs(
    arch: Architecture,
    dense: DecodeShape,
    dtype: torch.dtype,
    device: torch.device,
    timing: Timing,
    smallest_groups: int,
) -> DecodeCosts:
    """The cost model of this architecture on `device`, from the cache or measured now (and cached)."""
    path = cache_root() / "costs" / f"{cache_key(arch.text_config, dtype, device, timing)}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        log.info("decode cost model from %s", path)
        return DecodeCosts(**data)
    high = min(dense.layers, 8)
    low = max(1, high // 4)
    narrow = max(1, dense.neurons // 2)
    shapes = [
        DecodeShape(low, dense.kv_groups, dense.neurons),
        DecodeShape(high, dense.kv_groups, dense.neurons),
        DecodeShape(high, dense.kv_groups, narrow),
    ]
    if smallest_groups < dense.kv_groups:
        shapes.append(DecodeShape(high, smallest_groups, dense.neurons))
    log.info("measuring the decode cost model: %d random-weight shapes, %d rounds", len(shapes), timing.rounds)
    times = dict(zip(shapes, time_shapes(arch, shapes, dtype, device, timing)))
    base, layer, group, neuron = fit(dense, times, low, high, narrow, smallest_groups)
    deeper = times[shapes[1]] > times[shapes[0]]  # else the timings were noise: used for this run, never cached
    if not deeper:
        log.warning("decode timings too noisy to fit (%d layers no slower than %d); not cached", high, low)
    costs = DecodeCosts(
        base=base,
        layer=layer,
        group=group,
        neuron=neuron,
        measured={f"{s.layers}x{s.kv_groups}x{s.neurons}": t for s, t in times.items()},
        timing=asdict(timing),
        device=str(device),
    )
    if deeper:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(costs.as_dict(), indent=1))
        tmp.replace(path)
    return costs


def measured_speedup(
    arch: Architecture,
    dense: DecodeShape,
    small: DecodeShape,
    dtype: torch.dtype,
    device: torch.device,
    timing: Timing,
) -> dict:
    """The decode speedup of the whole small shape over the whole dense one, timed now (random weights, the same
    generation the cost model timed, interleaved rounds)."""
    dense_s, small_s = time_shapes(arch, [dense, small], dtype, device, timing)
    return {"dense_seconds_per_token": dense_s, "pruned_seconds_per_token": small_s, "speedup": dense_s / small_s}
