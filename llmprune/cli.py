"""The `llmprune` command: `llmprune MODEL [flags]` prunes; `llmprune eval ...` and friends are subcommands."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable

from llmprune import __version__
from llmprune.errors import LLMPruneError, QualityGateError

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
    parser.add_argument(
        "--method",
        default="sparsegpt",
        help=f"one of {', '.join(METHODS)} (unstructured / N:M), or fisher, flap, l2-structured (remove heads and "
        "neurons); default sparsegpt",
    )
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
        "--forward-dtype",
        default="auto",
        metavar="DTYPE",
        help="dtype of the calibration forward's matmuls and attention: auto, float32, bfloat16 or float16 (GPU). "
        "Narrower than the layers runs under autocast, wider loads the layers in it; statistics, solves and saved "
        "weights keep full precision. auto: the model's dtype on a GPU, float32 on a CPU",
    )
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
        default="parallel",
        choices=["parallel", "sequential"],
        help="parallel: every module sees the dense layer's inputs, as in the papers (default); "
        "sequential: prune each module as soon as it has seen all windows, one forward per layer",
    )
    parser.add_argument("--batch-size", type=int, default=None, metavar="N", help="windows per forward (default auto)")
    parser.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening (default 0.01)")
    parser.add_argument("--blocksize", type=int, default=128, help="SparseGPT block size (default 128)")
    parser.add_argument(
        "--inverse-dtype",
        default="auto",
        choices=["auto", "float64", "float32"],
        help="dtype of SparseGPT's Hessian inverse factor; auto: float64 unless the memory plan needs float32",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument(
        "--park",
        default="auto",
        help="where chunks waiting for a module's statistics keep their tensors: memory, host (CPU RAM, for GPU "
        "runs) or disk; auto: memory unless the memory plan needs parking (host from a GPU, disk on a CPU)",
    )
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        default=None,
        help="memory budget of the compute device (e.g. 8GB), or cpu=SIZE,cuda=SIZE; default: what is free. "
        "The run adapts to it or refuses before reading weights",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the unfinished run at --output (refuse if none)"
    )
    parser.add_argument(
        "--solver-devices",
        metavar="DEV,DEV",
        default=None,
        help="devices that run the per-module solves concurrently (default: every visible GPU with --device cuda)",
    )
    parser.add_argument("--plan-only", action="store_true", help="print the memory plan and exit (reads no weights)")
    parser.add_argument(
        "--activations",
        default="auto",
        help="where calibration activations live between layers: auto (memory, or disk when the budget needs it), "
        "memory or disk",
    )
    parser.add_argument(
        "--save-format",
        default="dense",
        choices=["dense", "packed-2:4"],
        help="dense: safetensors with exact zeros, loads anywhere (default); packed-2:4: kept values + 2-bit positions",
    )
    parser.add_argument(
        "--max-ppl-increase",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="quality gate: fail the run (exit 3) if pruned perplexity > dense x (1 + F) (default 0.5)",
    )
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None, help="push the folder if the gate passes")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--revision", metavar="BRANCH", default=None, help="Hub branch to push to (default main)")
    parser.add_argument("--commit-message", metavar="MSG", default=None, help="Hub commit message")
    structured = parser.add_argument_group("structured methods (fisher, flap, l2-structured)")
    structured.add_argument(
        "--remove",
        type=_fraction,
        default=None,
        metavar="F",
        help="fraction of decoder-layer parameters to remove (default 0.2)",
    )
    structured.add_argument(
        "--target-flops",
        type=_fraction,
        default=None,
        metavar="F",
        help="instead of --remove: keep at most F of the decoder FLOPs per token",
    )
    structured.add_argument(
        "--heads-per-group",
        action="store_true",
        help="remove the same number of query heads from every KV group (default: whole KV groups)",
    )
    structured.add_argument("--keep-heads", type=int, default=None, metavar="N", help="explicit query heads per layer")
    structured.add_argument(
        "--keep-neurons", type=int, default=None, metavar="N", help="explicit FFN neurons per layer"
    )
    structured.add_argument(
        "--no-mask-tuning",
        dest="mask_tuning",
        action="store_false",
        help="skip the least-squares rescaling of kept heads and neurons",
    )
    structured.add_argument(
        "--neuron-multiple", type=int, default=64, metavar="N", help="kept FFN width is a multiple of N (default 64)"
    )
    structured.add_argument(
        "--fisher-batch",
        type=int,
        default=None,
        metavar="N",
        help="windows per Fisher minibatch, one squared-gradient sample each (default: half a forward chunk)",
    )
    structured.add_argument(
        "--tuning-damping",
        type=float,
        default=0.01,
        metavar="F",
        help="ridge damping of mask tuning, as a fraction of the mean diagonal (default 0.01)",
    )
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
    options["command"] = shlex.join(["llmprune", *argv])
    report = prune(args.model, **options)
    if args.plan_only:
        if args.json:
            print(json.dumps(report["memory_plan"], indent=2, default=str))
        return 0
    if args.json:
        print(json.dumps(summary(report), indent=2))
    elif not args.quiet:
        print(format_summary(report))
    gate = report["quality_gate"]
    if gate["passed"] is False:
        pushed = " and not pushed" if report.get("hub") else ""
        raise QualityGateError(
            f"quality gate failed: {gate['reason']}; {report['output']} is written{pushed}, "
            "marked failed in llmprune.json"
        )
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
        "quality_gate": report.get("quality_gate", {}).get("status"),
        "hub": report.get("hub"),
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
    if report.get("quality_gate"):
        lines.append(f"  quality gate     {report['quality_gate']['status'].replace('_', ' ')}")
    if report.get("hub"):
        hub = report["hub"]
        lines.append(f"  hub              {hub['commit_url'] if hub['pushed'] else 'not pushed: ' + hub['reason']}")
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


def _convert(argv: list[str], pack: bool) -> int:
    from llmprune.export.packed import convert_folder

    name = "pack" if pack else "unpack"
    what = "dense 2:4 folder into the packed 2:4 format" if pack else "packed 2:4 folder back into the dense checkpoint"
    parser = Parser(prog=f"llmprune {name}", description=f"Convert a {what}.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("output", metavar="OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    args = parser.parse_args(argv)
    output = convert_folder(args.folder, args.output, args.overwrite, pack=pack)
    if pack:
        packed = json.loads((output / "llmprune.json").read_text())["packed"]
        print(
            f"packed {packed['packed_tensors']} 2:4 tensors to {packed['ratio']:.4f}x their dense bytes "
            f"({packed['other_tensors']} other tensors as is) -> {output}"
        )
    else:
        print(f"unpacked -> {output}")
    return 0


@subcommand("pack")
def run_pack(argv: list[str]) -> int:
    return _convert(argv, pack=True)


@subcommand("unpack")
def run_unpack(argv: list[str]) -> int:
    return _convert(argv, pack=False)


@subcommand("push")
def run_push(argv: list[str]) -> int:
    from llmprune.hub.push import push_folder

    parser = Parser(prog="llmprune push", description="Upload a finished output folder to the Hugging Face Hub.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("repo_id", metavar="ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", metavar="BRANCH", default=None, help="branch to push to (default main)")
    parser.add_argument("--commit-message", metavar="MSG", default=None)
    parser.add_argument("--force", action="store_true", help="push even if the quality gate failed or was not run")
    args = parser.parse_args(argv)
    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        force=args.force,
    )
    print(f"pushed {args.folder} to {result['repo_id']}@{result['revision']}: {result['commit_url']}")
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
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("llmprune: interrupted", file=sys.stderr)
        return 130
