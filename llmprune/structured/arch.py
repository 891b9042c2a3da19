"""Where heads and FFN neurons live in a decoder layer, per model family, and how the config
expresses a uniformly smaller layer or fewer layers."""

from __future__ import annotations

from dataclasses import dataclass

from llmprune.errors import LLMPruneError


@dataclass(frozen=True)
class Structure:
    """Module names (relative to a decoder layer) of the projections whose rows or columns are units."""

    q: str | None  # rows: query heads x head_dim
    k: str | None  # rows: KV heads x head_dim
    v: str | None
    o: str  # columns: query heads x head_dim
    up: tuple[str, ...]  # rows: neurons (gate and up, or fc1)
    down: str  # columns: neurons
    post_attention_norm: str | None  # its input is the residual stream after attention (mask tuning)
    heads: bool = True  # False: the config cannot express fewer heads (OPT derives head_dim)
    inter_key: str = "intermediate_size"
    residual_adds_projections: bool = True  # o/down outputs are added to the residual unchanged (tuning is exact)


LLAMA_LIKE = Structure(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    post_attention_norm="post_attention_layernorm",
)
STRUCTURES = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    # Gemma 3 norms the attention and MLP outputs before the residual add: tuning is not a linear problem there
    "gemma3_text": Structure(
        **{**LLAMA_LIKE.__dict__, "post_attention_norm": None, "residual_adds_projections": False}
    ),
    "opt": Structure(
        q=None,
        k=None,
        v=None,
        o="self_attn.out_proj",
        up=("fc1",),
        down="fc2",
        post_attention_norm=None,
        heads=False,
        inter_key="ffn_dim",
    ),
}


def structure_of(config) -> Structure:
    """The structure of a supported family, or one clear error."""
    model_type = config.get_text_config().model_type
    if model_type not in STRUCTURES:
        raise LLMPruneError(
            f"structured pruning supports {', '.join(sorted(STRUCTURES))} models, not {model_type!r} "
            "(use an unstructured method for it)"
        )
    return STRUCTURES[model_type]


@dataclass(frozen=True)
class Shape:
    """A decoder layer's head and neuron counts."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, config, structure: Structure) -> Shape:
        text = config.get_text_config()
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        return cls(
            heads=heads,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
            hidden=hidden,
            intermediate=int(getattr(text, structure.inter_key)),
        )


def smaller_config(config: dict, structure: Structure, shape: Shape, heads: int, kv_heads: int, neurons: int) -> dict:
    """config.json of the uniformly smaller model (explicit head_dim: it no longer follows hidden/heads)."""
    out = dict(config)
    target = out.get("text_config", out)
    target[structure.inter_key] = neurons
    if structure.heads:
        target["num_attention_heads"] = heads
        target["num_key_value_heads"] = kv_heads
        target["head_dim"] = shape.head_dim
    return out


def per_layer_lists(config: dict, layers: int, kept: list[int]) -> dict:
    """A config (or its text_config) with `num_hidden_layers` and every per-layer list kept in step."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict) and "num_hidden_layers" in out["text_config"]:
        out["text_config"] = per_layer_lists(out["text_config"], layers, kept)
        return out
    for key, value in config.items():
        if isinstance(value, list) and len(value) == layers and key != "architectures":
            out[key] = [value[i] for i in kept]
    out["num_hidden_layers"] = len(kept)
    return out
