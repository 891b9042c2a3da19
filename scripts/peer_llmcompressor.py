"""Run llm-compressor's one-shot SparseGPT, Wanda or GPTQ (inside llm-compressor's own virtualenv).

Called by scripts/bench_peer.py and scripts/bench_compound.py with the exact calibration token windows
llmprune uses, so both tools see identical inputs. Not imported by llmprune.

    python peer_llmcompressor.py --model DIR --windows windows.safetensors --method sparsegpt \
        --pattern 2:4 --output OUT
    python peer_llmcompressor.py --model DIR --windows windows.safetensors --method gptq --scheme W4A16 \
        --group-size 64 --output OUT

GPTQ runs as llm-compressor's docs show it (GPTQModifier with its defaults: dampening 0.01, block 128,
static activation ordering for grouped weights), every Linear but lm_head; --group-size replaces the preset's
128 for models whose widths 128 does not divide (SmolLM2's 576), as llmprune does.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--method", choices=["sparsegpt", "wanda", "gptq"], required=True)
    parser.add_argument("--scheme", choices=["W8A8", "W4A16"], default="W8A8")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = load_file(args.windows)["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(sparsity=args.sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "gptq":
        recipe = gptq_recipe(args.scheme, args.group_size)
    elif args.method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    else:
        recipe = WandaPruningModifier(**common)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=data,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        output_dir=args.output,
    )


def gptq_recipe(scheme: str, group_size: int):
    """GPTQModifier for a preset scheme, its weights' group size replaced when the scheme has groups."""
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    preset = preset_name_to_scheme(scheme, ["Linear"])
    if preset.weights.group_size is not None:
        preset.weights.group_size = group_size
    config = {"group_0": QuantizationScheme.model_validate(preset.model_dump())}
    return GPTQModifier(config_groups=config, ignore=["lm_head"], block_size=128, dampening_frac=0.01)


if __name__ == "__main__":
    main()
