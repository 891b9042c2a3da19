"""Generation throughput of model folders: greedy tokens per second in transformers or in vLLM.

    python scripts/throughput.py FOLDER [FOLDER ...] [--engine transformers|vllm] [--prompts 16] [--new-tokens 64]
        [--dtype DTYPE] [--memory-fraction 0.2]

Prints one JSON line per folder. vLLM runs in a subprocess per folder (one engine each), in the
checkpoint's dtype; transformers generates all prompts as one batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchlib import flags, run_measured, script_parser

PROMPT = "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds"


def transformers_rate(folder: str, prompts: int, new_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    ids = tokenizer([PROMPT] * prompts, return_tensors="pt")
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - started
    return (out.shape[1] - ids["input_ids"].shape[1]) * prompts / seconds


def vllm_rate(
    folder: str, prompts: int, new_tokens: int, dtype: str | None = None, memory_fraction: float = 0.2
) -> float:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    config = json.load(open(os.path.join(folder, "config.json")))
    llm = LLM(
        model=folder,
        dtype=dtype or config.get("dtype") or config.get("torch_dtype") or "auto",
        enforce_eager=True,
        max_model_len=512,
        gpu_memory_utilization=memory_fraction,  # on the CPU backend: the share of host memory vLLM may take
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    llm.generate([PROMPT] * 2, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([PROMPT] * prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", help="vLLM's dtype (default: the checkpoint's)")
    parser.add_argument("--memory-fraction", type=float, default=0.2, help="vLLM's gpu_memory_utilization")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for folder in args.folders:
        if args.engine == "vllm" and not args.child:
            child = [sys.executable, __file__, folder, "--engine", "vllm", "--child"]
            child += flags(prompts=args.prompts, new_tokens=args.new_tokens, memory_fraction=args.memory_fraction)
            child += ["--dtype", args.dtype] if args.dtype else []
            measured = run_measured(child, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = [x for x in measured.stdout.splitlines() if x.startswith("{")]
            if measured.returncode != 0 or not line:
                sys.exit(f"vLLM failed on {folder}:\n{measured.tail(3000)}")
            print(line[-1], flush=True)
            continue
        if args.engine == "vllm":
            rate = vllm_rate(folder, args.prompts, args.new_tokens, args.dtype, args.memory_fraction)
        else:
            rate = transformers_rate(folder, args.prompts, args.new_tokens)
        print(json.dumps({"folder": folder, "engine": args.engine, "tokens_per_second": rate}), flush=True)


if __name__ == "__main__":
    main()
