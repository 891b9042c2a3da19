"""Benchmark: every method x {50% unstructured, 2:4} on SmolLM2-135M, 128 x 512-token calibration windows.

Each configuration runs in a fresh process (so peak RSS is its own); prints a Markdown table of
perplexity, wall time, peak RSS and achieved sparsity.

    python scripts/bench_prune.py [--samples 128] [--seqlen 512] [--eval-samples 32] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from benchlib import flags, machine, measure_llmprune, publish_table, script_parser

CONFIGS = [(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("unstructured", "2:4")]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--calibration", default="shakespeare")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--only", nargs="*", help="method:pattern filters, e.g. sparsegpt:2:4")
    parser.add_argument("--write", help="update this Markdown file's bench_prune section (e.g. BENCHMARKS.md)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra llmprune flags")
    args = parser.parse_args()
    rows = []
    for method, pattern in CONFIGS:
        if args.only and f"{method}:{pattern}" not in args.only:
            continue
        out = Path(args.out) / f"{method}-{pattern.replace(':', 'of')}"
        sizes = flags(samples=args.samples, seqlen=args.seqlen, eval_samples=args.eval_samples)
        argv = [args.model, *flags(method=method, pattern=pattern, calibration=args.calibration), *sizes, *args.extra]
        measured, _ = measure_llmprune(argv, out, evaluate=True, check=f"{method} {pattern}")
        summary, wall = json.loads(measured.stdout), measured.seconds
        rows.append((method, pattern, summary, wall))
        print(
            f"{method:9s} {pattern:12s} ppl {summary['dense_perplexity']:.2f} -> {summary['pruned_perplexity']:.2f}"
            f"  prune {summary['prune_seconds']:.1f} s  process {wall:.1f} s"
            f"  peak RSS {summary['peak_rss_gib']:.2f} GiB"
            f"  sparsity {summary['achieved_sparsity']:.4f}",
            flush=True,
        )
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_prune.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Calibration: {args.samples} x {args.seqlen} tokens of `{args.calibration}`; perplexity on "
        f"{args.eval_samples} held-out windows. Pruning s: the layer loop; process s: the whole run (model "
        "resolution, dense and pruned perplexity included); peak RSS: the process's VmHWM.",
        "",
        "| method | pattern | dense ppl | pruned ppl | pruning s | process s | peak RSS GiB | sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, pattern, s, wall in rows:
        lines.append(
            f"| {method} | {pattern} | {s['dense_perplexity']:.2f} | {s['pruned_perplexity']:.2f} | "
            f"{s['prune_seconds']:.1f} | {wall:.1f} | {s['peak_rss_gib']:.2f} | {s['achieved_sparsity']:.4f} |"
        )
    publish_table("\n".join(lines), "bench_prune", write=args.write)


if __name__ == "__main__":
    main()
