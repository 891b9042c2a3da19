"""Run llm-compressor's one-shot SparseGPT or Wanda (inside llm-compressor's own virtualenv).

Called by scripts/bench_peer.py with the exact calibration token windows llmprune uses, so both
tools see identical inputs. Not imported by llmprune.

    python peer_llmcompressor.py --model DIR --windows windows.safetensors --method sparsegpt \
        --pattern 2:4 --output OUT
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
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
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
    if args.method == "sparsegpt":
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


if __name__ == "__main__":
    main()
