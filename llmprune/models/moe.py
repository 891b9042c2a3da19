"""Mixture-of-experts blocks as transformers 5 builds them (Mixtral, Qwen2/3-MoE, OLMoE, ...): a router module
`gate` (weight [E, D], top_k) that returns (logits, top-k weights, top-k indices), and an `experts` module with
fused parameters `gate_up_proj` [E, 2I, D] and `down_proj` [E, D, I] called as experts(x, indices, weights).
Found by that layout, not by class name; a shared expert (Qwen2-MoE) is an ordinary MLP beside them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmprune.errors import LLMPruneError

FUSED_NAMES = ("gate_up_proj", "down_proj")  # the experts module's parameters, [E, 2I, D] and [E, D, I]
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config names of the routed experts


@dataclass
class MoeBlock:
    """One MoE block of a decoder layer: its name relative to the layer, its router and its experts."""

    name: str
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def fused(self) -> dict[str, nn.Parameter]:
        """The experts' 3-D parameters by name (relative to the experts module)."""
        return {name: getattr(self.experts, name) for name in FUSED_NAMES}

    def expert_hidden(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The input of expert `expert`'s down projection for tokens x: act(x Wg^T) * (x Wu^T), as the fused
        experts module computes it (its gate_up_proj holds the gate rows, then the up rows)."""
        gate, up = nn.functional.linear(x, self.experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return self.experts.act_fn(gate) * up

    def expert_output(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert` on tokens x [T, D], unweighted: the experts module itself, every token routed to it."""
        index = torch.full((x.shape[0], 1), expert, dtype=torch.long, device=x.device)
        return self.experts(x, index, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))


def moe_blocks(layer: nn.Module) -> dict[str, MoeBlock]:
    """The MoE blocks of a decoder layer by relative name (none for a dense layer)."""
    blocks = {}
    for name, module in layer.named_modules():
        router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            continue
        weight = getattr(router, "weight", None)
        fused = [getattr(experts, name, None) for name in FUSED_NAMES]
        if weight is None or weight.dim() != 2 or not hasattr(router, "top_k") or not hasattr(experts, "act_fn"):
            continue
        if any(not isinstance(p, nn.Parameter) or p.dim() != 3 or p.shape[0] != weight.shape[0] for p in fused):
            continue
        blocks[name] = MoeBlock(name, router, experts)
    return blocks


def is_moe(layers: nn.ModuleList) -> bool:
    """Whether any decoder layer has an MoE block."""
    return any(moe_blocks(layer) for layer in layers)


def expert_count_key(config: dict) -> str:
    """The config.json key that holds the routed expert count."""
    key = next((k for k in EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    if key is None:
        raise LLMPruneError(f"config.json names its expert count by none of {', '.join(EXPERT_COUNT_KEYS)}")
    return key


def check_removable(block: MoeBlock) -> None:
    """Refuse a router that holds more than its weight (a per-expert bias, DeepSeek-V3's score correction):
    keep_experts would leave it the removed experts' entries. Reads shapes only (a meta block will do)."""
    extra = [name for name, _ in block.router.named_parameters(recurse=False) if name != "weight"]
    extra += [name for name, _ in block.router.named_buffers(recurse=False)]
    if extra:
        raise LLMPruneError(
            f"{block.name}: the router holds {extra[0]}; llmprune removes experts of routers with a weight only"
        )


def keep_experts(block: MoeBlock, kept: list[int]) -> None:
    """Shrink the block in place to the experts `kept` (in that order, renumbered 0 ..): the router's rows and
    the experts' slices; the counts the modules hold are updated so their forward routes over the kept ones.
    The router must have passed check_removable."""
    index = torch.tensor(kept, dtype=torch.long)
    block.router.weight = nn.Parameter(
        block.router.weight.data[index.to(block.router.weight.device)], requires_grad=False
    )
    for name, param in block.fused().items():
        setattr(block.experts, name, nn.Parameter(param.data[index.to(param.device)], requires_grad=False))
    for module in (block.router, block.experts):
        if hasattr(module, "num_experts"):
            module.num_experts = len(kept)


@dataclass(eq=False)
class ExpertProjection:
    """One expert's projection inside a fused parameter, pruned like a Linear: `weight` is the [out, in] slice
    (a view), `assign` writes a new value into it."""

    experts: nn.Module
    param: str
    expert: int
    rows: slice

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.param).data[self.expert, self.rows]

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def assign(self, value: torch.Tensor) -> None:
        getattr(self.experts, self.param).data[self.expert, self.rows] = value


def projection_names(block: MoeBlock, expert: int) -> tuple[str, str, str]:
    """Expert `expert`'s gate, up and down projections' names relative to the layer (`BLOCK.experts.J.gate_proj`,
    ...), as the per-expert checkpoint tensors of the Qwen-style families are named."""
    base = f"{block.name}.experts.{expert}"
    return f"{base}.gate_proj", f"{base}.up_proj", f"{base}.down_proj"


def expert_projections(block: MoeBlock) -> dict[str, ExpertProjection]:
    """Every expert's gate, up and down projections, by their projection_names."""
    half = block.experts.gate_up_proj.shape[1] // 2
    out = {}
    for expert in range(block.num_experts):
        gate, up, down = projection_names(block, expert)
        out[gate] = ExpertProjection(block.experts, "gate_up_proj", expert, slice(0, half))
        out[up] = ExpertProjection(block.experts, "gate_up_proj", expert, slice(half, 2 * half))
        out[down] = ExpertProjection(block.experts, "down_proj", expert, slice(None))
    return out
