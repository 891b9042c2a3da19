"""The memory plan: what a run will hold at its peak, per component, computed from the config and
the shard headers alone, before any weight is read.

If the plan exceeds the budget (--max-memory, default: what is free), the run adapts step by step
(activations in the model dtype, smaller chunks, activations spilled to disk, parked barrier
state, a float32 Hessian inverse, the other order) and, if even the most frugal configuration
does not fit, refuses before loading weights and names the smallest budget that would work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from llmprune.engine.ranks import largest_shard
from llmprune.engine.stream import logit_positions
from llmprune.errors import LLMPruneError
from llmprune.methods.base import PruningMethod

GiB = 2**30
BOOKKEEPING = 16 * 2**20  # Python objects, reports, file buffers
PAGE = 4096  # a row of the embedding table read alone backs at most ceil(row / PAGE) + 1 pages
FEWER_TOKENS = "fewer --samples or a shorter --seqlen"  # a refusal's advice, where it would help
THREAD_BYTES = 8 * 2**20  # per lockstep chunk thread: its OpenMP team, BLAS buffers and malloc arena (measured ~7 MiB)


@dataclass(frozen=True)
class Geometry:
    """The sizes a plan needs, read from the meta skeleton."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_params: int  # largest decoder layer
    rest_params: int  # embeddings and final norm (a tied head is the embedding matrix)
    head_params: int  # an untied head (loaded only for the evaluation's loss)
    table_rows: int  # the input embedding table's rows and width (part of rest_params)
    table_width: int
    max_in: int  # widest input of a pruned Linear (its Hessian is max_in x max_in)
    shapes: tuple[tuple[int, int], ...]  # the distinct [out, in] shapes of the pruned Linears
    group_inputs: tuple[int, ...]  # input width of each group of Linears sharing statistics (largest layer)
    eager_attention: bool

    @classmethod
    def of(cls, skeleton, targets_by_layer: list[dict]) -> Geometry:
        text = skeleton.config.get_text_config()
        hidden = int(text.hidden_size)
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        inter = int(getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or 4 * hidden)
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in skeleton.layers)

        def count(keys: list[str]) -> int:
            shapes = (skeleton.checkpoint.metadata(skeleton.key_map[key])[1] for key in keys)
            return sum(int(torch.tensor(shape).prod()) if shape else 1 for shape in shapes)

        rest = count(skeleton.resident_rest_keys(head=False))  # a tied head is the embedding matrix, once
        head = count(skeleton.resident_rest_keys(head=True)) - rest
        table = skeleton.embedding_key()
        table_shape = skeleton.checkpoint.metadata(skeleton.key_map[table])[1] if table in skeleton.key_map else [0, 0]
        linears = [m for targets in targets_by_layer for m in targets.values()]
        return cls(
            layers=len(skeleton.layers),
            hidden=hidden,
            intermediate=inter,
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            vocab=int(getattr(text, "vocab_size", 0) or 0),
            layer_params=layer_params,
            rest_params=rest,
            head_params=head,
            table_rows=int(table_shape[0]),
            table_width=int(table_shape[1]) if len(table_shape) > 1 else 0,
            max_in=max((m.in_features for m in linears), default=hidden),
            shapes=tuple(sorted({(m.out_features, m.in_features) for m in linears})),
            group_inputs=max(map(_group_inputs, targets_by_layer), key=lambda g: sum(i * i for i in g), default=()),
            eager_attention=getattr(skeleton.config, "_attn_implementation", "sdpa") == "eager",
        )


def _group_inputs(targets: dict) -> tuple[int, ...]:
    """Input widths of a layer's statistic groups, from the config alone. Linears of one parent share an
    input when they follow each other with the same input width (q/k/v, gate/up), except the parent's
    last Linear, its output projection (o_proj, down_proj). Where that guess is wrong it splits a group,
    so it never counts fewer Hessians than the run holds."""
    by_parent: dict[str, list] = {}
    for name, module in targets.items():
        by_parent.setdefault(name.rpartition(".")[0], []).append(module)
    widths = []
    for modules in by_parent.values():
        for position, module in enumerate(modules):
            last = position == len(modules) - 1 and position > 0
            joins = position > 0 and not last and module.in_features == modules[position - 1].in_features
            if not joins:
                widths.append(module.in_features)
    return tuple(sorted(widths, reverse=True))


@dataclass(frozen=True)
class Choice:
    """The knobs a plan sets."""

    chunk: int  # windows per forward chunk
    activations: str  # "device", "host" or "disk"
    act_dtype: torch.dtype
    order: str  # "sequential" or "parallel"
    park: str  # "memory", "host" or "disk"
    inverse_dtype: torch.dtype


@dataclass
class MemoryPlan:
    """Peak bytes per component and phase, the chosen knobs, and whether it fits the budget."""

    device: str
    budget: int
    host_budget: int | None
    choice: Choice
    phases: dict[str, dict[str, int]]  # phase -> component -> bytes (compute device)
    host: dict[str, int] = field(default_factory=dict)  # host-side bytes when computing on a GPU
    overhead: int = 0  # interpreter + libraries, measured at start, outside the budget
    adaptations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(sum(parts.values()) for parts in self.phases.values())

    @property
    def worst_phase(self) -> str:
        """The phase whose components sum to the peak."""
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def fits(self) -> bool:
        host_ok = self.host_budget is None or self.host_peak <= self.host_budget
        return self.peak <= self.budget and host_ok

    def render(self) -> str:
        worst = self.worst_phase
        lines = [f"memory plan for {self.device} (peak in the {worst} phase; budget {_gib(self.budget)}):"]
        for name, size in sorted(self.phases[worst].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {name:<28} {_gib(size):>10}")
        lines.append(f"  {'total':<28} {_gib(self.peak):>10}   + {_gib(self.overhead)} interpreter and libraries")
        for name, parts in self.phases.items():
            if name != worst:
                own = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if k not in self.phases[worst] and v)
                lines.append(f"  {name} phase {_gib(sum(parts.values()))}" + (f" ({own})" if own else ""))
        if self.host:
            lines.append(
                f"  host memory {_gib(self.host_peak)} ({', '.join(f'{k} {_gib(v)}' for k, v in self.host.items())})"
            )
        c = self.choice
        order = f"{c.order} order" + (f"; waiting chunks {waiting(c.park)}" if c.order == "sequential" else "")
        lines.append(
            f"  chunks of {c.chunk} windows; activations on {c.activations} in {str(c.act_dtype)[6:]}; "
            f"{order}; Hessian inverse in {str(c.inverse_dtype)[6:]}"
        )
        lines.extend(f"  adapted: {a}" for a in self.adaptations)
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "device": self.device,
            "budget_bytes": self.budget,
            "peak_bytes": self.peak,
            "overhead_bytes": self.overhead,
            "host_bytes": self.host_peak,
            "phases": self.phases,
            "choice": choice_to_dict(self.choice),
            "adaptations": self.adaptations,
            "notes": self.notes,
        }


def _gib(size: int) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size} B"


def _ceil_mib(size: int) -> str:
    return f"{-(-size // 2**20)}MiB"


@dataclass
class Request:
    """What the run asks for, before adaptation. Window counts are the run's; under torchrun each rank holds its
    shard of them, in whole chunks of the chunk size the plan chooses."""

    windows: int
    seqlen: int
    eval_windows: int
    chunk: int
    order: str
    park: str  # "auto" or a mode
    method: type[PruningMethod]
    compute_dtype: torch.dtype
    model_dtype: torch.dtype
    save_dtype: torch.dtype
    activations: str = "auto"  # "auto", "memory" or "disk"
    error_tokens: int = 1024
    # the table rows a CPU forward reads, for a chunk size: the most distinct ids one rank's shard holds
    embedding_rows: Callable[[int], int] | None = None
    parallel_only: bool = False  # MoE experts: their statistics are fed in the parallel order only
    stats_dtype: torch.dtype = torch.float32  # --reduce-dtype: float64 sums hold twice the float32 statistics
    row_shards: int = 1  # ranks a Linear's rows are split across (a method that solves rows alone, under torchrun)
    world: int = 1  # torchrun ranks the windows are split across
    method_options: Mapping[str, Any] = field(default_factory=dict)  # the run's values of the method's options

    @property
    def inverse(self) -> bool:
        """Whether the method factors an inverse whose dtype the plan may choose (SparseGPT's Hessian's)."""
        return self.method.inverse_option is not None

    @property
    def inverse_dtype(self) -> torch.dtype | None:
        """The inverse's dtype its option asks for (`--inverse-dtype`); None for auto: float64 unless the budget
        needs float32."""
        name = self.method_options.get(self.method.inverse_option) if self.inverse else None
        return None if name in (None, "auto") else getattr(torch, name)

    def statistics_bytes(self, width: int, c: int) -> int:
        """One group's statistics for inputs of `width`: what the method declares, plus a sample of the inputs
        for the reconstruction error unless a statistic gives it exactly."""
        kinds = self.method.statistics
        sample = 0 if any(kind.exact_error for kind in kinds) else self.error_tokens * width * c
        scale = self.stats_dtype.itemsize // 4
        return sum(kind.nbytes(width) for kind in kinds) * scale + sample

    @property
    def statistics_label(self) -> str:
        return next((kind.label for kind in self.method.statistics if kind.label != "statistics"), "statistics")


def solve_bytes(req: Request, rows: int, cols: int, inverse_dtype: torch.dtype) -> int:
    """Peak bytes of one solve of a [rows, cols] weight beyond the layer and its statistics: the method's own buffers,
    then the pruned weight rounded to the save dtype and back. Under ranks that split a Linear's rows, a rank's
    block of the rows, then the gathered whole weight."""
    c = req.compute_dtype.itemsize
    roundtrip = req.save_dtype.itemsize + c if req.save_dtype != req.compute_dtype else 0
    mine = -(-rows // req.row_shards)  # a rank's block of the rows (all of them in one process)
    own = req.method.workspace_bytes(mine, cols, req.compute_dtype, inverse_dtype, req.method_options)
    own += mine * cols * roundtrip
    if req.row_shards == 1:
        return own
    # during the sweep, the scores of a block of columns stacked from every rank for the mask's choice (the scores,
    # and the selection's copy, int64 indices and mask); after it, what outlives the sweep (the factor and LAPACK's
    # kept buffers: the method's workspace for no rows), the rank's solved rows and mask, and the gathered weight
    sweep = own + rows * req.method.selection_columns(cols, req.method_options) * (4 + 4 + 8 + 1)
    kept = req.method.workspace_bytes(0, cols, req.compute_dtype, inverse_dtype, req.method_options)
    gather = kept + mine * cols * (c + 1) + rows * cols * c
    return max(sweep, gather)


def estimate(geo: Geometry, req: Request, choice: Choice, device: torch.device) -> tuple[dict, dict]:
    """Per-phase component bytes on the compute device, and host bytes (GPU runs).

    A layer goes through three sub-phases that never overlap: the forward (chunk temporaries), the
    solves (one Linear's workspace at a time) and the write (the layer in the save dtype). What lives
    across them (the layer's weights, the statistics, the activations) is counted in each; the peak is
    the largest sub-phase, not their sum. The evaluation likewise runs every layer over its windows, then
    the head over slices of the last hidden states once the last layer is gone.
    """
    c = torch.finfo(req.compute_dtype).bits // 8
    a = torch.finfo(choice.act_dtype).bits // 8
    windows = largest_shard(req.windows, choice.chunk, req.world)  # this rank's calibration windows
    tokens = windows * req.seqlen
    chunk_tokens = choice.chunk * req.seqlen
    d, inter = geo.hidden, geo.intermediate
    on_gpu = device.type == "cuda"
    sequential = choice.order == "sequential"

    temporaries = chunk_tokens * (6 * d + 3 * inter) * c
    if geo.eager_attention:
        temporaries += choice.chunk * geo.heads * req.seqlen * req.seqlen * c
    store = tokens * d * a if choice.activations in ("device",) or (choice.activations == "host" and not on_gpu) else 0
    streamed = 2 * chunk_tokens * d * a if choice.activations == "disk" else 0
    attention_state = d + geo.heads * geo.head_dim + 2 * geo.kv_heads * geo.head_dim
    if choice.park == "memory":
        per_token = max(attention_state + 2 * d, 3 * d + inter)
    else:
        per_token = max(attention_state, 2 * d)
    stash = tokens * per_token * c if sequential else 0
    # statistics: one group at a time in the sequential order, every group at once in the parallel one
    widths = (geo.max_in,) if sequential or not geo.group_inputs else geo.group_inputs
    statistics = sum(req.statistics_bytes(w, c) for w in widths)
    # one solve at a time
    workspace = max(
        (solve_bytes(req, rows, cols, choice.inverse_dtype) for rows, cols in geo.shapes),
        default=0,
    )
    # writing a layer: a CPU copy in the save dtype (unless it already is one) plus the serialized bytes
    saved = geo.layer_params * torch.finfo(req.save_dtype).bits // 8
    write_buffer = saved + (saved if on_gpu or req.save_dtype != req.compute_dtype else 0)

    stats_name = req.statistics_label
    held = {"layer weights": geo.layer_params * c}
    if sequential:
        held["barrier state (all chunks)"] = max(stash, store)
        chunks = -(-windows // choice.chunk)
        held["chunk threads"] = chunks * THREAD_BYTES if chunks > 1 else 0
    elif store:
        held["calibration activations"] = store
    held["bookkeeping"] = BOOKKEEPING
    forward = {**held, "chunk temporaries": temporaries, stats_name: statistics}
    if streamed:
        forward["activation chunks in flight"] = streamed
    solve = {**held, stats_name: statistics, req.method.workspace_label: workspace}
    write = {**held, "writing a layer": write_buffer if not on_gpu else saved}
    rest = geo.rest_params * c
    table = geo.table_rows * geo.table_width * c
    used = table
    if req.embedding_rows is not None and not on_gpu:  # only the ids' rows are read; pages are the unit
        used = min(table, req.embedding_rows(choice.chunk) * (-(-geo.table_width * c // PAGE) + 1) * PAGE)
    begin = {
        "embeddings": rest - table + used,
        "calibration activations": store + streamed,
        "chunk temporaries": temporaries,
    }
    phases = {"begin": begin, "layer forward": forward, "layer solve": solve, "layer write": write}
    if req.eval_windows:
        evaluated = {
            "embeddings and head": rest + geo.head_params * c,
            "eval activations": largest_shard(req.eval_windows, choice.chunk, req.world) * req.seqlen * d * c,
        }
        phases["eval forward"] = {**evaluated, "layer weights": geo.layer_params * c, "chunk temporaries": temporaries}
        positions = min(req.seqlen, logit_positions(1, geo.vocab))
        logits = positions * geo.vocab * 4 * 3  # a slice's logits, their float32 copy, log-softmax
        phases["eval head"] = {**evaluated, "logits of a slice": logits}
    host: dict[str, int] = {}
    if on_gpu:
        if choice.activations == "host":
            host["calibration activations"] = tokens * d * a
        if choice.park == "host" and sequential:
            host["parked barrier state"] = tokens * max(3 * d + inter - per_token, 0) * c
        host["writing a layer"] = 2 * saved
    return phases, host


def waiting(park: str) -> str:
    """What the sequential order's waiting chunks do with their state, in words, for a --park value."""
    return {"memory": "stay in memory", "host": "park to host memory"}.get(park, f"park to {park}")


def make_plan(
    geo: Geometry, req: Request, device: torch.device, budget: int, host_budget: int | None, overhead: int
) -> MemoryPlan:
    """The first configuration that fits the budget, adapting in a fixed order; else refuse."""
    on_gpu = device.type == "cuda"
    park = "memory" if req.park == "auto" else req.park  # parking costs I/O: only when the budget needs it
    where = "disk" if req.activations == "disk" else "device"
    choice = Choice(req.chunk, where, req.compute_dtype, req.order, park, req.inverse_dtype or torch.float64)
    adaptations: list[str] = []

    def plan_for(ch: Choice) -> MemoryPlan:
        phases, host = estimate(geo, req, ch, device)
        return MemoryPlan(str(device), budget, host_budget, ch, phases, host, overhead, list(adaptations))

    steps = []
    if req.model_dtype.itemsize < req.compute_dtype.itemsize:
        steps.append(
            ("activations stored in the model dtype", lambda ch: dataclasses.replace(ch, act_dtype=req.model_dtype))
        )
    park_to = "host" if on_gpu else "disk"  # where waiting chunks park when the budget needs it
    if req.park == "auto" and req.order == "sequential":  # only that order has waiting chunks
        steps.append(
            (
                f"waiting chunks {waiting(park_to)}",
                lambda ch: dataclasses.replace(ch, park=park_to),
            )
        )
    if req.activations == "auto":
        if on_gpu:
            steps.append(("activations kept in host memory", lambda ch: dataclasses.replace(ch, activations="host")))
        steps.append(("activations spilled to disk", lambda ch: dataclasses.replace(ch, activations="disk")))
    if req.inverse and req.inverse_dtype is None:  # before a change of order, which changes far more results
        steps.append(("float32 Hessian inverse", lambda ch: dataclasses.replace(ch, inverse_dtype=torch.float32)))
    if req.order == "sequential":
        steps.append(
            ("two-pass (parallel) order: no barrier state", lambda ch: dataclasses.replace(ch, order="parallel"))
        )
    # few tokens: one group's statistics at a time beats every group's (not for MoE experts: parallel only)
    elif req.method.statistics and not req.parallel_only:
        parked = park_to if req.park == "auto" else req.park
        steps.append(
            (
                f"sequential order: one group's statistics at a time, waiting chunks {waiting(parked)}",
                lambda ch: dataclasses.replace(ch, order="sequential", park=parked),
            )
        )

    tried: list[MemoryPlan] = []
    for applied in range(len(steps) + 1):
        base = choice
        for _, step in steps[:applied]:
            base = step(base)
        adaptations[:] = [label for label, _ in steps[:applied]]
        chunk = base.chunk
        plan = plan_for(base)
        tried.append(plan)
        while not plan.fits and chunk > 1:  # then the largest chunk that fits
            chunk = max(1, chunk // 2)
            plan = plan_for(dataclasses.replace(base, chunk=chunk))
            tried.append(plan)
        if plan.fits:
            if chunk != base.chunk:
                plan.adaptations.append(f"smaller chunks: {base.chunk} -> {chunk} windows")
            return plan
    # the smallest budget that works is the least any configuration tried needs (a later step can need more:
    # the sequential order's barrier state), and the first configuration that fits it is the one a rerun takes
    least = min(p.peak for p in tried)
    on_device = [p for p in tried if p.peak <= budget]
    if on_device:
        where = f"host memory {_ceil_mib(min(p.host_peak for p in on_device))}"
        hint = f", {FEWER_TOKENS}"
    else:
        where = f"--max-memory {_ceil_mib(least)}"
        hint = _fewer_tokens_hint(geo, req, tried, device)
    raise LLMPruneError(
        f"this run needs at least {_gib(least)} on {device} even with every adaptation "
        f"({', '.join(adaptations + ['chunks of 1 window'])}); the budget is {_gib(budget)}: use {where} or more" + hint
    )


def _fewer_tokens_hint(geo: Geometry, req: Request, tried: list[MemoryPlan], device: torch.device) -> str:
    """The end of a refusal: fewer calibration tokens, unless what does not depend on them is over the budget in
    every configuration tried (a solve's workspace, a Hessian, the layer: one window of one token would not fit
    either); then the least of those and its largest part instead."""
    one_token = dataclasses.replace(req, windows=1, eval_windows=min(req.eval_windows, 1), seqlen=1)
    floor = min(
        (
            MemoryPlan(p.device, p.budget, p.host_budget, p.choice, *estimate(geo, one_token, p.choice, device))
            for p in tried
        ),
        key=lambda plan: plan.peak,
    )
    if floor.peak <= floor.budget:
        return f", {FEWER_TOKENS}"
    worst = floor.worst_phase
    part, size = max(floor.phases[worst].items(), key=lambda kv: kv[1])
    return (
        f"; {FEWER_TOKENS} would not fit: with one token the {worst} phase still needs {_gib(floor.peak)}, "
        f"{_gib(size)} of it the {part}"
    )


def choice_to_dict(choice: Choice) -> dict:
    return {k: str(v) for k, v in dataclasses.asdict(choice).items()}


def choice_from_dict(data: dict) -> Choice:
    """Inverse of choice_to_dict (a resumed run reuses the knobs it started with)."""
    return Choice(
        chunk=int(data["chunk"]),
        activations=data["activations"],
        act_dtype=getattr(torch, data["act_dtype"].removeprefix("torch.")),
        order=data["order"],
        park=data["park"],
        inverse_dtype=getattr(torch, data["inverse_dtype"].removeprefix("torch.")),
    )
