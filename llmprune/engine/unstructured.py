"""The unstructured / N:M body of the run skeleton: plan the memory, then stream the decoder layers,
pruning each Linear with the method (magnitude, Wanda, SparseGPT, ...) and committing each layer so a
killed run resumes."""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from llmprune.body import Body, BodyReport, RunContext, log
from llmprune.engine.devices import (
    available_memory,
    check_forward_mix,
    compute_dtype,
    cpu_has_native_bf16,
    default_chunk,
    forward_dtype,
    is_absent,
    parse_forward_dtype,
    solver_devices,
)
from llmprune.engine.loop import prune_layers, rank_work
from llmprune.engine.owl import layer_outlier_ratios, owl_profile
from llmprune.engine.parking import Parking
from llmprune.engine.plan import Geometry, MemoryPlan, Request, choice_from_dict, choice_to_dict, make_plan
from llmprune.engine.prune_layer import LayerPruner, TargetRule, find_targets
from llmprune.engine.ranks import largest_shard, largest_shard_rows
from llmprune.engine.resume import RunState
from llmprune.errors import LLMPruneError
from llmprune.export.writer import OutputFolder
from llmprune.methods.base import PruningMethod
from llmprune.methods.quantize import quantizing
from llmprune.models.compressed import quantization_config
from llmprune.models.moe import ExpertProjection
from llmprune.pattern import Pattern
from llmprune.scheme import SCHEMES, quant_scheme
from llmprune.settings import Settings, parse_budget_text


def parse_budgets(text: str | None, device: torch.device) -> tuple[int, int | None]:
    """--max-memory as (compute device budget, host budget on a GPU run); default: what is free."""
    values = parse_budget_text(text)
    own = values.get(device.type, values.get(""))
    budget = own if own is not None else available_memory(device)
    if device.type != "cuda":
        return budget, None
    return budget, values["cpu"] if "cpu" in values else available_memory(torch.device("cpu"))


class UnstructuredBody(Body):
    """Prune every target Linear of every decoder layer to a sparsity pattern."""

    kind = "unstructured"
    sections = ("unstructured",)
    resumable = True
    distributed = True

    def __init__(self, settings: Settings, method: type[PruningMethod]) -> None:
        super().__init__(settings, method)
        options = settings.unstructured
        self.pattern = Pattern.parse(options.pattern, options.sparsity)
        self.scheme = quant_scheme(options.quantize)
        self.ignored: list[str] = []  # the Linears a quantized checkpoint leaves in floating point
        self.rule = TargetRule(tuple(options.targets), tuple(options.ignore))
        self.plan_result: MemoryPlan | None = None
        self.targets: list[dict] = []

    @property
    def tag(self) -> str:
        return self.pattern.tag + (f"-{self.scheme.name}" if self.scheme else "")

    @property
    def plans_absent_devices(self) -> bool:
        return self.settings.unstructured.plan_only

    def check_device(self, device: torch.device) -> None:
        self.forward_request = parse_forward_dtype(self.settings.unstructured.forward_dtype, device)
        self.budgets = parse_budgets(self.settings.unstructured.max_memory, device)
        self.solvers = solver_devices(device, self.settings.unstructured.solver_devices)

    def check_model(self, ctx: RunContext) -> None:
        self.fdtype = forward_dtype(ctx.device, ctx.skeleton.dtype, self.forward_request)
        self.cdtype = compute_dtype(ctx.device, ctx.skeleton.dtype, self.fdtype)
        check_forward_mix(self.cdtype, self.fdtype)
        if ctx.device.type == "cpu" and self.fdtype == torch.bfloat16 and not cpu_has_native_bf16():
            log.info("note: this CPU has no native bfloat16 (AVX512-BF16 or AMX); a float32 forward is faster")
        as_ranks = ctx.ranks.planned(self.settings.unstructured.plan_ranks).active  # a launch, or the plan of one
        if as_ranks and self.settings.unstructured.solver_devices:
            raise LLMPruneError(
                "--solver-devices: under torchrun every rank solves its share of each layer on its own GPU; "
                "drop the flag (or run one process with --solver-devices)"
            )
        self.solvers = [] if as_ranks else self.solvers
        self.targets = self._check_targets(ctx)
        self.moe = any(isinstance(m, ExpertProjection) for targets in self.targets for m in targets.values())
        if self.moe and self.scheme is not None:
            raise LLMPruneError(
                f"--quantize {self.scheme.name}: llmprune does not quantize mixture-of-experts models yet (prune them "
                "without --quantize)"
            )
        if self.moe and self.settings.unstructured.order == "sequential":
            raise LLMPruneError("--order sequential: expert weights are pruned in the parallel order only")
        if self.scheme is not None:
            self.scheme = self.scheme.for_widths({m.in_features for t in self.targets for m in t.values()})
            if self.scheme.group_size != SCHEMES[self.scheme.name].group_size:
                log.info("--quantize %s: groups of %d inputs (the widths are not multiples of %d)", self.scheme.name,
                         self.scheme.group_size, SCHEMES[self.scheme.name].group_size)  # fmt: skip
            self.method_class = quantizing(self.method_class, self.scheme, ctx.save_dtype)
            prefix = ctx.skeleton.layers_prefix
            chosen = {f"{prefix}.{i}.{name}" for i, targets in enumerate(self.targets) for name in targets}
            linears = (name for name, module in ctx.skeleton.model.named_modules() if isinstance(module, nn.Linear))
            self.ignored = [name for name in linears if name not in chosen]

    def _check_targets(self, ctx: RunContext) -> list[dict]:
        """Before any weight is read: targets exist and N:M fits their widths (shapes from the meta model)."""
        by_layer = []
        skeleton = ctx.skeleton
        for index, layer in enumerate(skeleton.layers):
            prefix = f"{skeleton.layers_prefix}.{index}"
            targets = find_targets(layer, prefix, self.rule)
            by_layer.append(targets)
            for name, module in targets.items():
                self.pattern.check_width(module.in_features, f"{prefix}.{name}")
        if not any(by_layer):
            raise LLMPruneError(f"no Linear module matches --targets {' '.join(self.rule.include)} (minus --ignore)")
        return by_layer

    def fingerprint(self, ctx: RunContext) -> dict:
        return {"pattern": str(self.pattern), "sparsity": self.pattern.sparsity, "forward_dtype": str(self.fdtype)}

    def plan(self, ctx: RunContext, saved: RunState | None) -> dict | None:
        assert ctx.calib is not None
        settings, calib, ranks = self.settings, ctx.calib, ctx.ranks
        planned = ranks.planned(settings.unstructured.plan_ranks)
        chunk = settings.common.batch_size or default_chunk(calib.count, calib.seqlen, ctx.device)
        chunk = planned.chunk_for(calib.count, chunk)  # every rank gets whole chunks of windows
        request = Request(
            windows=calib.count,  # each rank holds its shard of the activations (and of the held-out windows)
            world=planned.world,
            seqlen=calib.seqlen,
            eval_windows=ctx.eval_windows.count if ctx.eval_windows else 0,
            chunk=chunk,
            order=settings.unstructured.order,
            parallel_only=self.moe,
            park=settings.unstructured.park,
            method=self.method_class,
            method_options=dict(settings.method_options),
            embedding_rows=functools.cache(functools.partial(largest_shard_rows, calib.ids, world=planned.world)),
            activations=settings.unstructured.activations,
            compute_dtype=self.cdtype,
            model_dtype=ctx.skeleton.dtype,
            save_dtype=ctx.save_dtype,
            stats_dtype=ranks.reduce_dtype,
            row_shards=planned.world if self.method_class.solves_rows() else 1,
        )
        budget, host_budget = self.budgets
        plan = make_plan(
            Geometry.of(ctx.skeleton, self.targets), request, ctx.device, budget, host_budget, ctx.overhead
        )
        if ranks.active:  # every rank streams rank 0's chunks (chunk_for's size, or a half that still deals each
            plan.choice = ranks.broadcast_object(plan.choice)  # rank whole chunks) in the order rank 0's plan chose
        if saved is not None:
            plan.choice = choice_from_dict(saved.choice)
            plan.adaptations.append(f"resuming at layer {saved.next_layer} with the saved choices")
        if planned.active:
            shards = [f"{largest_shard(calib.count, plan.choice.chunk, planned.world)} of {calib.count} calibration"]
            if ctx.eval_windows:
                shards.append(f"{largest_shard(ctx.eval_windows.count, plan.choice.chunk, planned.world)} of "
                              f"{ctx.eval_windows.count} held-out")  # fmt: skip
            rows = f", 1/{planned.world} of each Linear's rows" if request.row_shards > 1 else ""
            plan.notes.append(f"one rank of {planned.world}: {' and '.join(shards)} windows at most{rows}")
        if is_absent(ctx.device):
            plan.notes.append(
                f"planned for {ctx.device}, which this machine does not have: the GPU defaults (layers in "
                f"{str(self.cdtype).removeprefix('torch.')}, chunks of up to {request.chunk} windows) and the "
                "budget given"
            )
        self.plan_result = plan
        if settings.unstructured.plan_only:
            return {"memory_plan": plan.as_dict(), "plan": plan.render()}
        log.info("%s", plan.render())
        values = dict(settings.method_options)
        if self.method_class.inverse_option:
            values[self.method_class.inverse_option] = plan.choice.inverse_dtype
        self.method = self.method_class(**values)
        return None

    @property
    def eval_chunk(self) -> int:
        assert self.plan_result is not None
        return self.plan_result.choice.chunk

    def state_choice(self) -> dict:
        assert self.plan_result is not None
        return choice_to_dict(self.plan_result.choice)

    def config(self, config: dict) -> dict:
        if self.scheme is None:
            return config
        return {**config, "quantization_config": quantization_config(self.scheme, self.ignored)}

    def describe(self, ctx: RunContext) -> str:
        calib = ctx.calib
        assert calib is not None
        quantized = f", quantized {self.scheme.name}" if self.scheme else ""
        return (
            f"{self.settings.method} {self.pattern} sparsity {self.pattern.sparsity:g}{quantized} on {ctx.folder.name} "
            f"({ctx.skeleton.num_layers} layers, {ctx.device.type}, forward in "
            f"{str(self.fdtype).removeprefix('torch.')}); calibration {calib.count} x {calib.seqlen} tokens "
            f"from {calib.source}"
        )

    def layer_patterns(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> list[Pattern] | None:
        """Each layer's pattern under a non-uniform --sparsity-profile (None: uniform). OWL's outlier ratios take
        a streamed pass of the dense model before layer 0; the profile is kept in the run state, so a resumed
        run prunes to the same sparsities."""
        options = self.settings.unstructured
        if options.sparsity_profile == "uniform":
            return None
        assert self.plan_result is not None and ctx.calib is not None
        if state.profile is None:
            started = time.perf_counter()
            ratios = layer_outlier_ratios(
                ctx.skeleton,
                ctx.calib.ids,
                ctx.device,
                self.cdtype,
                self.plan_result.choice,
                self.rule,
                options.owl_m,
                rank_work(writer.work, ctx.ranks),
                not ctx.progress,
                forward_dtype=self.fdtype,
                ranks=ctx.ranks,
            )
            sizes = [sum(m.in_features * m.out_features for m in targets.values()) for targets in self.targets]
            seconds = time.perf_counter() - started
            state.profile = owl_profile(ratios, sizes, self.pattern, options.owl_lambda, options.owl_m, seconds)
            state.prune_seconds += seconds  # the statistics pass is part of the pruning's cost
            if ctx.ranks.main:
                state.save(writer.work)
            sparsities = [layer["sparsity"] for layer in state.profile["layers"]]
            log.info("OWL sparsities %.3f .. %.3f (%.0f s)", min(sparsities), max(sparsities), seconds)
        return [Pattern(layer["sparsity"]) for layer in state.profile["layers"]]

    def prune(self, ctx: RunContext, writer: OutputFolder, state: RunState) -> None:
        assert self.plan_result is not None and ctx.calib is not None
        patterns = self.layer_patterns(ctx, writer, state)
        choice = self.plan_result.choice
        pruner = LayerPruner(
            self.method,
            self.pattern,
            self.rule,
            choice.order,
            save_dtype=ctx.save_dtype,
            parking=Parking(choice.park),
            devices=self.solvers,
            uncovered=self.settings.unstructured.uncovered_experts,
            ranks=ctx.ranks,
        )
        prune_layers(
            ctx.skeleton,
            ctx.calib.ids,
            ctx.device,
            self.cdtype,
            choice,
            pruner,
            writer,
            state,
            ctx.save_dtype,
            f"{self.settings.method} {self.pattern}",
            not ctx.progress,
            forward_dtype=self.fdtype,
            patterns=patterns,
            ranks=ctx.ranks,
        )

    def quantization_section(self, ctx: RunContext) -> dict:
        """The report's record of the quantization: the scheme, how it was solved, and the checkpoint format."""
        assert self.scheme is not None
        return {
            "scheme": self.scheme.name,
            "bits": self.scheme.bits,
            "group_size": self.scheme.group_size,
            "activations": "int8 dynamic per token" if self.scheme.dynamic_activations else "unquantized",
            "solve": self.method_class.solve_description(self.pattern),
            "scale_dtype": str(ctx.save_dtype).removeprefix("torch."),
            "format": f"compressed-tensors {self.scheme.format}",
            "ignore": self.ignored,
        }

    def experts_section(self, layers: list[dict]) -> dict:
        """The report's record of the MoE experts: which received no calibration token, and what was done."""
        experts = [m for layer in layers for m in layer["modules"] if "tokens" in m]
        return {
            "projections": len(experts),
            "uncovered": sorted({m["name"].rpartition(".")[0] for m in experts if m.get("uncovered")}),
            "uncovered_policy": self.settings.unstructured.uncovered_experts,
            "fewest_tokens": min((m["tokens"] for m in experts), default=0),
        }

    def report(self, ctx: RunContext, state: RunState) -> BodyReport:
        assert self.plan_result is not None
        plan, layers = self.plan_result, state.layers
        pruned = sum(m["sparsity"] * m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
        total = sum(m["shape"][0] * m["shape"][1] for lay in layers for m in lay["modules"])
        options = self.settings.unstructured
        return BodyReport(
            pattern=str(self.pattern),
            sparsity=self.pattern.sparsity,
            achieved_sparsity=pruned / total if total else 0.0,
            options=self.method.report_options(),
            sections={
                "order": plan.choice.order,
                "targets": {"include": list(options.targets), "ignore": list(options.ignore)},
                "batch_size": plan.choice.chunk,
                "memory_plan": plan.as_dict(),
                "forward_dtype": str(self.fdtype).removeprefix("torch."),
                "solver_devices": [str(d) for d in self.solvers],
                **({"quantization": self.quantization_section(ctx)} if self.scheme else {}),
                **({"moe": self.experts_section(layers)} if self.moe else {}),
                "sparsity_profile": state.profile or {"profile": "uniform"},
            },
            layers=layers,
            timings={"prune_seconds": round(state.prune_seconds, 2)},
            damping_retries=sum(lay["damping_retries"] for lay in layers),
        )
