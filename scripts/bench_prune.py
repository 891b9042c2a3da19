"""Benchmark: every method x {50% unstructured, 2:4} on SmolLM2-135M, 128 x 512-token calibration windows;
with --study one-shot, SparseGPT against ALPS (50%, 60%, 2:4) and uniform against OWL sparsity (SparseGPT and
Wanda at 50/60/70%) over several calibration seeds, then OWL's sensitivity to its two knobs at 70% (SparseGPT: M
3 and 10 at the paper's λ 0.08, λ 0.04 at its M 5).

Each configuration runs in a fresh process (so peak RSS is its own); prints a Markdown table of
perplexity, wall time, peak RSS and achieved sparsity.

    python scripts/bench_prune.py [--samples 128] [--seqlen 512] [--eval-samples 32] [--out bench-out]
    python scripts/bench_prune.py --study one-shot [--seeds 0 1 2] [--only alps:2:4 ...] [--out bench-out]
        [--write BENCHMARKS.md [--section bench_one_shot]] [--table-only]

The study keeps every finished run in OUT/one-shot.jsonl and skips it when run again, so a long study can be
continued; its runs go in the order of STUDY (the targets' pairs first), seed by seed within each pair, so
each pair's runs are interleaved on this noisy machine. --table-only publishes what is kept and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from benchlib import flags, machine, measure_llmprune, publish_table, script_parser

CONFIGS = [(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("unstructured", "2:4")]
# (method, pattern or sparsity, profile): each pair is a baseline and the run it is compared with
STUDY = [
    (("sparsegpt", "2:4", "uniform"), ("alps", "2:4", "uniform")),
    (("sparsegpt", "0.5", "uniform"), ("alps", "0.5", "uniform")),
    (("sparsegpt", "0.7", "uniform"), ("sparsegpt", "0.7", "owl")),
    (("sparsegpt", "0.6", "uniform"), ("alps", "0.6", "uniform")),
    (("sparsegpt", "0.6", "uniform"), ("sparsegpt", "0.6", "owl")),
    (("sparsegpt", "0.5", "uniform"), ("sparsegpt", "0.5", "owl")),
    (("wanda", "0.7", "uniform"), ("wanda", "0.7", "owl")),
    (("wanda", "0.6", "uniform"), ("wanda", "0.6", "owl")),
    (("wanda", "0.5", "uniform"), ("wanda", "0.5", "owl")),
    (("sparsegpt", "0.7", "uniform"), ("sparsegpt", "0.7", "owl-m3")),
    (("sparsegpt", "0.7", "uniform"), ("sparsegpt", "0.7", "owl-m10")),
    (("sparsegpt", "0.7", "uniform"), ("sparsegpt", "0.7", "owl-l0.04")),
]
# a profile's knobs away from the paper's defaults: owl-m3 is --owl-m 3, owl-l0.04 is --owl-lambda 0.04
KNOBS = {"m": "owl_m", "l": "owl_lambda"}


def label(config: tuple) -> str:
    method, amount, profile = config
    return f"{method}:{amount}" + ("" if profile == "uniform" else f":{profile}")


def study_flags(config: tuple) -> list[str]:
    method, amount, profile = config
    shape = flags(pattern=amount) if ":" in amount else flags(sparsity=amount)
    name, *knobs = profile.split("-")
    tuned = {KNOBS[knob[0]]: knob[1:] for knob in knobs}
    return [*flags(method=method), *shape, *flags(sparsity_profile=name, **tuned)]


def one_shot_study(args) -> None:
    """The ALPS and OWL pairs, seed by seed; finished runs are kept in OUT/one-shot.jsonl and not run again."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "one-shot.jsonl"
    rows = map(json.loads, store.read_text().splitlines()) if store.exists() else []
    done = {(r["config"], r["seed"]): r for r in rows}
    pairs = [pair for pair in STUDY if not args.only or any(label(c) in args.only for c in pair)]
    sizes = flags(samples=args.samples, seqlen=args.seqlen, eval_samples=args.eval_samples)
    for pair in pairs:
        for seed in args.seeds:
            for config in pair:
                if (label(config), seed) in done or (args.only and label(config) not in args.only):
                    continue
                if args.table_only:
                    print(f"not run (--table-only): {label(config)} seed {seed}", file=sys.stderr)
                    continue
                argv = [args.model, *study_flags(config), *flags(calibration=args.calibration, seed=seed), *sizes]
                measured, report = measure_llmprune(argv, out / "run", evaluate=True, check=label(config))
                summary = json.loads(measured.stdout)
                plan = report["memory_plan"]
                row = {
                    "config": label(config),
                    "seed": seed,
                    "dense_ppl": summary["dense_perplexity"],
                    "ppl": summary["pruned_perplexity"],
                    "prune_s": summary["prune_seconds"],
                    "process_s": measured.seconds,
                    "peak_rss_gib": measured.peak_rss_bytes / 2**30,
                    "plan_gib": (plan["peak_bytes"] + plan["overhead_bytes"]) / 2**30,
                    "sparsity": summary["achieved_sparsity"],
                    "layer_sparsities": [lay["sparsity"] for lay in report["layers"]],
                }
                done[(row["config"], seed)] = row
                with store.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(
                    f"{row['config']:18s} seed {seed}  ppl {row['ppl']:.2f}  prune {row['prune_s']:.0f} s  process "
                    f"{row['process_s']:.0f} s  peak {row['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
    publish_table(study_table(args, done), args.section, write=args.write)


def study_table(args, done: dict) -> str:
    """One line per pair: perplexities per seed, their ratio to the baseline's on the same seed, and costs."""
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_prune.py {' '.join(sys.argv[1:])}`.",
        "",
        f"SmolLM2-135M; calibration {args.samples} x {args.seqlen} tokens of `{args.calibration}`, drawn by each seed; "
        f"perplexity on {args.eval_samples} held-out windows (the same for every seed). Ratio: the run's perplexity "
        "over its baseline's on the same seed (min / max over the seeds). Prune s: the layer loop (OWL's statistics "
        "pass included), and per seed its ratio to the baseline's; process s: the whole run, dense and pruned "
        "perplexity included; peak RSS: the process's, per seed; plan / peak: the memory plan over it.",
        "",
        "| run | baseline | seeds | ppl per seed | baseline ppl | ratio min / max | prune s | prune x baseline "
        "per seed | process s | peak RSS GiB per seed | plan / peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for base, run in STUDY:
        seeds = [s for s in args.seeds if (label(run), s) in done and (label(base), s) in done]
        if not seeds:
            continue
        ours = [done[(label(run), s)] for s in seeds]
        theirs = [done[(label(base), s)] for s in seeds]
        ratios = [a["ppl"] / b["ppl"] for a, b in zip(ours, theirs, strict=True)]
        times = [a["prune_s"] / b["prune_s"] for a, b in zip(ours, theirs, strict=True)]
        plans = [r["plan_gib"] / r["peak_rss_gib"] for r in ours]
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        lines.append(
            f"| {label(run)} | {label(base)} | {' '.join(map(str, seeds))} | "
            f"{' / '.join(format(r['ppl'], '.2f') for r in ours)} | "
            f"{' / '.join(format(r['ppl'], '.2f') for r in theirs)} | "
            f"{min(ratios):.3f} / {max(ratios):.3f} | {mean(ours, 'prune_s'):.0f} | "
            f"{' / '.join(format(t, '.2f') for t in times)} | {mean(ours, 'process_s'):.0f} | "
            f"{' / '.join(format(r['peak_rss_gib'], '.2f') for r in ours)} | {min(plans):.2f}-{max(plans):.2f} |"
        )
    return "\n".join(lines)


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
    parser.add_argument("--study", choices=("methods", "one-shot"), default="methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="calibration seeds (one-shot study)")
    parser.add_argument(
        "--section", default="bench_one_shot", help="the --write file's section for the one-shot study's table"
    )
    parser.add_argument(
        "--table-only", action="store_true", help="one-shot study: publish the kept runs' table, run nothing missing"
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra llmprune flags")
    args = parser.parse_args()
    if args.table_only and args.study != "one-shot":
        parser.error("--table-only is for --study one-shot")
    if args.study == "one-shot":
        one_shot_study(args)
        return
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
