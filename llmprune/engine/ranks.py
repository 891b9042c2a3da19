"""Data-parallel calibration on torch.distributed: the ranks of a torchrun launch.

Every rank streams the same decoder layer; the calibration (and evaluation) windows are split across ranks
in contiguous shards of whole chunks, so each rank holds and forwards only its share of the activations. The
statistics are summed across ranks in rank order (all-gather, then added 0, 1, 2, ... on every rank), so every
rank gets the same bits whatever the timing; the solves of a layer are split across ranks (a Linear's rows, for a
method that solves rows alone; else whole Linears) and their results gathered; rank 0 writes. gloo on CPUs, NCCL
on GPUs.

A process not started by torchrun (no WORLD_SIZE, or WORLD_SIZE=1) is one rank, and every method here is a
no-op: the single-process engine is the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from llmprune.errors import LLMPruneError
from llmprune.methods import masks
from llmprune.methods.base import RowBlock

log = logging.getLogger("llmprune")
T = TypeVar("T")

TIMEOUT_S = 3 * 3600  # a collective waits this long for the other ranks (LLMPRUNE_DIST_TIMEOUT_S overrides it):
# rank 0 alone downloads the model and joins the shards, which can take hours for a 175B model
GATHER_BYTES = 64 << 20  # the most one all-gather step moves per rank (the summed slice is this over world)
REDUCE_DTYPES = ("float32", "float64")


def shard_bounds(count: int, chunk: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s windows [start, stop) of `count` among `world` ranks: the chunks of `chunk` windows dealt
    out in contiguous runs, the later ranks taking one more where they do not divide evenly."""
    chunks = -(-count // chunk)
    first, last = rank * chunks // world, (rank + 1) * chunks // world
    return min(first * chunk, count), min(last * chunk, count)


def largest_shard(count: int, chunk: int, world: int) -> int:
    """The most windows of `count` any of `world` ranks holds in chunks of `chunk` (all of them for one rank):
    what a rank's memory plan counts."""
    return max(stop - start for start, stop in (shard_bounds(count, chunk, rank, world) for rank in range(world)))


def largest_shard_rows(ids: torch.Tensor, chunk: int, world: int) -> int:
    """The most distinct token ids any of `world` ranks' shards of `ids` (one window per row) holds in chunks of
    `chunk`: the embedding-table rows a rank's forward on a CPU reads (the whole calibration's for one rank)."""
    bounds = (shard_bounds(ids.shape[0], chunk, rank, world) for rank in range(world))
    return max(int(torch.unique(ids[start:stop]).numel()) for start, stop in bounds)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: rank, world size, backend, and the dtype statistics are summed in."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    reduce_dtype: torch.dtype = torch.float32

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def planned(self, plan_ranks: int) -> Ranks:
        """The launch a run plans for: these ranks under torchrun, else one process planning as one of `plan_ranks`
        (`--plan-ranks`; 1 is this process alone)."""
        return self if self.active else dataclasses.replace(self, world=plan_ranks)

    def describe(self) -> dict:
        """The report's record of the launch."""
        return {
            "world_size": self.world,
            "backend": self.backend,
            "reduce_dtype": str(self.reduce_dtype).removeprefix("torch."),
        }

    # --- splitting work -------------------------------------------------------------------------------------

    def shard(self, count: int, chunk: int) -> tuple[int, int]:
        """This rank's windows [start, stop) of `count`: contiguous runs of whole chunks of `chunk` windows, so
        each rank forwards exactly the chunks one process would (the same batch shapes, the same bits)."""
        return shard_bounds(count, chunk, self.rank, self.world)

    def part(self, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        """This rank's windows of `ids` (its shard, as `shard` says; all of them for one rank)."""
        start, stop = self.shard(ids.shape[0], chunk)
        return ids[start:stop]

    def chunk_for(self, count: int, chunk: int) -> int:
        """The chunk size that gives every rank at least one chunk of `count` windows (refused when it cannot)."""
        if count < self.world:
            raise LLMPruneError(
                f"{self.world} ranks need at least {self.world} windows and the run has {count}; "
                "raise --samples or start fewer ranks"
            )
        return min(chunk, count // self.world) if -(-count // chunk) < self.world else chunk

    def rows(self, total: int) -> tuple[int, int]:
        """This rank's rows [start, stop) of a weight of `total` rows: contiguous, as even as they divide."""
        return self.rank * total // self.world, (self.rank + 1) * total // self.world

    def row_block(self, total: int) -> RowBlock:
        """This rank's rows of a weight of `total` rows for a method that solves rows alone: its `lowest` stacks
        every rank's scores in row order and picks on the whole, as one solve of the whole weight would."""
        start, stop = self.rows(total)

        def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
            whole = torch.empty(total, *scores.shape[1:], dtype=scores.dtype, device=scores.device)
            whole[start:stop] = scores
            self.gather_rows_(whole)
            return masks.lowest_global(whole, count)[start:stop]

        return RowBlock(start, stop, total, lowest)

    def gather_rows_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (contiguous, every rank's own rows filled as `rows` splits them) completed with the other
        ranks' rows, on every rank."""
        for source in range(self.world):
            start, stop = Ranks(source, self.world).rows(tensor.shape[0])
            if stop > start:
                self.broadcast_(tensor[start:stop], source)
        return tensor

    def owner(self, position: int) -> int:
        """The rank that solves the `position`-th job of a list every rank walks in the same order."""
        return position % self.world

    # --- collectives (no-ops for one rank) -----------------------------------------------------------------

    def _here(self):
        """The rank's own GPU as the current device for a collective: NCCL's object collectives stage through the
        current device, and a thread (the lockstep order's chunk threads) starts on cuda:0."""
        return torch.cuda.device(self.local_rank) if self.backend == "nccl" else contextlib.nullcontext()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` replaced in place by the sum of every rank's, added in rank order in its own dtype (the
        same bits on every rank, whatever the timing); moved in slices of at most GATHER_BYTES per rank."""
        if not self.active:
            return tensor
        if self.backend == "nccl" and tensor.device.type != "cuda":  # NCCL moves GPU memory only
            return tensor.copy_(self.sum_(tensor.to(self._device)))
        flat = tensor.view(-1)
        step = max(1, GATHER_BYTES // (flat.element_size() * self.world))
        with self._here():
            for start in range(0, flat.numel(), step):
                part = flat[start : start + step].contiguous()
                gathered = [torch.empty_like(part) for _ in range(self.world)]
                dist.all_gather(gathered, part)
                total = gathered[0]
                for other in gathered[1:]:
                    total += other
                flat[start : start + step].copy_(total)
                del gathered, total
        return tensor

    def sum_numbers(self, *values: float) -> list[float]:
        """Python numbers summed across ranks in float64, in rank order."""
        if not self.active:
            return [float(v) for v in values]
        return self.sum_(torch.tensor(values, dtype=torch.float64)).tolist()

    @property
    def _device(self) -> torch.device:
        """Where this rank's collectives run: its GPU for NCCL, the CPU for gloo."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def broadcast_(self, tensor: torch.Tensor, source: int) -> torch.Tensor:
        """`tensor` (same shape and dtype on every rank) replaced by `source`'s."""
        if self.active and self.backend == "nccl" and tensor.device.type != "cuda":
            return tensor.copy_(self.broadcast_(tensor.to(self._device), source))
        if self.active:
            with self._here():
                dist.broadcast(tensor, source)
        return tensor

    def broadcast_object(self, value: T, source: int = 0) -> T:
        """A picklable value from `source` to every rank."""
        if not self.active:
            return value
        box = [value if self.rank == source else None]
        with self._here():
            dist.broadcast_object_list(box, source)
        return box[0]

    def gather_objects(self, value: Any) -> list:
        """Every rank's picklable value, in rank order, on every rank."""
        if not self.active:
            return [value]
        values: list = [None] * self.world
        with self._here():
            dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            with self._here():
                dist.barrier()

    def decide(self, make: Callable[[], T]) -> T:
        """What rank 0's `make()` returns (a decision that reads the shared output folder), on every rank; an
        LLMPruneError it raises is raised on every rank with the same message."""
        if not self.active:
            return make()
        outcome: tuple[str, Any]
        if self.main:
            try:
                outcome = ("value", make())
            except LLMPruneError as exc:
                outcome = ("error", str(exc))
        else:
            outcome = ("", None)
        kind, value = self.broadcast_object(outcome)
        if kind == "error":
            raise LLMPruneError(value)
        return value

    def rank0_first(self, make: Callable[[], T]) -> T:
        """`make()` on rank 0 first (an LLMPruneError it raises is raised on every rank), then on the others: rank 0
        alone downloads or converts into a cache the ranks share, and the others find it there."""
        made = self.decide(make)
        return made if self.main else make()

    def agree(self, label: str, value: dict) -> None:
        """Refuse, on every rank, a launch whose ranks were given different `value`s (their arguments)."""
        values = self.gather_objects(value)
        for rank, other in enumerate(values):
            if other != values[0]:
                keys = sorted(k for k in set(other) | set(values[0]) if other.get(k) != values[0].get(k))
                raise LLMPruneError(
                    f"rank {rank} was started with different {label} than rank 0 ({', '.join(keys)} differ); "
                    "start every rank with the same command"
                )


SINGLE = Ranks()


def launched() -> int:
    """The world size torchrun (or another launcher of torch.distributed) set for this process; 1 if none."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise LLMPruneError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """The device of one rank: on GPUs under torchrun, cuda:LOCAL_RANK (a launch names `--device cuda`, torchrun
    the index); `device` itself for one process."""
    local_rank = ranks.local_rank
    if device.type != "cuda" or not ranks.active:
        return device
    if device.index not in (None, local_rank):
        raise LLMPruneError(
            f"--device {device}: under torchrun every rank takes cuda:LOCAL_RANK; pass --device cuda "
            "(and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    if local_rank >= torch.cuda.device_count():
        raise LLMPruneError(f"LOCAL_RANK {local_rank} has no GPU (this node sees {torch.cuda.device_count()})")
    return torch.device("cuda", local_rank)


@contextmanager
def joined(device: torch.device, reduce_dtype: str = "float32", timeout_s: float | None = None) -> Iterator[Ranks]:
    """This process's Ranks for the length of a run: joins the torchrun launch (gloo for a CPU device, NCCL for a
    GPU) when there is one, and leaves it at the end; one rank otherwise. A process group already set up by the
    caller is used as it is and left alone."""
    dtype = getattr(torch, reduce_dtype)
    world = launched()
    if world <= 1:
        yield Ranks(reduce_dtype=dtype)
        return
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise LLMPruneError(f"WORLD_SIZE={world} without {', '.join(missing)}: start the ranks with torchrun")
    ours = not dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if ours:
        local = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            torch.cuda.set_device(device_for(device, Ranks(world=world, local_rank=local)))
        seconds = timeout_s or float(os.environ.get("LLMPRUNE_DIST_TIMEOUT_S", TIMEOUT_S))
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    else:
        backend = dist.get_backend()
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend, dtype)
    if not ranks.main:  # one voice: rank 0 logs and shows progress; the others only warn
        logging.getLogger("llmprune").setLevel(logging.WARNING)
    try:
        yield ranks
    finally:
        if ours:
            dist.destroy_process_group()
