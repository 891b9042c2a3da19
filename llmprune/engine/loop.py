"""The resumable layer loop: prune each decoder layer, commit it, move on.

After each layer its pruned tensors (one safetensors file) and the next layer's inputs (the chunk
files of one side) are durable before the run state names the next layer, so a run killed at any
point resumes at the first unfinished layer with exactly the inputs it would have had.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmprune.engine.activations import Activations, DiskChunk
from llmprune.engine.devices import trim_heap
from llmprune.engine.plan import Choice
from llmprune.engine.prune_layer import LayerPruner
from llmprune.engine.ranks import SINGLE, Ranks
from llmprune.engine.resume import RunState
from llmprune.engine.stream import LayerStream
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder, fsync_write
from llmprune.models.skeleton import Skeleton
from llmprune.pattern import Pattern


def layer_unit(index: int) -> str:
    return f"layer-{index:05d}"


SIDES_NAME = "sides.json"  # a rank other than 0: the chunk shapes of its two sides


def rank_work(work: Path, ranks: Ranks) -> Path:
    """Where a rank keeps its activations: the run's work folder for rank 0 (and for one process), a folder of
    its own inside it for every other rank (so OUTPUT must be on a filesystem every rank sees)."""
    return work if ranks.main else work / f"rank-{ranks.rank:05d}"


def _read_sides(work: Path) -> dict[str, list[list[int]]]:
    path = work / SIDES_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def _side_shapes(state: RunState, work: Path, ranks: Ranks) -> list[list[int]]:
    """The chunk shapes of this rank's copy of state.side: rank 0's are in the run state, the others' in their
    own sides file (which holds both sides, so a rank that saved a layer rank 0 never committed still knows
    the shapes of the side the run resumes from)."""
    if ranks.main:
        return state.chunk_shapes
    sides = _read_sides(work)
    if state.side not in sides:
        raise LLMPruneError(
            f"{work / SIDES_NAME} does not record side {state.side}: this rank's activations are gone; pass --overwrite"
        )
    return sides[state.side]


def _save_side_shapes(work: Path, side: str, shapes: list[list[int]]) -> None:
    fsync_write(work / SIDES_NAME, json.dumps({**_read_sides(work), side: shapes}) + "\n")


def _saved_side(state: RunState, work: Path, spilled: bool, ranks: Ranks) -> Activations:
    """The inputs of state.next_layer, as saved by the last committed layer."""
    shapes = _side_shapes(state, work, ranks)
    dtype = getattr(torch, state.choice["act_dtype"].removeprefix("torch."))
    folder = work / state.side
    chunks = [DiskChunk(folder / f"chunk-{i:05d}.bin", tuple(shape), dtype) for i, shape in enumerate(shapes)]
    acts = Activations(chunks)
    if not spilled:
        acts.chunks = [chunk.load() for chunk in chunks]
    return acts


def prune_layers(
    skeleton: Skeleton,
    ids: torch.Tensor,
    device: torch.device,
    compute_dtype: torch.dtype,
    choice: Choice,
    pruner: LayerPruner,
    writer: OutputFolder,
    state: RunState,
    save_dtype: torch.dtype,
    label: str,
    quiet: bool,
    forward_dtype: torch.dtype | None = None,
    patterns: list[Pattern] | None = None,
    ranks: Ranks = SINGLE,
) -> None:
    """Prune layers state.next_layer .. end, committing each one (state is updated in place); with `patterns`,
    layer i to patterns[i] (a non-uniform sparsity profile), else every layer to the pruner's pattern. With
    several ranks, each streams its shard of the windows `ids` and rank 0 writes the layers and the state."""
    spilled = choice.activations == "disk"
    act_device = torch.device("cpu") if choice.activations != "device" else device
    ids = ranks.part(ids, choice.chunk)
    work = rank_work(writer.work, ranks)
    work.mkdir(parents=True, exist_ok=True)
    stream = LayerStream(skeleton, device, compute_dtype, choice.chunk, act_device, choice.act_dtype, forward_dtype)
    if state.next_layer == 0:
        first_side = work / RunState.side_for(1)  # layer 0 reads the side layer 1 writes
        first_side.mkdir(parents=True, exist_ok=True)
        acts = stream.begin(ids, spill_to=first_side if spilled else None)
    else:
        stream.attach(ids)
        acts = _saved_side(state, work, spilled, ranks)
    stream.prepare({int(chunk.shape[0]) for chunk in acts.chunks} | {1})
    pruner.parking.folder = work
    bar = tqdm(range(skeleton.num_layers), desc=label, unit="layer", disable=quiet, initial=state.next_layer)
    for index in range(state.next_layer, skeleton.num_layers):
        started = time.perf_counter()
        side = work / RunState.side_for(index)
        side.mkdir(parents=True, exist_ok=True)
        acts.spill_to = side if spilled else None
        trim_heap()
        layer = skeleton.load_layer(index, device, compute_dtype)
        modules = pruner.prune(stream, index, layer, acts, patterns[index] if patterns else None)
        trim_heap()
        if ranks.main:
            tensors = skeleton.stored(pruner.stored_tensors(skeleton.layer_tensors(index, layer, save_dtype)))
            writer.write_unit(layer_unit(index), tensors)
            del tensors
        else:
            pruner.saved = {}  # rank 0 writes the layer
        skeleton.unload_layer(index)
        handles = acts.save_side(side)
        if spilled:
            acts.chunks = handles
        state.chunk_shapes = [list(handle.shape) for handle in handles]
        if not ranks.main:
            _save_side_shapes(work, side.name, state.chunk_shapes)
        seconds = time.perf_counter() - started
        state.layers.append(layer_report(index, modules, seconds))
        state.next_layer, state.side = index + 1, side.name
        state.prune_seconds += seconds
        ranks.barrier()  # every rank's outputs are durable before rank 0 names the next layer ...
        if ranks.main:
            state.save(writer.work)
        ranks.barrier()  # ... and named before any rank overwrites this layer's inputs
        bar.update(1)
        if modules:
            bar.set_postfix(sparsity=f"{state.layers[-1]['sparsity']:.3f}", error=f"{state.layers[-1]['error']:.4f}")
    bar.close()
    stream.close()


def layer_report(index: int, modules: list[dict], seconds: float) -> dict:
    """Per-layer summary: achieved sparsity, mean reconstruction error, damping retries, modules."""
    total = sum(m["shape"][0] * m["shape"][1] for m in modules)
    pruned = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for m in modules)
    errors = [m["error"] for m in modules if m["error"] is not None]
    return {
        "index": index,
        "sparsity": pruned / total if total else 0.0,
        "error": sum(errors) / len(errors) if errors else 0.0,
        "damping_retries": sum(m.get("damping_retries", 0) for m in modules),
        "seconds": round(seconds, 3),
        "modules": modules,
    }
