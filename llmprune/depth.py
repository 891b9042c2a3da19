"""Depth removal: drop whole decoder layers, chosen from statistics of one streamed pass of the dense model.

- "angular" (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): the span of n
  consecutive layers whose input and output are closest, by the angular distance arccos(cos(h_l, h_{l+n}))/pi
  of the last token's hidden state, averaged over the calibration windows;
- "influence" (ShortGPT, Men et al. 2024): the n layers of least block influence 1 - cos(x_in, x_out),
  averaged over every calibration token;
- "perplexity" (BlockPruner-style, Zhong et al. 2024): n greedy steps, each removing the layer whose removal
  raises the calibration windows' loss least, every candidate evaluated by a streamed forward (one layer in
  memory; n x L^2 layer forwards, so keep --samples small for deep models).

The output is the same architecture with fewer `num_hidden_layers` (layers renumbered, per-layer config lists
such as `layer_types` kept in step), so stock transformers and vLLM load it and run it faster.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llmprune.body import BodyReport, RemovalBody, RunContext, log
from llmprune.engine.activations import Activations
from llmprune.engine.loop import layer_unit
from llmprune.engine.resume import RunState
from llmprune.engine.stream import open_stream
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder
from llmprune.models.skeleton import cast_floating
from llmprune.settings import Configurable, Option
from llmprune.structured.arch import per_layer_lists

DEPTH_REPAIR = Option(
    "depth_repair",
    True,
    "skip the least-squares refit of the down projection of the layer before each removed span (by "
    "default its output is fitted to the dense hidden state after the span, folded into the weight)",
    flag="--no-depth-repair",
)  # the speed search's depth cuts take it too


class Depth(Configurable):
    """Which layers go: the most redundant span (angular) or the least influential layers (influence)."""

    name = "depth"
    summary = "remove whole decoder layers: angular distance (Gromov et al. 2024) or block influence (ShortGPT)"
    options = (
        Option(
            "depth_criterion",
            "angular",
            "angular: the span of layers whose input and output are closest (default); influence: the layers "
            "of least block influence 1 - cos(in, out); perplexity: greedy, the layer whose removal raises the "
            "calibration loss least, one at a time",
            choices=("angular", "influence", "perplexity"),
        ),
        DEPTH_REPAIR,
    )

    def choose(self, scores: DepthScores, remove: int, search: list[dict] | None = None) -> list[int]:
        """The layers to remove, from the streamed scores (or the perplexity search's steps)."""
        if self.values["depth_criterion"] == "perplexity":
            assert search is not None
            return sorted(step["removed"] for step in search)
        if self.values["depth_criterion"] == "influence":
            influence = scores.block_influence
            return sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:remove])
        return scores.closest_span(remove)


DEPTH: dict[str, type[Depth]] = {Depth.name: Depth}


@dataclass
class DepthScores:
    """Each layer's block influence (1 - cos(in, out), over every token), and the last token's hidden state of
    every window at every layer boundary (entering layer l; the last one is the decoder's output)."""

    block_influence: list[float]
    last_tokens: list[torch.Tensor]  # [windows, hidden] per boundary

    def angular_distance(self, span: int) -> list[float]:
        """arccos(cos(h_l, h_{l+span}))/pi averaged over the windows, for every first layer l."""
        ends = self.last_tokens
        return [
            float(torch.nn.functional.cosine_similarity(ends[start], ends[start + span], dim=-1)
                  .clamp(-1, 1).acos().mean() / math.pi)
            for start in range(len(ends) - span)
        ]  # fmt: skip

    def closest_span(self, span: int) -> list[int]:
        """The `span` consecutive layers whose input and output are closest (Gromov et al.)."""
        distances = self.angular_distance(span)
        start = min(range(len(distances)), key=lambda i: distances[i])
        return list(range(start, start + span))


def depth_scores(ctx: RunContext, chunk: int) -> DepthScores:
    """One streamed pass of the dense model: each layer's block influence and the last tokens' states at every
    layer boundary. Under torchrun each rank streams its shard of the windows: the cosine sums are added across
    ranks and the last tokens gathered in window order."""
    assert ctx.calib is not None
    skeleton, cpu, ranks = ctx.skeleton, torch.device("cpu"), ctx.ranks
    stream, acts = open_stream(skeleton, ranks.part(ctx.calib.ids, chunk), ctx.device, chunk, cpu)
    dtype = stream.dtype
    boundaries: list[torch.Tensor] = []  # [windows, hidden] last-token states entering each layer, then the output
    influence = []
    for index in tqdm(range(skeleton.num_layers), desc="depth scores", unit="layer", disable=not ctx.progress):
        layer = skeleton.load_layer(index, ctx.device, dtype)
        cosines, tokens, last = 0.0, 0, []
        with torch.no_grad():
            for position in range(len(acts)):
                x = acts.get(position)
                out = stream.run(index, layer, x).to(cpu, dtype)
                cosines += float(torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1).sum())
                tokens += x.shape[0] * x.shape[1]
                last.append(x[:, -1].float())
                acts.put(position, out)
        boundaries.append(torch.cat(ranks.gather_objects(torch.cat(last))))
        cosines, tokens = ranks.sum_numbers(cosines, tokens)
        influence.append(1 - cosines / tokens)
        skeleton.unload_layer(index)
    ends = torch.cat([acts.get(position)[:, -1].float() for position in range(len(acts))])
    boundaries.append(torch.cat(ranks.gather_objects(ends)))
    stream.close()
    return DepthScores(influence, boundaries)


def greedy_search(ctx: RunContext, chunk: int, remove: int) -> list[dict]:
    """BlockPruner-style search: `remove` steps, each removing the layer whose removal gives the lowest loss on
    the calibration windows. Each candidate is a streamed forward from the embeddings through the kept layers
    (one layer in memory at a time); returns the steps: the layer removed and the perplexity after it. Under
    torchrun each rank scores its shard of the windows and the losses are added across ranks."""
    assert ctx.calib is not None
    skeleton, cpu = ctx.skeleton, torch.device("cpu")
    stream, start = open_stream(skeleton, ctx.ranks.part(ctx.calib.ids, chunk), ctx.device, chunk, cpu)
    removed: list[int] = []
    steps = []
    total = sum(skeleton.num_layers - step for step in range(remove))  # candidates over all steps
    with tqdm(total=total, desc="depth search", unit="candidate", disable=not ctx.progress) as bar:
        for _ in range(remove):
            kept = [i for i in range(skeleton.num_layers) if i not in removed]
            best: tuple[float, int] | None = None
            for candidate in kept:
                acts = Activations([piece.clone() for piece in start.chunks])
                for index in kept:
                    if index != candidate:
                        stream.forward(index, skeleton.load_layer(index, ctx.device, stream.dtype), acts)
                        skeleton.unload_layer(index)
                nll, tokens = ctx.ranks.sum_numbers(*stream.nll(acts))
                if best is None or nll < best[0]:
                    best = (nll, candidate)
                bar.update(1)
            assert best is not None
            removed.append(best[1])
            steps.append({"removed": best[1], "perplexity": math.exp(best[0] / tokens)})
    stream.close()
    return steps


REPAIR_DAMPING = 0.01  # ridge toward the original weight, as a fraction of the activations' mean square
SKIP = 1  # each window's first tokens, left out of the fit: the attention sink's hidden states dwarf the rest
REPAIR_TOKENS_PER_INPUT = 2  # the fit needs this many calibration tokens per FFN neuron, or it overfits


def repair_shortfall(ctx: RunContext) -> str | None:
    """Why the repair cannot be fit on these calibration windows (too few tokens for the FFN width), or None.
    On SmolLM2-135M (FFN 1536) 4,080 tokens fit well (10% removed: 39.96 perplexity, 50.28 unrepaired) and
    1,016 overfit (533.9 against 75.21)."""
    from llmprune.structured.arch import Shape, structure_of

    assert ctx.calib is not None
    config = ctx.skeleton.config
    width = Shape.of(config, structure_of(config)).intermediate
    tokens = ctx.calib.count * (ctx.calib.seqlen - SKIP)
    if tokens >= REPAIR_TOKENS_PER_INPUT * width:
        return None
    return (
        f"depth repair skipped: {tokens} calibration tokens are too few to fit {width} FFN inputs (it needs "
        f"{REPAIR_TOKENS_PER_INPUT * width}; raise --samples or --seqlen)"
    )


def spans_of(layers: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive layers as (first, end) with `end` exclusive: [3, 4, 7] -> [(3, 5), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


@dataclass
class Repair:
    """The refit down projection of layer `layer` for the removed span [first, end): its state-dict name and new
    weight, and the residual's error after the fit relative to before (the fit's own windows)."""

    layer: int
    span: tuple[int, int]
    key: str
    weight: torch.Tensor
    error_after: float

    def as_dict(self) -> dict:
        return {"layer": self.layer, "span": list(self.span), "error_before": 1.0, "error_after": self.error_after}


def least_squares_repair(ctx: RunContext, chunk: int, spans: list[tuple[int, int]]) -> dict[tuple[int, int], Repair]:
    """One streamed pass of the dense model: for every span [s, e) of layers to remove (s > 0), the down
    projection W of layer p = s - 1 is refit to W + ΔW, ΔW = (R^T A)(A^T A + λ I)^-1 (ridge toward W), A the
    projection's inputs and R the residual the span would have added (the dense hidden state entering layer e
    minus layer p's output), so that layer p's output approximates what layer e would have seen. The spans may
    overlap (a search's candidates): each is its own fit. Layer p's inputs are held (float32, CPU) until its
    last span ends.

    Each chunk's products are taken in float32 and added in float64, so the sums do not depend on how the
    windows are grouped: under torchrun each rank streams its shard and the sums are added across ranks (in rank
    order), and the fit equals one process's."""
    from llmprune.structured.arch import structure_of

    assert ctx.calib is not None
    skeleton, cpu, ranks = ctx.skeleton, torch.device("cpu"), ctx.ranks
    down = structure_of(skeleton.config).down
    spans = sorted({(first, end) for first, end in spans if first > 0})
    if not spans:
        return {}
    ends: dict[int, list[int]] = {}  # p -> the ends of its spans
    for first, end in spans:
        ends.setdefault(first - 1, []).append(end)
    stream, acts = open_stream(skeleton, ranks.part(ctx.calib.ids, chunk), ctx.device, chunk, cpu)
    held: dict[int, tuple[list, list, torch.Tensor]] = {}  # p -> (a per chunk, p's output per chunk, A^T A)
    sums: dict[tuple[int, int], list] = {}  # span -> [R^T A, ||R||²]

    def close(index: int) -> None:  # acts hold the input of layer `index`: the target of the spans ending there
        for p in [p for p in held if index in ends[p]]:
            inputs, outputs, _ = held[p]
            rta, rtr = 0.0, 0.0
            for position, (a, out) in enumerate(zip(inputs, outputs)):
                r = (acts.get(position)[:, SKIP:].float() - out).flatten(0, -2)
                rta, rtr = rta + (r.T @ a).double(), rtr + float(r.pow(2).sum())
            (rtr,) = ranks.sum_numbers(rtr)
            sums[(p + 1, index)] = [ranks.sum_(rta), rtr, held[p][2]]
            if index == max(ends[p]):
                del held[p]

    last = max(end for _, end in spans)
    for index in tqdm(range(last), desc="depth repair", unit="layer", disable=not ctx.progress):
        close(index)
        layer = skeleton.load_layer(index, ctx.device, stream.dtype)
        captured: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        handle = None
        if index in ends:
            handle = layer.get_submodule(down).register_forward_pre_hook(
                lambda m, args, into=captured: into.append(args[0].detach()[:, SKIP:].flatten(0, -2).to(cpu).float())
            )
        with torch.no_grad():
            for position in range(len(acts)):
                out = stream.run(index, layer, acts.get(position)).to(cpu, stream.dtype)
                if handle is not None:
                    outputs.append(out[:, SKIP:].float())
                acts.put(position, out)
        if handle is not None:
            handle.remove()
            held[index] = (captured, outputs, ranks.sum_(sum((a.T @ a).double() for a in captured)))
        skeleton.unload_layer(index)
    close(last)
    stream.close()

    repairs = {}
    for (first, end), (rta, rtr, ata) in sums.items():
        p = first - 1
        eye = torch.eye(ata.shape[0], dtype=torch.float64)
        delta = torch.linalg.solve(ata + REPAIR_DAMPING * ata.diagonal().mean().clamp_min(1e-12) * eye, rta.T).T
        error = rtr - 2 * float((delta * rta).sum()) + float(((delta @ ata) * delta).sum())
        key = f"{skeleton.layers_prefix}.{p}.{down}.weight"
        original = skeleton.read([key])[key]
        weight = (original.double() + delta).to(original.dtype)
        repairs[(first, end)] = Repair(p, (first, end), key, weight, error / max(rtr, 1e-30))
    return repairs


class DepthBody(RemovalBody):
    """Remove whole decoder layers and write the shallower model, layers renumbered."""

    kind = "depth"
    sections = ("removal",)
    distributed = True  # the scores, the search's losses and the repair's sums are added across ranks

    def check_model(self, ctx: RunContext) -> None:
        if self.method.values["depth_repair"]:
            from llmprune.structured.arch import structure_of

            structure_of(ctx.skeleton.config)  # the families whose down projection llmprune knows
        layers = ctx.skeleton.num_layers
        self.remove = round((1 - self.keep) * layers)  # the layers are alike: parameters and FLOPs go with them
        if self.remove < 1:
            raise LLMPruneError(f"removing {1 - self.keep:.0%} of {layers} layers removes no layer; remove more")
        if self.remove >= layers:
            raise LLMPruneError(f"removing {1 - self.keep:.0%} of {layers} layers removes every layer; remove less")

    def describe(self, ctx: RunContext) -> str:
        return f"depth ({self.method.values['depth_criterion']}): remove {self.remove} layers of {ctx.where()}"

    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        started = time.perf_counter()
        self.scores = depth_scores(ctx, self.chunk)
        self.search = None
        if self.method.values["depth_criterion"] == "perplexity":
            self.search = greedy_search(ctx, self.chunk, self.remove)
        self.removed = self.method.choose(self.scores, self.remove, self.search)
        self.kept = [i for i in range(ctx.skeleton.num_layers) if i not in self.removed]
        repaired, self.repairs, self.repair_note = {}, None, None
        if self.method.values["depth_repair"]:
            self.repair_note = repair_shortfall(ctx)
            if self.repair_note:
                log.warning("%s", self.repair_note)
            else:
                repairs = least_squares_repair(ctx, self.chunk, spans_of(self.removed)).values()
                repaired, self.repairs = {r.key: r.weight for r in repairs}, [r.as_dict() for r in repairs]
        scored = time.perf_counter()
        skeleton = ctx.skeleton
        for new, old in enumerate(self.kept if ctx.ranks.main else []):  # rank 0 writes
            source, target = f"{skeleton.layers_prefix}.{old}.", f"{skeleton.layers_prefix}.{new}."
            tensors = skeleton.stored(  # the repaired down projection, if any, replaces the layer's own
                {
                    **skeleton.read(skeleton.layer_keys(old)),
                    **{k: v for k, v in repaired.items() if k.startswith(source)},
                }
            )
            if any(not key.startswith(source) for key in tensors):  # renumbered by the prefix the model uses
                raise LLMPruneError(f"{ctx.folder.name}: its checkpoint names layer {old}'s tensors unlike the model")
            writer.write_unit(
                layer_unit(new),
                {target + key[len(source) :]: cast_floating(value, ctx.save_dtype) for key, value in tensors.items()},
            )
        self.timings = {
            "score_seconds": round(scored - started, 2),
            "write_seconds": round(time.perf_counter() - scored, 2),
            "prune_seconds": round(time.perf_counter() - started, 2),
        }

    def output_layers(self, ctx: RunContext) -> int:
        return len(self.kept)

    def config(self, config: dict) -> dict:
        return per_layer_lists(config, len(self.kept) + len(self.removed), self.kept)

    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        skeleton = ctx.skeleton
        sizes = [skeleton.layer_parameters(i) for i in range(skeleton.num_layers)]
        before, after = sum(sizes), sum(sizes[i] for i in self.kept)
        influence = self.scores.block_influence
        return BodyReport(
            pattern="depth",
            sparsity=1 - after / before,
            achieved_sparsity=1 - after / before,
            options=self.method.report_options(),
            sections={
                "depth": {
                    "budget": self.budget(),
                    "dense_layers": skeleton.num_layers,
                    "kept_layers": len(self.kept),
                    "removed_layers": self.removed,
                    "parameters": {"decoder_before": before, "decoder_after": after},
                    "block_influence": influence,
                    "angular_distance": self.scores.angular_distance(self.remove),
                    "search": self.search,
                    "repairs": self.repairs,
                    "repair_note": self.repair_note,
                },
                "order": "depth",
            },
            layers=[
                {"index": i, "block_influence": influence[i], "removed": i in self.removed, "parameters": sizes[i]}
                for i in range(skeleton.num_layers)
            ],
            timings=self.timings,
        )
