"""Benchmark: the memory plan beside the measured peak, for SmolLM2-135M, a ~2B random-weight Llama and a
random-weight model of Qwen2.5-1.5B's shape (FFN 8960, a tied 151936-row head) under a 1.5 GB budget.
(One SparseGPT solve on wide layers is scripts/bench_solve.py.)

Each run is a whole `llmprune` process measured from outside (scripts/measure_process.py: wall time,
peak RSS); the plan's peak (plus the interpreter overhead it measured) comes from its llmprune.json.

    python scripts/bench_memory.py [--out bench-memory] [--skip-2b]
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import date
from pathlib import Path

from benchlib import flags, machine, measure_llmprune, publish_table, random_model, script_parser

SMOLLM2_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # the random models use SmolLM2's tokenizer


def run(label: str, argv: list[str], out: Path, reuse: bool = False) -> dict:
    """One measured llmprune process; its row (kept as LABEL.row.json, reused with --reuse)."""
    saved = out / f"{label}.row.json"
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    folder = out / f"out-{label}"
    measured, report = measure_llmprune([*argv, "--quiet"], folder, log=out / f"{label}.log", check=label)
    plan = report["memory_plan"]
    planned = plan["peak_bytes"] + plan["overhead_bytes"]
    row = {
        "label": label,
        "wall": measured.seconds,
        "measured": measured.peak_rss_bytes,
        "planned": planned,
        "plan_engine": plan["peak_bytes"],
        "overhead": plan["overhead_bytes"],
        "budget": plan["budget_bytes"],
        "choice": plan["choice"],
        "adaptations": plan["adaptations"],
        "layers": len(report["layers"]),
    }
    print(json.dumps(row), flush=True)
    saved.write_text(json.dumps(row))
    shutil.rmtree(folder, ignore_errors=True)
    return row


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="bench-memory")
    parser.add_argument("--skip-2b", action="store_true")
    parser.add_argument("--only", nargs="*", help="run only these labels (e.g. smollm2-sparsegpt llama-2b-sparsegpt)")
    parser.add_argument("--reuse", action="store_true", help="reuse the rows of runs already measured in --out")
    parser.add_argument("--write", help="update this Markdown file's bench_memory section")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from llmprune.models.resolve import resolve_model

    smol = resolve_model("smollm2-135m-gguf", quiet=True)
    common = flags(calibration="shakespeare", samples=128, seqlen=512)
    jobs = {
        "smollm2-sparsegpt": [str(smol), "--method", "sparsegpt", *common],
        "smollm2-sparsegpt-budget-900MB": [str(smol), "--method", "sparsegpt", *common, "--max-memory", "900MB"],
        "smollm2-wanda": [str(smol), "--method", "wanda", *common],
        "smollm2-alps": [str(smol), "--method", "alps", *common],
        "smollm2-alps-2of4": [str(smol), "--method", "alps", "--pattern", "2:4", *common],
        "smollm2-sparsegpt-owl": [str(smol), "--method", "sparsegpt", "--sparsity-profile", "owl", *common],
    }
    if not args.skip_2b and (not args.only or any(label.startswith("llama-2b") for label in args.only)):
        big = random_model(out / "llama-2b-random", "llama-1.8b", smol, shard_bytes=10**9, **SMOLLM2_IDS)
        params = sum(p.stat().st_size for p in big.glob("*.safetensors")) // 2
        print(f"random model: {params / 1e9:.2f} B parameters in {len(list(big.glob('*.safetensors')))} shards")
        small = flags(calibration="shakespeare", samples=8, seqlen=256)
        jobs["llama-2b-sparsegpt"] = [str(big), "--method", "sparsegpt", *small]
        jobs["llama-2b-sparsegpt-budget-2GB"] = [str(big), "--method", "sparsegpt", *small, "--max-memory", "2GB"]
    if not args.only or any(label.startswith("qwen2.5-1.5b") for label in args.only):
        qwen = random_model(out / "qwen2.5-1.5b-random", "qwen2.5-1.5b", smol, shard_bytes=10**9, **SMOLLM2_IDS)
        small = flags(calibration="shakespeare", samples=16, seqlen=512, eval_samples=4, max_memory="1.5GB")
        jobs["qwen2.5-1.5b-sparsegpt-budget-1.5GB"] = [str(qwen), "--method", "sparsegpt", *small]  # FFN 8960, tied
    rows = [run(label, argv, out, args.reuse) for label, argv in jobs.items() if not args.only or label in args.only]
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_memory.py {' '.join(sys.argv[1:])}`.",
        "",
        "Peak RSS measured from outside the process (getrusage of the child of a small launcher); the plan is the "
        "engine's planned peak plus the interpreter overhead it measured when it planned.",
        "",
        "| run | layers | plan GiB | measured peak GiB | plan / measured | wall s | plan choices |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["choice"]
        choices = (
            f"chunks of {c['chunk']}, activations {c['activations']}, {c['order']}, park {c['park']}, "
            f"inverse {c['inverse_dtype'].removeprefix('torch.')}"
        )
        if r["adaptations"]:
            choices += "; adapted: " + ", ".join(r["adaptations"])
        lines.append(
            f"| {r['label']} | {r['layers']} | {r['planned'] / 2**30:.2f} | {r['measured'] / 2**30:.2f} | "
            f"{r['planned'] / r['measured']:.2f} | {r['wall']:.0f} | {choices} |"
        )
    publish_table("\n".join(lines), "bench_memory", out, args.write)


if __name__ == "__main__":
    main()
