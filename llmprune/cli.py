"""The `llmprune` command: `llmprune MODEL [flags]` prunes; `llmprune eval ...` and friends are subcommands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from llmprune.argparsing import Parser
from llmprune.errors import LLMPruneError, QualityGateError
from llmprune.report import REPORT_NAME, read_report
from llmprune.settings import SECTIONS, Common, Option, options_of
from llmprune.version import __version__

SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {}
PLUGIN_GROUP = "llmprune.commands"  # entry points of other packages' subcommands (llmprune_serve's `serve`)
log = logging.getLogger("llmprune")


def subcommand(name: str):
    def register(func: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
        SUBCOMMANDS[name] = func
        return func

    return register


def plugin_commands() -> dict[str, Callable[[], Callable[[list[str]], int]]]:
    """Subcommands other installed packages declare (entry points of group PLUGIN_GROUP), loaded on use."""
    return {entry.name: entry.load for entry in entry_points(group=PLUGIN_GROUP)}


class StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record is emitted (a caller, such as a test
    capturing output, may replace it between runs)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool) -> None:
    """Log lines on stderr as 'llmprune: message' (warnings and errors only with --quiet)."""
    logger = logging.getLogger("llmprune")
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("llmprune: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _add_option(parser, option: Option, default: object) -> None:
    """One flag from an Option declaration."""
    kwargs: dict = {"dest": option.name, "default": default, "help": option.help}
    if isinstance(option.default, bool):
        kwargs["action"] = "store_false" if option.default else "store_true"
    else:
        for key in ("type", "metavar", "nargs"):
            if getattr(option, key) is not None:
                kwargs[key] = getattr(option, key)
        if option.choices and not option.metavar:  # shown, not checked here: settings.validate checks every value
            kwargs["metavar"] = "{" + ",".join(map(str, option.choices)) + "}"
        if option.nargs and isinstance(default, tuple):
            kwargs["default"] = list(default)
    parser.add_argument(option.cli_flag, **kwargs)


def prune_parser() -> argparse.ArgumentParser:
    """`llmprune MODEL`: the flags come from the settings sections and from every method's own options."""
    from llmprune.run import KINDS

    parser = Parser(
        prog="llmprune",
        description="One-shot pruning of a Hugging Face causal LM, streamed one decoder layer at a time. "
        f"Other commands: llmprune {{{','.join(sorted({*SUBCOMMANDS, *plugin_commands()}))}}} --help",
    )
    parser.add_argument("model", metavar="MODEL", help=options_of(Common)[0].help)
    kinds = "; ".join(f"{kind}: {', '.join(registry)}" for kind, (registry, _) in KINDS.items())
    parser.add_argument(
        "--method", default=None, help=f"{kinds} (default {Common.method}; with --target-speedup, speed)"
    )
    for name, section in SECTIONS.items():  # the common settings first, then one group per section
        group = parser if name == "common" else parser.add_argument_group(section.title)
        for option in options_of(section):
            if option.name not in ("model", "method"):
                _add_option(group, option, option.default)
    declared: dict[str, Option] = {}
    for registry, _ in KINDS.values():
        for name, method in registry.items():
            if not method.options:
                continue
            group = parser.add_argument_group(f"--method {name}: {method.summary}")
            for option in method.options:
                if option.name in declared:  # methods may share an option, declared alike (e.g. a damping)
                    if declared[option.name] != option:
                        raise LLMPruneError(f"{option.cli_flag} is declared differently by two methods")
                    continue
                declared[option.name] = option
                _add_option(group, option, None)  # None: not given (the method's default applies)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--version", action="version", version=f"llmprune {__version__}")
    return parser


def run_prune(argv: list[str]) -> int:
    from llmprune.run import prune

    args = prune_parser().parse_args(argv)
    setup_logging(args.quiet)
    options = {k: v for k, v in vars(args).items() if k not in ("model", "json")}
    options["command"] = shlex.join(["llmprune", *redacted(argv)])
    report = prune(args.model, **options)
    if args.plan_only:
        print(json.dumps(report["memory_plan"], indent=2, default=str) if args.json else report["plan"], flush=True)
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
            f"marked failed in {REPORT_NAME}"
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
        "damping_retries": report.get("damping_retries"),
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
    profile = report.get("sparsity_profile", {})
    if profile.get("profile") == "owl":
        layers = [layer["sparsity"] for layer in profile["layers"]]
        lines.append(
            f"  profile          owl: layer sparsities {min(layers):.3f} .. {max(layers):.3f} (lambda "
            f"{profile['lambda']:g}, M {profile['m']:g}; outlier ratios in llmprune.json)"
        )
    if s["damping_retries"]:
        lines.append(f"  damping retries  {s['damping_retries']} (see llmprune.json)")
    if report.get("experts"):
        experts, params = report["experts"], report["experts"]["parameters"]
        lines.append(
            f"  experts          {experts['dense_experts']} -> {experts['kept_experts']} per MoE layer (decoder "
            f"parameters {params['decoder_after'] / params['decoder_before']:.3f}x)"
        )
    uncovered = report.get("moe", {}).get("uncovered")
    if uncovered:
        policy = "left dense" if report["moe"]["uncovered_policy"] == "dense" else "pruned by magnitude"
        lines.append(
            f"  uncovered        {len(uncovered)} experts got no calibration token: {policy} (see llmprune.json)"
        )
    lines.append(f"  time             {s['seconds']:.1f} s (pruning {s['prune_seconds']:.1f} s)")
    cuda = f", CUDA {s['peak_cuda_gib']:.2f} GiB" if s["peak_cuda_gib"] else ""
    lines.append(f"  peak memory      RSS {s['peak_rss_gib']:.2f} GiB{cuda}")
    for name, task in (report.get("tasks") or {}).get("results", {}).items():
        change = task["pruned"] - task["dense"]
        lines.append(f"  {name[:16]:16s} {task['metric']} {task['dense']:.4f} -> {task['pruned']:.4f} ({change:+.4f})")
    if report.get("quality_gate"):
        lines.append(f"  quality gate     {report['quality_gate']['status'].replace('_', ' ')}")
    if report.get("hub"):
        hub = report["hub"]
        lines.append(f"  hub              {hub['commit_url'] if hub['pushed'] else 'not pushed: ' + hub['reason']}")
    return "\n".join(lines)


def redacted(argv: list[str]) -> list[str]:
    """argv with the value of --token hidden, for the command recorded in llmprune.json and the card."""
    out, hide = [], False
    for arg in argv:
        out.append("***" if hide else "--token=***" if arg.startswith("--token=") else arg)
        hide = arg == "--token"
    return out


@subcommand("eval")
def run_eval(argv: list[str]) -> int:
    from llmprune.eval.evaluate import evaluate

    parser = Parser(
        prog="llmprune eval",
        description="Streamed perplexity of a model or pruned folder, or with --tasks its accuracy on "
        "lm-evaluation-harness tasks.",
        argument_default=argparse.SUPPRESS,  # a flag not given leaves evaluate()'s default in force
    )
    parser.add_argument("model", metavar="DIR_OR_MODEL")
    parser.add_argument("--dataset", help="wikitext2 (default; test split), a Hub id, or a local file/folder")
    parser.add_argument("--seqlen", type=int, help="tokens per window (default 2048, capped at the model context)")
    parser.add_argument("--samples", type=int, help="evaluate at most N windows")
    parser.add_argument("--device", help="auto, cpu or cuda (default auto)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="windows per forward, or lm-eval requests per forward or per server request (default auto; 8)",
    )
    tasks = parser.add_argument_group("task accuracy (lm-evaluation-harness, pip install 'llmprune[eval]')")
    tasks.add_argument("--tasks", metavar="T1,T2", help="lm-eval tasks, or `paper` for the Wanda paper's seven")
    tasks.add_argument("--include-path", metavar="DIR", help="folder of extra task YAMLs")
    tasks.add_argument("--limit", type=int, metavar="N", help="at most N documents per task")
    tasks.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples (default: the task's)")
    tasks.add_argument("--base-url", metavar="URL", help="score a running llmprune/vLLM server instead")
    tasks.add_argument("--api-key", metavar="KEY", help="the server's key (--base-url)")
    tasks.add_argument(
        "--stream",
        action="store_true",
        help="score layer by layer (loglikelihood tasks; default: only when the model does not fit in memory)",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model's own code (auto_map models)")
    parser.add_argument("--quiet", action="store_true", default=False)
    parser.add_argument("--json", action="store_true", default=False)
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    options = vars(args)
    if "tasks" in options:
        return _eval_tasks(options)
    task_only = sorted(set(options) & {"include_path", "limit", "num_fewshot", "base_url", "api_key", "stream"})
    if task_only:
        raise LLMPruneError(f"--{task_only[0].replace('_', '-')} is for task accuracy: add --tasks T1,T2")
    options = {k: v for k, v in options.items() if k not in ("model", "json")}
    result = evaluate(args.model, **options)
    if result.get("rank", 0):  # under torchrun, rank 0 prints the result every rank has
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"perplexity {result['perplexity']:.4f} on {result['windows']} x {result['seqlen']} tokens "
            f"of {result['eval']['source']} ({result['seconds']:.1f} s)"
        )
    return 0


def _eval_tasks(options: dict) -> int:
    """`llmprune eval --tasks`: lm-eval's accuracy per task, printed (and as JSON with --json)."""
    from llmprune.engine.ranks import launched
    from llmprune.eval.tasks import task_accuracy
    from llmprune.models import remote_code
    from llmprune.models.resolve import resolve_model
    from llmprune.settings import parse_tasks

    if launched() > 1:
        raise LLMPruneError("llmprune eval --tasks runs as one process (each rank would run every task); drop torchrun")
    perplexity_only = sorted(set(options) & {"dataset", "seqlen", "samples"})
    if perplexity_only:
        raise LLMPruneError(f"--{perplexity_only[0]} is for perplexity, not --tasks")
    for flag in ("limit", "num_fewshot", "batch_size"):
        if options.get(flag) is not None and options[flag] < (0 if flag == "num_fewshot" else 1):
            raise LLMPruneError(f"--{flag.replace('_', '-')} must be positive (got {options[flag]})")
    folder = resolve_model(options["model"], quiet=options["quiet"])
    names = parse_tasks(options["tasks"])
    keys = ("include_path", "limit", "num_fewshot", "base_url", "api_key", "device", "batch_size", "stream")
    result = {"model": options["model"], "folder": str(folder)}
    with remote_code.consent(options.get("trust_remote_code", False)) as grant:
        grant(folder)
        result.update(task_accuracy(folder, names, **{k: options[k] for k in keys if k in options}))
    if options["json"]:
        print(json.dumps(result, indent=2))
        return 0
    for name, score in result["tasks"].items():
        stderr = f" ± {score['stderr']:.4f}" if score["stderr"] is not None else ""
        print(f"{name:24s} {score['metric']:10s} {score['accuracy']:.4f}{stderr}  ({score['samples']} documents)")
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
        packed = (read_report(output) or {})["packed"]
        print(
            f"packed {packed['packed_tensors']} 2:4 tensors to {packed['ratio']:.4f}x their dense bytes "
            f"({packed['other_tensors']} other tensors as is) -> {output}"
        )
    else:
        print(f"unpacked -> {output}")
    return 0


@subcommand("report")
def run_report(argv: list[str]) -> int:
    """`llmprune report OUT`: per-layer plots beside the report, linked from the model card."""
    from llmprune.export.card import refresh_card
    from llmprune.export.plots import PLOTS_DIR, PNG_NAME, write_plots
    from llmprune.report import write_report

    parser = Parser(prog="llmprune report", description="Per-layer plots of a pruned folder (matplotlib).")
    parser.add_argument("folder", metavar="OUT")
    parser.add_argument("--format", choices=["png", "html"], default="png", help="png (default), or html too")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    report = read_report(folder)
    if report is None:
        raise LLMPruneError(f"{folder} has no {REPORT_NAME}: not a pruned folder")
    written = write_plots(folder, report, ("png", "html") if args.format == "html" else ("png",))
    updated = {**report, "plots": {"png": f"{PLOTS_DIR}/{PNG_NAME}"}}
    if updated != report:
        write_report(folder, updated)
        refresh_card(folder, report, updated)
    for path in written:
        print(path)
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


def _say(line: str) -> None:
    """Write one line to stderr in a single write, so the lines of ranks sharing torchrun's stderr never interleave
    (print writes the text and its newline separately)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def guarded(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command the llmprune way: an LLMPruneError is one `llmprune: error:` line and its exit code, an
    interrupt exits 130, and the command's logging ends with it (a caller's own configuration is restored)."""
    logger = logging.getLogger("llmprune")
    before = (logger.level, logger.propagate)
    try:
        return command(argv)
    except LLMPruneError as exc:
        _say("llmprune: error: " + " ".join(str(exc).split()))
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        _say("llmprune: interrupted")
        return 130
    finally:
        for handler in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a subcommand, or prune."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def dispatch(argv: list[str]) -> int:
        handler = SUBCOMMANDS.get(argv[0]) if argv else None
        plugin = plugin_commands().get(argv[0]) if argv and handler is None else None
        if plugin is not None:
            handler = plugin()
        if handler is not None:
            return handler(argv[1:])
        return run_prune(argv[1:] if argv and argv[0] == "prune" else argv)

    return guarded(dispatch, argv)
