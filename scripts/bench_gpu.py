"""Benchmark on a GPU: peak CUDA memory beside the memory plan, and wall time, for SparseGPT and Wanda
on random-weight Llama models with Llama-2-7B-shaped layers (4 and 8 layers, written as shards).

Each run is a whole `llmprune --device cuda` process (scripts/measure_process.py: wall time, peak
host RSS); peak CUDA memory (torch.cuda.max_memory_allocated) and the plan come from its llmprune.json.
Runs go in order of importance and stop when --deadline seconds are spent; rows are written as they come.

    python scripts/bench_gpu.py --tokenizer DIR --calibration DIR [--out bench-gpu] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import date
from pathlib import Path

from benchlib import machine, measure_llmprune, update_section

SHAPES = {
    "7b": dict(hidden=4096, inter=11008, heads=32),  # Llama-2-7B's decoder layer
    "tiny": dict(hidden=256, inter=688, heads=4),  # a smoke test of this script on a CPU
}


def random_model(folder: Path, layers: int, tokenizer: Path, shape: dict, device: str) -> Path:
    """A Llama with random bf16 weights (std 0.02), one shard per decoder layer (drawn on `device`)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=len(tok),
        max_position_embeddings=4096,
        dtype="bfloat16",
    )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gen = torch.Generator(device).manual_seed(0)
    h, i = shape["hidden"], shape["inter"]

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    index: dict[str, str] = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        index.update({key: name for key in tensors})

    def ones() -> torch.Tensor:
        return torch.ones(h, dtype=torch.bfloat16)

    shard(
        "rest.safetensors",
        {
            "model.embed_tokens.weight": normal(len(tok), h),
            "model.norm.weight": ones(),
            "lm_head.weight": normal(len(tok), h),
        },
    )
    for n in range(layers):
        p = f"model.layers.{n}."
        shard(f"layer-{n:03d}.safetensors", {
            p + "self_attn.q_proj.weight": normal(h, h), p + "self_attn.k_proj.weight": normal(h, h),
            p + "self_attn.v_proj.weight": normal(h, h), p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
        })  # fmt: skip
    total = sum(f.stat().st_size for f in partial.glob("*.safetensors"))
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    config.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(folder)
    return folder


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
    total = sum((model / shard).stat().st_size for shard in set(keep.values()))
    index = {"metadata": {"total_size": total}, "weight_map": keep}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
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
    log = out / f"{label}.log"
    code, measured, report = measure_llmprune([*argv, "--device", device], folder, out / f"{label}.json", log)
    if code != 0:
        tail = log.read_text()[-1500:]
        print(f"{label} failed (exit {code}):\n{tail}", flush=True)
        return {"label": label, "failed": code, "reason": (tail.strip().splitlines() or [""])[-1][:200]}
    plan = report["memory_plan"]
    row = {
        "label": label,
        "layers": len(report["layers"]),
        "wall": measured["wall_seconds"],
        "timings": report.get("timings"),
        "layer_seconds": [layer["seconds"] for layer in report["layers"]],
        "rss": measured["peak_rss_bytes"],
        "cuda": report["peak_memory"]["cuda_bytes"] or measured["peak_rss_bytes"],
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
        f"Random-weight Llama, hidden {shape['hidden']}, MLP {shape['inter']}, {shape['heads']} heads (Llama-2-7B's "
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    models = {8: random_model(out / f"llama-{args.shape}-8L", 8, Path(args.tokenizer), shape, device)}
    models[4] = subset(models[8], out / f"llama-{args.shape}-4L", 4)
    print(f"models ready after {time.perf_counter() - started:.0f} s", flush=True)
    common = ["--calibration", args.calibration, "--samples", str(args.samples), "--seqlen", str(args.seqlen)]
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
        text = table(rows, command, shape)
        (out / "bench_gpu.md").write_text(text + "\n")
    print(text)
    if args.write:
        update_section(Path(args.write), text, "bench_gpu")


if __name__ == "__main__":
    main()
