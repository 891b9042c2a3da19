"""Tiny random-weight models of several architectures, written as real safetensors folders."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma3_text", "opt", "gpt_neox", "phi3"]
MOE_ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]  # fused experts in transformers 5


def moe_extra(arch: str, experts: int, inter: int, hidden: int) -> dict:
    """The MoE settings of a tiny `arch` config: `experts` routed experts of width `inter`, two per token."""
    if arch == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": 2}
    extra = {"num_experts": experts, "num_experts_per_tok": 2}
    if arch in ("qwen2_moe", "qwen3_moe"):
        extra.update(moe_intermediate_size=inter // 4, decoder_sparse_step=1, head_dim=hidden // 4)
    if arch == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = inter // 2
    return extra


def tiny_config(
    arch: str,
    layers: int = 2,
    vocab: int = 512,
    hidden: int = 64,
    inter: int = 128,
    experts: int = 8,
    init: float = 0.02,
    context: int = 256,
):
    common = dict(
        initializer_range=init,  # larger: random weights whose greedy continuations vary (not one repeated token)
        vocab_size=vocab,
        num_hidden_layers=layers,
        max_position_embeddings=context,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    if arch == "opt":
        return AutoConfig.for_model(
            "opt", hidden_size=hidden, ffn_dim=inter, num_attention_heads=4, word_embed_proj_dim=hidden, **common
        )
    if arch == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, rotary_pct=0.5, **common
        )
    extra = {"head_dim": 16, "sliding_window": 32, "layer_types": None} if arch == "gemma3_text" else {}
    if arch in MOE_ARCHITECTURES:
        extra = moe_extra(arch, experts, inter, hidden)
    if arch == "gemma3_text":
        extra.pop("layer_types")
        extra["sliding_window_pattern"] = 2
    return AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=arch not in ("phi3", *MOE_ARCHITECTURES),  # as the released models
        **extra,
        **common,
    )


def make_model(
    folder: Path,
    arch: str,
    tokenizer: PreTrainedTokenizerFast | None = None,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **sizes,
) -> Path:
    """Write a random-weight model of `arch` into `folder` (config, safetensors, tokenizer)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, layers=layers, **sizes)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)


def train_tokenizer(texts: list[str], vocab: int = 512) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained on `texts` (no Hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
