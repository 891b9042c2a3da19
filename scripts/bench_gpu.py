"""Benchmark on a GPU: peak CUDA memory beside the memory plan, and wall time, for SparseGPT, Wanda and ALPS
(float32 and float64) on random-weight Llama models with Llama-2-7B-shaped layers (4 and 8 layers, written as
shards).

Each run is a whole `llmprune --device cuda` process (scripts/measure_process.py: wall time, peak
host RSS); peak CUDA memory (torch.cuda.max_memory_allocated) and the plan come from its llmprune.json.
Runs go in order of importance and stop when --deadline seconds are spent; rows are written as they come.

    python scripts/bench_gpu.py --tokenizer DIR --calibration DIR [--out bench-gpu] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

from benchlib import flags, machine, measure_llmprune, publish_table, random_model, script_parser
from shape_checkpoint import write_index

LLAMA = dict(model_type="llama", max_position_embeddings=4096, dtype="bfloat16")  # the vocabulary: the tokenizer's
SHAPES = {  # the decoder layer, as config fields for benchlib.random_model: Llama-2-7B's, and a smoke test on a CPU
    "7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "tiny": dict(LLAMA, hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4),
}


def subset(model: Path, folder: Path, layers: int) -> Path:
    """The first `layers` decoder layers of `model` as a model of their own (its shards linked, not copied)."""
    if (folder / "config.json").exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    keep = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers
    }
    for shard in set(keep.values()):
        (partial / shard).symlink_to((model / shard).resolve())
    write_index(partial, keep, sum((model / shard).stat().st_size for shard in set(keep.values())))
    config = json.loads((model / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}, indent=1))
    for extra in model.iterdir():
        if extra.name.startswith("tokenizer") or extra.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(extra, partial / extra.name)
    partial.rename(folder)
    return folder


def run(label: str, argv: list[str], out: Path, device: str) -> dict:
    """One measured `llmprune` process; its row."""
    folder = out / f"out-{label}"
    measured, report = measure_llmprune([*argv, "--device", device], folder, log=out / f"{label}.log")
    if measured.returncode != 0:
        tail = measured.tail(1500)
        print(f"{label} failed (exit {measured.returncode}):\n{tail}", flush=True)
        return {"label": label, "failed": measured.returncode, "reason": (tail.strip().splitlines() or [""])[-1][:200]}
    plan = report["memory_plan"]
    row = {
        "label": label,
        "layers": len(report["layers"]),
        "wall": measured.seconds,
        "timings": report.get("timings"),
        "layer_seconds": [layer["seconds"] for layer in report["layers"]],
        "rss": measured.peak_rss_bytes,
        "cuda": report["peak_memory"]["cuda_bytes"] or measured.peak_rss_bytes,
        "plan": plan["peak_bytes"],
        "plan_host": plan["host_bytes"],
        "budget": plan["budget_bytes"],
        "choice": plan["choice"],
        "adaptations": plan["adaptations"],
        "phases": {k: sum(v.values()) for k, v in plan["phases"].items()},
        "sparsity": report.get("achieved_sparsity"),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "layer_seconds"}), flush=True)
    (out / f"{label}.row.json").write_text(json.dumps(row))
    shutil.rmtree(folder, ignore_errors=True)
    return row


def table(rows: list[dict], command: str, shape: dict) -> str:
    import torch

    lines = [
        f"Measured {date.today()} on {machine()} (torch {torch.__version__}). Command: `{command}`.",
        "",
        f"Random-weight Llama, hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']} heads (Llama-2-7B's "
        "layer shape unless --shape says otherwise), bf16, one shard per layer. Peak CUDA memory is "
        "torch.cuda.max_memory_allocated over the whole run; the plan is the engine's planned peak on the GPU; "
        "host RSS is measured from outside the process.",
        "",
        "| run | layers | plan GiB | peak CUDA GiB | plan / measured | host RSS GiB | wall s | s / layer | choices |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | failed (exit {r['failed']}): {r['reason']} | | | | | | | |")
            continue
        c = r["choice"]
        choices = f"chunks of {c['chunk']}, activations {c['activations']}, {c['order']}, park {c['park']}"
        if r["adaptations"]:
            choices += "; adapted: " + ", ".join(r["adaptations"])
        per_layer = sorted(r["layer_seconds"])[len(r["layer_seconds"]) // 2]
        lines.append(
            f"| {r['label']} | {r['layers']} | {r['plan'] / 2**30:.2f} | {r['cuda'] / 2**30:.2f} | "
            f"{r['plan'] / r['cuda']:.2f} | {r['rss'] / 2**30:.2f} | {r['wall']:.0f} | {per_layer:.1f} | {choices} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="bench-gpu")
    parser.add_argument("--tokenizer", required=True, help="folder with a tokenizer (its vocabulary sizes the model)")
    parser.add_argument("--calibration", required=True, help="local text file or folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test this script)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--budget", default="cuda=8GiB", help="--max-memory of the budgeted run")
    parser.add_argument("--deadline", type=float, default=3600, help="start no run after this many seconds")
    parser.add_argument("--only", nargs="*", help="run only these labels")
    parser.add_argument("--write", help="update this Markdown file's bench_gpu section")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape, device = SHAPES[args.shape], args.device
    models = {8: random_model(out / f"llama-{args.shape}-8L", shape, Path(args.tokenizer), device, num_hidden_layers=8)}
    models[4] = subset(models[8], out / f"llama-{args.shape}-4L", 4)
    print(f"models ready after {time.perf_counter() - started:.0f} s", flush=True)
    common = flags(calibration=args.calibration, samples=args.samples, seqlen=args.seqlen)
    jobs = {
        "sparsegpt-50%-8L": [str(models[8]), "--method", "sparsegpt", *common],
        f"sparsegpt-50%-8L-{args.budget}": [str(models[8]), "--method", "sparsegpt", *common, "--max-memory",
                                            args.budget],
        "sparsegpt-50%-4L": [str(models[4]), "--method", "sparsegpt", *common],
        "sparsegpt-50%-4L-sequential": [str(models[4]), "--method", "sparsegpt", *common, "--order", "sequential"],
        "wanda-50%-8L": [str(models[8]), "--method", "wanda", *common],
        "sparsegpt-2:4-8L": [str(models[8]), "--method", "sparsegpt", "--pattern", "2:4", *common],
        "sparsegpt-50%-4L-forward-float32": [str(models[4]), "--method", "sparsegpt", *common,
                                             "--forward-dtype", "float32"],
        "alps-50%-4L": [str(models[4]), "--method", "alps", *common],  # issue 23: ALPS on a GPU, float32 (default)
        "alps-50%-4L-float64": [str(models[4]), "--method", "alps", *common, "--alps-dtype", "float64"],
    }  # fmt: skip
    rows = []
    command = "python scripts/bench_gpu.py " + " ".join(sys.argv[1:])
    for label, argv in jobs.items():
        if args.only and label not in args.only:
            continue
        if time.perf_counter() - started > args.deadline:
            print(f"deadline: {label} not run", flush=True)
            continue
        rows.append(run(label, argv, out, device))
        (out / "bench_gpu.md").write_text(table(rows, command, shape) + "\n")  # kept as the rows come
    publish_table(table(rows, command, shape), "bench_gpu", out, args.write)


if __name__ == "__main__":
    main()
