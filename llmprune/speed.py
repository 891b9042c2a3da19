"""The speed-aware search: `--target-speedup S` removes whole layers, narrows every layer, or both, so that
a measured cost model of decoding predicts at least S, at the lowest calibration perplexity.

1. The cost model (llmprune.costmodel): greedy generation timed on random-weight shapes of the architecture on
   the run's device in transformers, fitted per layer, per KV group and per FFN neuron; cached.
2. For every depth d and KV-group count g, the widest uniform FFN width whose predicted speedup reaches S is a
   candidate cut; deeper cuts stop where full width already reaches S (more depth only costs quality).
3. Scores from streamed passes of the dense model: the angular distance of layer spans (Gromov et al.) picks
   which d layers go; a structured method's ranking (FLAP-style by default) picks which heads and neurons stay.
4. Each candidate is evaluated by a streamed forward over the first calibration windows (removed layers skipped,
   removed units masked); the lowest perplexity wins and is written like a structured cut (mask tuning against
   the depth-reduced teacher), layers renumbered. The chosen plan, the candidates, the predicted speedup and the
   speedup measured on the whole shapes go in the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from llmprune.body import Body, BodyReport, RunContext, log
from llmprune.costmodel import Architecture, DecodeCosts, DecodeShape, Timing, decode_costs, measured_speedup
from llmprune.depth import (
    DEPTH_REPAIR,
    DepthScores,
    Repair,
    depth_scores,
    least_squares_repair,
    repair_shortfall,
)
from llmprune.engine.devices import default_chunk
from llmprune.engine.resume import RunState
from llmprune.engine.stream import open_stream
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder
from llmprune.settings import DEFAULT_SPEEDUP, Configurable, Option
from llmprune.structured.arch import Shape, Structure, per_layer_lists, smaller_config, structure_of
from llmprune.structured.base import Ranking, RankInputs
from llmprune.structured.body import StudentMasks, choose_cuts, tune_and_write
from llmprune.structured.export import LayerCut
from llmprune.structured.methods import STRUCTURED
from llmprune.structured.search import Costs, Counts, allowed_groups, allowed_neurons


class Speed(Configurable):
    """Depth and width cuts chosen together for a decode speedup."""

    name = "speed"
    summary = "reach --target-speedup S at the lowest perplexity: layers, heads and neurons removed together"
    options = (
        Option(
            "width_method",
            "flap",
            "how heads and FFN neurons are ranked for the width part of a cut (default flap)",
            choices=("flap", "fisher"),
        ),
        DEPTH_REPAIR,
        Option("search_windows", 8, "calibration windows each candidate cut is evaluated on", type=int, minimum=1),
        Option("max_candidates", 16, "candidate cuts evaluated at most (evenly spaced)", type=int, minimum=1),
        Option("decode_batch", 16, "cost model: prompts generated together", type=int, minimum=1),
        Option("decode_tokens", 32, "cost model: new tokens per generation", type=int, minimum=1),
        Option("timing_rounds", 3, "cost model: interleaved timing rounds (median)", type=int, minimum=1),
        Option(
            "measure_speedup",
            True,
            "skip timing the whole dense and pruned shapes at the end (the report then has the prediction only)",
            flag="--no-measure-speedup",
            affects_result=False,
        ),
    )


SPEED: dict[str, type[Speed]] = {Speed.name: Speed}


@dataclass
class Candidate:
    """One cut: layers removed, KV groups and FFN neurons kept per layer, predicted speedup, search perplexity."""

    removed_layers: list[int]
    kv_groups: int
    neurons: int
    predicted_speedup: float
    search_perplexity: float | None = None


def candidate_cuts(
    costs: DecodeCosts, dense: DecodeShape, target: float, groups: list[int], neurons: list[int]
) -> list[tuple[int, int, int, float]]:
    """(layers removed, KV groups, neurons, predicted speedup) of every minimal cut that reaches `target`: per
    group count, per depth, the widest FFN that reaches it, until full width does."""
    cuts = []
    for g in sorted(groups, reverse=True):
        for d in range(dense.layers):
            fits = [n for n in neurons if costs.speedup(dense, DecodeShape(dense.layers - d, g, n)) >= target]
            if fits:
                n = max(fits)
                cuts.append((d, g, n, costs.speedup(dense, DecodeShape(dense.layers - d, g, n))))
                if n == dense.neurons:
                    break
    return cuts


def spaced(items: list, count: int) -> list:
    """At most `count` of `items`, evenly spaced, the first and last included."""
    if len(items) <= count:
        return items
    if count == 1:
        return items[:1]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def masked_perplexity(
    ctx: RunContext,
    ids: torch.Tensor,
    kept: list[int],
    cuts: list[LayerCut],
    chunk: int,
    structure: Structure,
    shape: Shape,
    replace: dict[str, torch.Tensor],
) -> float:
    """Perplexity of `ids` through the kept layers (with the `replace` weights: a depth repair) with the removed
    heads and neurons masked (streamed; under torchrun each rank streams its shard and the losses are added)."""
    skeleton = ctx.skeleton
    stream, acts = open_stream(skeleton, ctx.ranks.part(ids, chunk), ctx.device, chunk, torch.device("cpu"))
    for index in kept:
        layer = skeleton.load_layer(index, ctx.device, stream.dtype, replace)
        with StudentMasks(layer, structure, shape, cuts[index], ctx.device):
            stream.forward(index, layer, acts)
        skeleton.unload_layer(index)
    nll, tokens = ctx.ranks.sum_numbers(*stream.nll(acts))
    stream.close()
    return math.exp(nll / tokens)


def _span(removed: list[int]) -> tuple[int, int]:
    """A contiguous run of layers as (first, end)."""
    return (removed[0], removed[-1] + 1) if removed else (0, 0)


class SpeedBody(Body):
    """--method speed: the cut that reaches --target-speedup at the lowest calibration perplexity."""

    kind = "speed"
    sections = ("speed", "structured")
    distributed = True  # rank 0 times the cost model and the result; every statistic is summed across ranks

    def __init__(self, settings, method: type) -> None:
        super().__init__(settings, method)
        self.method = method(**settings.method_options)
        self.target = settings.speed.target_speedup or DEFAULT_SPEEDUP

    @property
    def tag(self) -> str:
        return f"{self.target:g}x"

    @property
    def eval_chunk(self) -> int:
        return self.chunk

    def check_model(self, ctx: RunContext) -> None:
        self.structure = structure_of(ctx.skeleton.config)
        self.shape = Shape.of(ctx.skeleton.config, self.structure)
        settings = self.settings.structured
        if settings.keep_heads is not None or settings.keep_neurons is not None or settings.heads_per_group:
            raise LLMPruneError(
                "--keep-heads, --keep-neurons and --heads-per-group fix the width; --target-speedup chooses it"
            )
        if ctx.skeleton.num_layers < 2:
            raise LLMPruneError("--target-speedup needs a model of at least 2 decoder layers")
        width = self.method.values["width_method"]
        if ctx.ranks.active and not STRUCTURED[width].distributed:
            raise LLMPruneError(f"--width-method {width} does not run across torchrun ranks yet; run it as one process")

    def timing(self) -> Timing:
        v = self.method.values
        return Timing(batch=v["decode_batch"], new_tokens=v["decode_tokens"], rounds=v["timing_rounds"])

    def plan(self, ctx: RunContext, saved: RunState | None) -> dict | None:
        """The cost model and the candidate cuts, before any weight is read: an unreachable target is refused
        with no output folder."""
        assert ctx.calib is not None
        chunk = self.settings.common.batch_size or default_chunk(ctx.calib.count, ctx.calib.seqlen, ctx.device)
        self.chunk = ctx.ranks.chunk_for(ctx.calib.count, chunk)  # every rank gets whole chunks of windows
        shape = self.shape
        self.dense = DecodeShape(ctx.skeleton.num_layers, shape.kv_heads, shape.intermediate)
        self.groups = allowed_groups(shape.kv_heads) if self.structure.heads else [shape.kv_heads]
        self.arch = Architecture(ctx.skeleton.config.get_text_config().to_dict(), self.structure, shape)
        self.costs = ctx.ranks.decide(  # timed on rank 0 alone: every rank must search the same cuts
            lambda: decode_costs(self.arch, self.dense, ctx.save_dtype, ctx.device, self.timing(), min(self.groups))
        )
        neurons = allowed_neurons(shape.intermediate, self.settings.structured.neuron_multiple)
        self.cuts = candidate_cuts(self.costs, self.dense, self.target, self.groups, neurons)
        if not self.cuts:
            most = self.costs.speedup(self.dense, DecodeShape(1, min(self.groups), min(neurons)))
            raise LLMPruneError(
                f"--target-speedup {self.target:g} is out of reach: the cost model measured on {ctx.device} predicts "
                f"at most {most:.2f}x for any cut that keeps a layer; ask for less"
            )
        return None

    def describe(self, ctx: RunContext) -> str:
        return f"speed: reach {self.target:g}x decode speed ({len(self.cuts)} candidate cuts) of {ctx.where()}"

    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        assert ctx.calib is not None
        skeleton, shape, values = ctx.skeleton, self.shape, self.method.values
        started = time.perf_counter()
        depth = depth_scores(ctx, self.chunk)
        width = STRUCTURED[values["width_method"]]()
        ranking = width.rank(
            RankInputs(skeleton, ctx.calib.ids, self.structure, shape, ctx.device, self.chunk, writer.work,
                       ctx.progress, False, ctx.ranks)
        )  # fmt: skip
        scored = time.perf_counter()
        self.candidates, repairs = self.search(ctx, depth, ranking)
        best = min(self.candidates, key=lambda c: math.inf if math.isnan(c.search_perplexity) else c.search_perplexity)
        self.chosen = best
        self.kept = [i for i in range(skeleton.num_layers) if i not in best.removed_layers]
        cuts = choose_cuts(Counts(best.kv_groups, shape.group_size, best.neurons), shape, ranking)
        width.compensate(skeleton, self.structure, shape, cuts, ranking)
        searched = time.perf_counter()
        settings = self.settings.structured
        repair = repairs.get(_span(best.removed_layers))
        self.repair = repair.as_dict() if repair else None
        self.layer_reports = tune_and_write(
            skeleton, ctx.calib.ids, cuts, self.structure, shape, ctx.device, self.chunk, writer, ctx.save_dtype,
            settings.mask_tuning, settings.tuning_damping, ctx.progress, kept=self.kept,
            replace={repair.key: repair.weight} if repair else None, ranks=ctx.ranks,
        )  # fmt: skip
        written = time.perf_counter()
        self.measured = None
        if values["measure_speedup"]:
            small = DecodeShape(len(self.kept), best.kv_groups, best.neurons)
            self.measured = ctx.ranks.decide(lambda: self.measure(ctx, small))  # timed on rank 0 alone
        self.timings = {
            "score_seconds": round(scored - started, 2),
            "search_seconds": round(searched - scored, 2),
            "tune_write_seconds": round(written - searched, 2),
            "measure_seconds": round(time.perf_counter() - written, 2),
            "prune_seconds": round(time.perf_counter() - started, 2),
        }

    def measure(self, ctx: RunContext, small: DecodeShape) -> dict | None:
        """The dense and the cut shapes timed whole (random weights); None when two such models do not fit."""
        try:
            return measured_speedup(self.arch, self.dense, small, ctx.save_dtype, ctx.device, self.timing())
        except (MemoryError, torch.OutOfMemoryError) as exc:
            log.warning("the whole shapes do not fit to be timed (%s); the report keeps the prediction", exc)
            return None

    def search(
        self, ctx: RunContext, depth: DepthScores, ranking: Ranking
    ) -> tuple[list[Candidate], dict[tuple[int, int], Repair]]:
        """Every candidate cut (at most max_candidates) evaluated on the first search_windows calibration
        windows, each span's depth repair (one streamed pass for all of them) in place; returns the candidates
        and the repairs by span."""
        assert ctx.calib is not None
        values = self.method.values
        ids = ctx.calib.ids[: values["search_windows"]]
        chunk = ctx.ranks.chunk_for(len(ids), self.chunk)  # every rank gets whole chunks of the searched windows
        chosen = spaced(self.cuts, values["max_candidates"])
        spans = {d: depth.closest_span(d) for d, *_ in chosen if d}
        repairs, self.repair_note = {}, None
        if values["depth_repair"] and spans:
            self.repair_note = repair_shortfall(ctx)
            if self.repair_note:
                log.warning("%s", self.repair_note)
            else:
                repairs = least_squares_repair(ctx, self.chunk, [_span(removed) for removed in spans.values()])
        candidates = []
        for d, g, n, predicted in tqdm(chosen, desc="speed search", unit="cut", disable=not ctx.progress):
            removed = spans.get(d, [])
            kept = [i for i in range(ctx.skeleton.num_layers) if i not in removed]
            cuts = choose_cuts(Counts(g, self.shape.group_size, n), self.shape, ranking)
            repair = repairs.get(_span(removed)) if removed else None
            replace = {repair.key: repair.weight} if repair else {}
            ppl = masked_perplexity(ctx, ids, kept, cuts, chunk, self.structure, self.shape, replace)
            candidates.append(Candidate(removed, g, n, predicted, ppl))
        return candidates, repairs

    def output_layers(self, ctx: RunContext) -> int:
        return len(self.kept)

    def config(self, config: dict) -> dict:
        best, shape = self.chosen, self.shape
        size = shape.group_size
        smaller = smaller_config(config, self.structure, shape, best.kv_groups * size, best.kv_groups, best.neurons)
        return per_layer_lists(smaller, self.dense.layers, self.kept)

    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        shape, best = self.shape, self.chosen
        size = shape.group_size
        costs = Costs.of(ctx.skeleton.layers[0], self.structure, shape, ctx.calib.seqlen if ctx.calib else 1)
        before = self.dense.layers * costs.layer(shape.kv_heads, size, shape.intermediate, size)
        after = len(self.kept) * costs.layer(best.kv_groups, size, best.neurons, size)
        speed = {
            "target_speedup": self.target,
            "engine": "transformers",
            "cost_model": self.costs.as_dict(),
            "dense": asdict(self.dense),
            "kept": {
                "layers": len(self.kept),
                "heads": best.kv_groups * size,
                "kv_heads": best.kv_groups,
                "intermediate": best.neurons,
                "head_dim": shape.head_dim,
            },
            "removed_layers": best.removed_layers,
            "repair": self.repair,
            "repair_note": self.repair_note,
            "predicted_speedup": best.predicted_speedup,
            "measured": self.measured,
            "candidates": [asdict(c) for c in self.candidates],
            "candidate_cuts_reaching_target": len(self.cuts),
            "search_windows": min(self.method.values["search_windows"], ctx.calib.count if ctx.calib else 0),
            "parameters": {
                "decoder_before": before,
                "decoder_after": after,
                "removed_fraction_of_decoder": 1 - after / before,
            },
            "mask_tuning": bool(self.settings.structured.mask_tuning),
        }
        return BodyReport(
            pattern="speed",
            sparsity=1 - after / before,
            achieved_sparsity=1 - after / before,
            options=self.method.report_options(),
            sections={"speed": speed, "order": "speed"},
            layers=self.layer_reports,
            timings=self.timings,
        )
