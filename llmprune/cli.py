"""The `llmprune` command: `llmprune MODEL [flags]` prunes; `llmprune eval ...` and friends are subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from llmprune import __version__
from llmprune.errors import LLMPruneError

SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), like every other llmprune error."""

    def error(self, message: str):  # type: ignore[override]
        raise LLMPruneError(f"{message} (see {self.prog} --help)")


def subcommand(name: str):
    def register(func: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        SUBCOMMANDS[name] = func
        return func

    return register


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc


def prune_parser() -> argparse.ArgumentParser:
    from llmprune.methods import METHODS

    parser = Parser(
        prog="llmprune",
        description="One-shot pruning of a Hugging Face causal LM, streamed one decoder layer at a time. "
        f"Other commands: llmprune {{{','.join(sorted(SUBCOMMANDS))}}} --help",
    )
    parser.add_argument("model", metavar="MODEL", help="local folder, .gguf file, Hub id, or alias such as opt-125m")
    parser.add_argument("--method", default="sparsegpt", help=f"one of {', '.join(METHODS)} (default sparsegpt)")
    parser.add_argument(
        "--sparsity",
        type=_fraction,
        default=None,
        help="fraction of weights to remove, in [0, 1) (default 0.5; N:M implies its own)",
    )
    parser.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4 (N kept of every M)")
    parser.add_argument(
        "--calibration",
        default="c4",
        metavar="SRC",
        help="c4, wikitext2, a Hub dataset id, a .txt/.md/.jsonl file or a folder (default c4)",
    )
    parser.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the model context")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default 0)")
    parser.add_argument("--output", metavar="DIR", help="output folder (default ./MODEL-METHOD-SPARSITY)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument(
        "--eval",
        metavar="SRC",
        default=None,
        help="perplexity source (default: held-out 10%% of a local calibration corpus, else wikitext2)",
    )
    parser.add_argument("--eval-samples", type=int, default=None, metavar="N", help="evaluate at most N windows")
    parser.add_argument("--no-eval", action="store_true", help="skip the dense and pruned perplexity")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--dtype", default=None, help="output dtype: float32, float16 or bfloat16 (default: as input)")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["*"],
        metavar="GLOB",
        help="Linear modules to prune, by name inside a layer (default: all, e.g. 'mlp.*')",
    )
    parser.add_argument("--ignore", nargs="+", default=[], metavar="GLOB", help="Linear modules to leave dense")
    parser.add_argument(
        "--order",
        default="sequential",
        choices=["sequential", "parallel"],
        help="sequential: prune each module as soon as it has seen all windows (default); "
        "parallel: every module sees dense inputs, as in the papers",
    )
    parser.add_argument("--batch-size", type=int, default=None, metavar="N", help="windows per forward (default auto)")
    parser.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening (default 0.01)")
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size (default 128)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    return parser


def run_prune(argv: list[str]) -> int:
    from llmprune.pipeline import prune

    args = prune_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("model", "json")}
    options["targets"] = tuple(options["targets"])
    options["ignore"] = tuple(options["ignore"])
    options["quiet"] = args.quiet or args.json
    report = prune(args.model, **options)
    if args.json:
        print(json.dumps(summary(report), indent=2))
    elif not args.quiet:
        print(format_summary(report))
    return 0


def summary(report: dict) -> dict:
    """The short form of a report: what a user checks after a run."""
    ppl = report.get("perplexity") or {}
    return {
        "output": report.get("output"),
        "method": report["method"],
        "pattern": report["pattern"],
        "achieved_sparsity": report["achieved_sparsity"],
        "dense_perplexity": ppl.get("dense"),
        "pruned_perplexity": ppl.get("pruned"),
        "damping_retries": report["damping_retries"],
        "seconds": report["timings"].get("total_seconds"),
        "prune_seconds": report["timings"].get("prune_seconds"),
        "peak_rss_gib": round(report["peak_memory"]["rss_bytes"] / 2**30, 3),
        "peak_cuda_gib": round(report["peak_memory"]["cuda_bytes"] / 2**30, 3)
        if report["peak_memory"]["cuda_bytes"]
        else None,
    }


def format_summary(report: dict) -> str:
    s = summary(report)
    lines = [
        "",
        f"  output           {s['output']}",
        f"  method           {s['method']} ({s['pattern']}), achieved sparsity {s['achieved_sparsity']:.4f}",
    ]
    if s["dense_perplexity"] is not None:
        ev = report["perplexity"]["eval"]
        lines.append(
            f"  perplexity       dense {s['dense_perplexity']:.3f} -> pruned {s['pruned_perplexity']:.3f} "
            f"({(s['pruned_perplexity'] / s['dense_perplexity'] - 1) * 100:+.1f}%) on {ev['count']} x "
            f"{ev['seqlen']} tokens of {ev['source']}"
        )
    else:
        lines.append("  perplexity       not evaluated (--no-eval)")
    if s["damping_retries"]:
        lines.append(f"  damping retries  {s['damping_retries']} (see llmprune.json)")
    lines.append(f"  time             {s['seconds']:.1f} s (pruning {s['prune_seconds']:.1f} s)")
    cuda = f", CUDA {s['peak_cuda_gib']:.2f} GiB" if s["peak_cuda_gib"] else ""
    lines.append(f"  peak memory      RSS {s['peak_rss_gib']:.2f} GiB{cuda}")
    return "\n".join(lines)


@subcommand("eval")
def run_eval(argv: list[str]) -> int:
    from llmprune.pipeline import evaluate

    parser = Parser(prog="llmprune eval", description="Streamed perplexity of a model or pruned folder.")
    parser.add_argument("model", metavar="DIR_OR_MODEL")
    parser.add_argument(
        "--dataset", default="wikitext2", help="wikitext2 (test split), a Hub id, or a local file/folder"
    )
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=None, help="evaluate at most N windows")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = evaluate(
        args.model,
        dataset=args.dataset,
        seqlen=args.seqlen,
        samples=args.samples,
        device=args.device,
        batch_size=args.batch_size,
        quiet=args.quiet or args.json,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} on {result['windows']} x {result['seqlen']} tokens "
            f"of {result['eval']['source']} ({result['seconds']:.1f} s)"
        )
    return 0


@subcommand("serve")
def run_serve(argv: list[str]) -> int:
    """`llmprune serve DIR_OR_MODEL`: the OpenAI-compatible service in serve/ (see its --help)."""
    from serve.cli import main as serve_main

    return serve_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a subcommand, or prune."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = SUBCOMMANDS.get(argv[0]) if argv else None
    try:
        if handler is not None:
            return handler(argv[1:])
        if argv and argv[0] == "prune":
            argv = argv[1:]
        return run_prune(argv)
    except LLMPruneError as exc:
        print("llmprune: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130
