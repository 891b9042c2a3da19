"""The two pruning orders across calibration seeds: is one order's perplexity better systematically, or
only for one draw of calibration windows?

For each seed, draws the calibration windows as bench_peer.py does (same corpus, sizes and function),
prunes with `--order sequential` (true-sequential, one forward) and `--order parallel` (the default:
the papers' two passes), and evaluates both outputs with llmprune's perplexity code on the same
held-out windows. Prints one Markdown table; each run is a whole process (wall time, peak RSS).

    python scripts/bench_order.py [--seeds 0 1 2] [--configs sparsegpt:unstructured sparsegpt:2:4] [--out bench-order]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from benchlib import add_window_args, machine, measure_llmprune, model_and_corpus
from safetensors.torch import save_file

ORDERS = ("sequential", "parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_window_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["sparsegpt:unstructured", "sparsegpt:2:4"])
    parser.add_argument("--out", default="bench-order")
    args = parser.parse_args()
    configs = [tuple(c.split(":", 1)) for c in args.configs]
    if any(len(c) != 2 for c in configs):
        parser.error("--configs takes METHOD:PATTERN items, e.g. sparsegpt:2:4")

    from llmprune.data.windows import calibration_windows
    from llmprune.eval.perplexity import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, corpus, held_out = model_and_corpus(args)
    device = torch.device("cpu")
    rows = []
    for seed in args.seeds:
        windows = out / f"windows-{seed}.safetensors"
        ids = calibration_windows(corpus, args.samples, args.seqlen, seed).ids
        save_file({"input_ids": ids.contiguous()}, str(windows))
        for method, pattern in configs:
            ppl = {}
            for order in ORDERS:
                tag = f"{method}-{pattern.replace(':', 'of')}-{order}-{seed}"
                argv = [str(folder), "--method", method, "--pattern", pattern, "--order", order,
                        "--calibration", str(windows), "--quiet"]  # fmt: skip
                code, process, _ = measure_llmprune(argv, out / tag, out / f"{tag}.json", out / f"{tag}.log")
                if code != 0:
                    raise SystemExit(f"{tag}: llmprune exited {code}; see {out / tag}.log")
                ppl[order] = perplexity(out / tag, held_out, device, 8).perplexity
                wall, peak = process["wall_seconds"], process["peak_rss_bytes"] / 2**30
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
