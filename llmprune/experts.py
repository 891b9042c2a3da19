"""Expert removal: drop whole routed experts of every mixture-of-experts layer, streamed one layer at a time.

Each expert j of a layer is scored on the layer's own calibration inputs (the outputs of the already-pruned
layers before it):
- "reap" (Lasby et al. 2026, "REAP: Router-weighted Expert Activation Pruning"): the mean, over the tokens
  routed to j, of the router's weight g_j(x) times the norm of the expert's output ||f_j(x)||;
- "frequency": how many tokens chose j.
The same number of lowest-scored experts goes from every MoE layer, so the stock config's expert count
expresses the result; the router's rows go with them, the kept experts are renumbered, shared experts and
`num_experts_per_tok` stay. Stock transformers and vLLM load the output and run it as it is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from llmprune.body import BodyReport, RemovalBody, RunContext
from llmprune.engine.loop import layer_unit
from llmprune.engine.ranks import Ranks
from llmprune.engine.resume import RunState
from llmprune.engine.stream import open_stream
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder
from llmprune.models.moe import MoeBlock, check_removable, expert_count_key, keep_experts, moe_blocks
from llmprune.settings import Configurable, Option


class Reap(Configurable):
    """Which experts go: the lowest REAP saliency (default) or the least often chosen."""

    name = "reap"
    summary = "remove whole MoE experts by router-weighted expert activation (REAP, Lasby et al. 2026)"
    options = (
        Option(
            "expert_score",
            "reap",
            "reap: mean router weight x expert output norm over the tokens routed to the expert (default); "
            "frequency: how many calibration tokens chose the expert",
            choices=("reap", "frequency"),
        ),
    )

    def scores(self, saliency: ExpertSaliency) -> list[float]:
        """Each expert's score (higher is kept)."""
        if self.values["expert_score"] == "frequency":
            return [float(c) for c in saliency.counts]
        return saliency.reap()


EXPERTS: dict[str, type[Reap]] = {Reap.name: Reap}


@dataclass
class ExpertSaliency:
    """Per expert of one MoE block: tokens routed to it, and the sum over them of g_j(x) ||f_j(x)||."""

    counts: list[int]
    weighted_norms: list[float] = field(default_factory=list)

    @classmethod
    def empty(cls, experts: int) -> ExpertSaliency:
        return cls([0] * experts, [0.0] * experts)

    def sum_over(self, ranks: Ranks) -> None:
        """Every rank's counts and sums added (float64, in rank order): a torchrun run's tokens are split."""
        if ranks.active:
            summed = ranks.sum_numbers(*self.counts, *self.weighted_norms)
            experts = len(self.counts)
            self.counts = [int(c) for c in summed[:experts]]
            self.weighted_norms = summed[experts:]

    def reap(self) -> list[float]:
        """The REAP saliency: the mean of g_j(x) ||f_j(x)|| over the tokens routed to j (0 for an unused expert)."""
        return [s / c if c else 0.0 for s, c in zip(self.weighted_norms, self.counts)]

    def add(self, block: MoeBlock, hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
        """Count one chunk's routing (the router's own top-k weights and indices for tokens `hidden`)."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for expert in range(block.num_experts):
            token, slot = torch.where(indices == expert)
            if token.numel() == 0:
                continue
            output = block.expert_output(hidden[token], expert).double()
            gate = weights[token, slot].double()
            self.counts[expert] += int(token.numel())
            self.weighted_norms[expert] += float((gate * output.norm(dim=-1)).sum())


def kept_experts(scores: list[float], keep: int) -> list[int]:
    """The `keep` highest-scored experts, in their original order (ties go to the lower index)."""
    ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(ranked[:keep])


def layer_saliency(stream, index: int, layer, acts, blocks: dict[str, MoeBlock]) -> dict[str, ExpertSaliency]:
    """One pass of layer `index` over every chunk, the routers hooked: each block's expert saliencies."""
    saliency = {name: ExpertSaliency.empty(block.num_experts) for name, block in blocks.items()}

    def hook_for(name: str):
        def hook(module, args, output) -> None:
            _, weights, indices = output
            with torch.autocast(args[0].device.type, enabled=False):
                saliency[name].add(blocks[name], args[0], weights, indices)

        return hook

    handles = [block.router.register_forward_hook(hook_for(name)) for name, block in blocks.items()]
    try:
        with torch.no_grad():
            for chunk in acts:
                stream.run(index, layer, chunk)
    finally:
        for handle in handles:
            handle.remove()
    return saliency


class ExpertsBody(RemovalBody):
    """Remove the same number of routed experts from every MoE layer and write the smaller MoE model."""

    kind = "experts"
    sections = ("removal",)
    distributed = True

    def check_model(self, ctx: RunContext) -> None:
        if self.by_flops:
            raise LLMPruneError(
                "--target-flops: removing experts keeps the FLOPs per token (each token still runs "
                "num_experts_per_tok experts); give --remove, the fraction of routed experts to remove"
            )
        blocks = [block for layer in ctx.skeleton.layers for block in moe_blocks(layer).values()]
        if not blocks:
            raise LLMPruneError(f"--method {self.settings.method}: {ctx.folder.name} has no mixture-of-experts layer")
        counts = {block.num_experts for block in blocks}
        if len(counts) > 1:
            raise LLMPruneError(f"{ctx.folder.name}: MoE layers with different expert counts {sorted(counts)}")
        for block in blocks:
            check_removable(block)
        self.experts = counts.pop()
        self.top_k = max(block.top_k for block in blocks)
        self.remove = round((1 - self.keep) * self.experts)
        if self.experts - self.remove < self.top_k:
            raise LLMPruneError(
                f"--remove {1 - self.keep:g} leaves {self.experts - self.remove} of {self.experts} experts, fewer than "
                f"the {self.top_k} each token is routed to (num_experts_per_tok); remove at most "
                f"{(self.experts - self.top_k) / self.experts:.3g}"
            )

    def describe(self, ctx: RunContext) -> str:
        score = self.method.values["expert_score"]
        per_layer = f"remove {self.remove} of {self.experts} experts per MoE layer"
        return f"{self.settings.method} ({score}): {per_layer} of {ctx.where()}"

    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        assert ctx.calib is not None
        started = time.perf_counter()
        skeleton, cpu, ranks = ctx.skeleton, torch.device("cpu"), ctx.ranks
        ids = ranks.part(ctx.calib.ids, self.chunk)  # each rank routes its shard of the windows
        stream, acts = open_stream(skeleton, ids, ctx.device, self.chunk, cpu)
        keep = self.experts - self.remove
        self.layers: list[dict] = []
        for index in tqdm(range(skeleton.num_layers), desc="experts", unit="layer", disable=not ctx.progress):
            layer = skeleton.load_layer(index, ctx.device, stream.dtype)
            blocks = moe_blocks(layer)
            record: dict = {"index": index, "blocks": {}}
            if blocks and self.remove:
                for name, saliency in layer_saliency(stream, index, layer, acts, blocks).items():
                    saliency.sum_over(ranks)
                    scores = self.method.scores(saliency)
                    kept = kept_experts(scores, keep)
                    keep_experts(blocks[name], kept)
                    record["blocks"][name] = {
                        "reap": saliency.reap(),
                        "tokens": saliency.counts,
                        "kept": kept,
                        "removed": [j for j in range(self.experts) if j not in kept],
                    }
            stream.forward(index, layer, acts)
            if ranks.main:
                tensors = skeleton.stored(skeleton.layer_tensors(index, layer, ctx.save_dtype))
                writer.write_unit(layer_unit(index), tensors)
            skeleton.unload_layer(index)
            self.layers.append(record)
        stream.close()
        self.timings = {"prune_seconds": round(time.perf_counter() - started, 2)}

    def config(self, config: dict) -> dict:
        return {**config, expert_count_key(config): self.experts - self.remove}

    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        skeleton = ctx.skeleton
        after = sum(p.numel() for layer in skeleton.layers for p in layer.parameters())  # meta shapes, as written
        dense = sum(skeleton.layer_parameters(i) for i in range(skeleton.num_layers))
        return BodyReport(
            pattern="experts",
            sparsity=1 - after / dense,
            achieved_sparsity=1 - after / dense,
            options=self.method.report_options(),
            sections={
                "experts": {
                    "budget": self.budget(),
                    "dense_experts": self.experts,
                    "kept_experts": self.experts - self.remove,
                    "experts_per_token": self.top_k,
                    "parameters": {"decoder_before": dense, "decoder_after": after},
                },
                "order": "experts",
            },
            layers=self.layers,
            timings=self.timings,
        )
