"""Benchmark data-parallel calibration on one machine: one process with T threads against R torchrun ranks
with T / R threads each (gloo on the CPU), on the same run: wall time, pruning time, each rank's peak RSS, the
perplexity, and how many weights the two runs prune alike.

With `--project N [N ...]` it runs nothing but the engine's memory plan (`--plan-only`, reads no weights): for
each calibration size N, one process's planned peak (the plan's peak plus the interpreter overhead it measured)
against one rank's (`--plan-ranks R`: its shard of the windows, its rows of each solve), to show from how many
windows the ranks' split of the activations outweighs what every rank holds whole.

The runs alternate (single, ranks, single, ranks, ...) so that a noisy machine slows both alike; the ratios
are taken within each repeat.

    python scripts/bench_distributed.py --model smollm2-135m-gguf --out bench-dist [--ranks 2] [--threads 2]
        [--repeats 1] [--samples 128] [--write BENCHMARKS.md [--section bench_distributed]]
    python scripts/bench_distributed.py --project 128 512 1024 [--write BENCHMARKS.md --section bench_rank_plan]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import machine, publish_table, script_parser
from safetensors import safe_open

GIB = 1 << 30


def launch(ranks: int, threads: int, args: list[str], folder: Path, log: Path) -> dict:
    """One run (a process, or torchrun with `ranks` workers); its report and wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "llmprune", *args, "--output", str(folder), "--overwrite"]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "llmprune", *command[3:]]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}); see {log}")
    report = json.loads((folder / "llmprune.json").read_text())
    peaks = report["peak_memory"].get("ranks") or [{"rank": 0, "rss_bytes": report["peak_memory"]["rss_bytes"]}]
    return {
        "ranks": ranks,
        "threads": threads,
        "wall_s": round(wall, 1),
        "prune_s": report["timings"]["prune_seconds"],
        "rss_gib": [round(p["rss_bytes"] / GIB, 3) for p in peaks],
        "ppl": report["perplexity"]["pruned"],
        "dense_ppl": report["perplexity"]["dense"],
    }


def mask_agreement(one: Path, two: Path) -> float:
    """The share of pruned-layer weights that are zero in both outputs or nonzero in both."""
    same = total = 0
    for shard in sorted(one.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as a, safe_open(str(two / shard.name), "pt") as b:
            for key in a.keys():
                if ".layers." not in key or not key.endswith("proj.weight"):
                    continue
                x, y = a.get_tensor(key) == 0, b.get_tensor(key) == 0
                same += int((x == y).sum())
                total += x.numel()
    return same / total


def planned_peak(args, samples: int, plan_ranks: int) -> dict:
    """The memory plan of one rank of `plan_ranks` calibrating on `samples` windows (`--plan-only --plan-ranks`),
    planned in a fresh interpreter, whose libraries are the overhead the plan measures, as in a real run."""
    call = (f"import json, llmprune; r = llmprune.prune({args.model!r}, method={args.method!r}, "
            f"sparsity={float(args.sparsity)}, calibration={args.calibration!r}, samples={samples}, "
            f"seqlen={args.seqlen}, eval_samples={args.eval_samples}, plan_only=True, plan_ranks={plan_ranks}, "
            f"output={str(args.out / 'unused')!r}, quiet=True); print(json.dumps(r['memory_plan']))")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"planning {samples} windows for one rank of {plan_ranks} failed ({done.returncode}): {last}")
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    return {"peak": plan["peak_bytes"], "overhead": plan["overhead_bytes"], "phase": peak_phase(plan)}


def peak_phase(plan: dict) -> str:
    """The phase whose planned bytes are the largest."""
    return max(plan["phases"], key=lambda name: sum(plan["phases"][name].values()))


def projection(args) -> list[dict]:
    """For each --project size: one process's planned peak against one rank's (its shard of the windows)."""
    rows = []
    for samples in args.project:
        one, rank = planned_peak(args, samples, 1), planned_peak(args, samples, args.ranks)
        row = {"samples": samples, "one": one, "rank": rank,
               "ratio": (rank["peak"] + rank["overhead"]) / (one["peak"] + one["overhead"])}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def projection_table(rows: list[dict], args, command: str) -> str:
    mib = 1 << 20
    lines = [
        f"Planned {date.today()} on {machine()}. Command: `{command}`.",
        "",
        f"{args.model}, {args.method} {args.sparsity}, calibration N x {args.seqlen} tokens, {args.ranks} ranks; "
        "the engine's memory plan (`--plan-only`, and `--plan-ranks` for one rank: its shard of the N "
        f"calibration and {args.eval_samples} held-out windows, its rows of each solve), no weights read. Planned "
        "peak: the plan's peak plus the interpreter and libraries it measured before planning (MiB).",
        "",
        "| N windows | one process: plan + overhead | peak phase | a rank: plan + overhead | peak phase | "
        "rank / one process |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        one, rank = row["one"], row["rank"]
        lines.append(
            f"| {row['samples']} | {one['peak'] / mib:.0f} + {one['overhead'] / mib:.0f} | {one['phase']} | "
            f"{rank['peak'] / mib:.0f} + {rank['overhead'] / mib:.0f} | {rank['phase']} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def table(rows: list[dict], args, command: str) -> str:
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `{command}`.",
        "",
        f"{args.model}, {args.method} {args.sparsity}, calibration {args.samples} x {args.seqlen} tokens of "
        f"`{args.calibration}`, perplexity on {args.eval_samples} held-out windows; statistics summed in float32 "
        "(the default). Peak RSS: each process's own (torchrun's launcher excluded). Ratios: ranks over the one "
        "process of the same repeat.",
        "",
        "| repeat | run | wall s | prune s | peak RSS GiB per rank | peak RSS ratio (largest rank) | wall ratio | "
        "pruned ppl | masks alike |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ranks = f"{row['ranks']} ranks" if row["ranks"] > 1 else "1"
        run = f"{ranks} x {row['threads']} thread{'s' if row['threads'] > 1 else ''}"
        lines.append(
            f"| {row['repeat']} | {run} | {row['wall_s']:.0f} | {row['prune_s']:.0f} | "
            f"{' / '.join(f'{r:.2f}' for r in row['rss_gib'])} | {row.get('rss_ratio', '-')} | "
            f"{row.get('wall_ratio', '-')} | {row['ppl']:.3f} | {row.get('agreement', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--calibration", default="shakespeare")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--max-ppl-increase", default=None, help="passed on to llmprune (its quality gate's limit)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the one process (split among ranks)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench-distributed"))
    parser.add_argument("--write", default=None)
    parser.add_argument("--section", default=None, help="the --write file's section for the table (default: "
                        "bench_distributed, or bench_rank_plan with --project)")  # fmt: skip
    parser.add_argument(
        "--project",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="plan only: one process against a rank for each calibration size N (runs nothing)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_distributed.py " + " ".join(sys.argv[1:])
    args.section = args.section or ("bench_rank_plan" if args.project else "bench_distributed")
    if args.project:
        publish_table(projection_table(projection(args), args, command), args.section, args.out, args.write)
        return
    common = [args.model, "--method", args.method, "--sparsity", args.sparsity, "--calibration", args.calibration,
              "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--eval-samples", str(args.eval_samples),
              "--quiet"]  # fmt: skip
    if args.max_ppl_increase:
        common += ["--max-ppl-increase", args.max_ppl_increase]
    rows = []
    for repeat in range(args.repeats):
        single = launch(1, args.threads, common, args.out / "one", args.out / f"one-{repeat}.log")
        split = launch(args.ranks, max(1, args.threads // args.ranks), common, args.out / "ranks",
                       args.out / f"ranks-{repeat}.log")  # fmt: skip
        split["rss_ratio"] = f"{max(split['rss_gib']) / single['rss_gib'][0]:.2f}"
        split["wall_ratio"] = f"{split['wall_s'] / single['wall_s']:.2f}"
        split["agreement"] = f"{mask_agreement(args.out / 'one', args.out / 'ranks'):.5f}"
        for row in (single, split):
            rows.append({**row, "repeat": repeat})
            print(json.dumps(rows[-1]), flush=True)
        (args.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish_table(table(rows, args, command), args.section, args.out, args.write)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
