"""Profile one pruning process with py-spy and attribute its CPU samples to phases.

Runs the command under `py-spy record --format raw` (all threads, idle excluded) and classifies each
sampled stack by the first phase whose marker appears in it: the pruning solve, the calibration
statistics (Hessians / input norms), activation parking, weight I/O, the decoder layers' forward,
and the rest (imports, loading, saving). The same markers cover llmprune and llm-compressor, so the
two tools' time can be compared phase by phase (issue 3's profile).

    python scripts/profile_phases.py --out prof.txt -- python -m llmprune MODEL --method sparsegpt ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import Counter
from pathlib import Path

from benchlib import run_measured, script_parser

PHASES: list[tuple[str, tuple[str, ...]]] = [
    (
        "pruning solve",
        (
            "inverse_factor (",
            "llmprune/methods/sparsegpt.py",
            "llmprune/methods/wanda.py",
            "llmprune/methods/masks.py",
            "sparsify_weight (",
            "compress_modules (",
        ),
    ),
    (
        "calibration statistics",
        ("llmprune/methods/base.py", "_observe (", "accumulate_hessian (", "accumulate_row_scalars ("),
    ),
    ("activation parking", ("park (", "unpark (", "llmprune/engine/activations.py")),
    ("weight I/O", ("llmprune/models/checkpoint.py", "llmprune/export/writer.py", "safetensors/")),
    ("decoder-layer forward", ("forward (transformers/", "_call_impl (torch/nn/modules/", "forward (<eval_with_key")),
]


WAITING = ("Condition.wait (threading.py", "_wait_for_tstate_lock (threading.py", "Event.wait (threading.py")


def phase_of(stack: str) -> str | None:
    """The first phase (in PHASES order) with a marker in this semicolon-joined stack; None for a thread
    blocked in Python's threading waits (lockstep chunks waiting for their turn), which py-spy counts as busy."""
    if any(marker in stack.rsplit(";", 1)[-1] for marker in WAITING):
        return None
    for name, markers in PHASES:
        if any(marker in stack for marker in markers):
            return name
    return "other (imports, model load/save, setup)"


def summarize(raw: Path) -> Counter:
    """Samples per phase from py-spy's raw (collapsed-stack) output."""
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        phase = phase_of(stack) if stack and n.isdigit() else None
        if phase:
            counts[phase] += int(n)
    return counts


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--out", required=True, help="the phase table (Markdown); the raw stacks go beside it")
    parser.add_argument("--rate", type=int, default=50, help="samples per second")
    parser.add_argument("--summarize", metavar="RAW", help="only summarize an existing raw file")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.out)
    raw = Path(args.summarize) if args.summarize else out.with_suffix(".raw.txt")
    if not args.summarize:
        cmd = [spy, "record", "--format", "raw", "-r", str(args.rate), "-o", str(raw), "--", *command]
        run_measured(cmd, capture=False, check="profiled command")
    counts = summarize(raw)
    total = sum(counts.values())
    lines = ["| phase | CPU-thread seconds | share |", "|---|---|---|"]
    lines += [f"| {name} | {n / args.rate:.1f} | {n / total:.1%} |" for name, n in counts.most_common()]
    table = "\n".join(lines)
    print(table)
    out.write_text(table + "\n")


if __name__ == "__main__":
    main()
