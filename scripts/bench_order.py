"""The two pruning orders across calibration seeds: is one order's perplexity better systematically, or
only for one draw of calibration windows?

For each seed, draws the calibration windows as bench_peer.py does (same corpus, sizes and function),
prunes with `--order sequential` (true-sequential, one forward) and `--order parallel` (the default:
the papers' two passes), and evaluates both outputs with llmprune's perplexity code on the same
held-out windows. Prints one Markdown table; each run is a whole process (wall time, peak RSS).

    python scripts/bench_order.py [--seeds 0 1 2] [--configs sparsegpt:unstructured sparsegpt:2:4] [--out bench-order]
"""

from __future__ import annotations

from pathlib import Path

import torch
from benchlib import (
    add_window_args,
    calibration_file,
    held_out_perplexity,
    machine,
    model_and_corpus,
    prune_on_windows,
    script_parser,
)

ORDERS = ("sequential", "parallel")


def main() -> None:
    parser = script_parser(__doc__)
    add_window_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["sparsegpt:unstructured", "sparsegpt:2:4"])
    parser.add_argument("--out", default="bench-order")
    args = parser.parse_args()
    configs = [tuple(c.split(":", 1)) for c in args.configs]
    if any(len(c) != 2 for c in configs):
        parser.error("--configs takes METHOD:PATTERN items, e.g. sparsegpt:2:4")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, corpus, held_out = model_and_corpus(args)
    rows = []
    for seed in args.seeds:
        windows = calibration_file(corpus, args, seed, out / f"windows-{seed}.safetensors")
        for method, pattern in configs:
            ppl = {}
            for order in ORDERS:
                tag = f"{method}-{pattern.replace(':', 'of')}-{order}-{seed}"
                log = out / f"{tag}.log"
                measured = prune_on_windows(folder, windows, method, pattern, out / tag, log, ["--order", order])
                ppl[order] = held_out_perplexity(out / tag, held_out)
                wall, peak = measured.seconds, measured.peak_rss_bytes / 2**30
                print(
                    f"seed {seed} {method} {pattern} {order}: ppl {ppl[order]:.3f}, {wall:.1f} s, {peak:.2f} GiB",
                    flush=True,
                )
            rows.append((seed, method, pattern, ppl["sequential"], ppl["parallel"]))
    print(f"\n{machine()}; torch {torch.__version__}; {args.model}, {args.samples} x {args.seqlen} tokens of "
          f"`{args.corpus}`, {held_out.count} held-out windows\n")  # fmt: skip
    print("| seed | config | ppl sequential | ppl parallel (default) | sequential / parallel |")
    print("|---|---|---|---|---|")
    for seed, method, pattern, seq, par in rows:
        print(f"| {seed} | {method} {pattern} | {seq:.3f} | {par:.3f} | {seq / par:.3f} |")


if __name__ == "__main__":
    main()
