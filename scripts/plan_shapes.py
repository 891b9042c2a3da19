"""The memory plans of the largest models, for GPUs this machine does not have: OPT-175B and Llama-3.1-70B
and 405B (scripts/shape_checkpoint.py writes their configs and sparse shards), SparseGPT 50%, 2:4 and
Wanda, at 80 GB and 40 GB of GPU memory, 128 x 2048 calibration tokens. Prints each plan, and with
--write puts them into a Markdown file's plan_shapes section.

    python scripts/plan_shapes.py --folder /tmp/shapes [--write docs/large-models.md]
"""

from __future__ import annotations

import contextlib
import io
import sys
from datetime import date
from pathlib import Path

from benchlib import script_parser, update_section
from shape_checkpoint import SHAPES, write_shape_checkpoint

RUNS = [
    ("opt-175b", "sparsegpt", "unstructured", "80GB"),
    ("opt-175b", "sparsegpt", "unstructured", "40GB"),
    ("opt-175b", "sparsegpt", "2:4", "40GB"),
    ("opt-175b", "wanda", "unstructured", "40GB"),
    ("llama-3.1-70b", "sparsegpt", "unstructured", "80GB"),
    ("llama-3.1-70b", "sparsegpt", "unstructured", "40GB"),
    ("llama-3.1-405b", "sparsegpt", "unstructured", "80GB"),
    ("llama-3.1-405b", "sparsegpt", "unstructured", "40GB"),
]


def plan(folder: Path, method: str, pattern: str, budget: str) -> tuple[str, dict]:
    import llmprune

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        result = llmprune.prune(
            str(folder),
            method=method,
            pattern=pattern,
            calibration=str(folder / "calibration.safetensors"),
            no_eval=True,
            plan_only=True,
            device="cuda",
            max_memory=f"cuda={budget},cpu=2TB",
            output="unused",
        )
    return result["plan"], result["memory_plan"]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--folder", type=Path, default=Path("shapes"), help="where the shape checkpoints go")
    parser.add_argument("--write", help="update this Markdown file's plan_shapes section")
    args = parser.parse_args()
    parts = [
        f"Printed {date.today()} by `python scripts/plan_shapes.py {' '.join(sys.argv[1:])}`: "
        "`llmprune FOLDER --method M [--pattern 2:4] --calibration FOLDER/calibration.safetensors --no-eval "
        "--plan-only --device cuda --max-memory cuda=SIZE,cpu=2TB` on shape checkpoints "
        "(`scripts/shape_checkpoint.py`), 128 x 2048 calibration tokens.",
        "",
        "| model | method | budget | GPU peak GiB | host GiB | choices |",
        "|---|---|---|---|---|---|",
    ]
    texts = []
    for shape, method, pattern, budget in RUNS:
        folder = args.folder / shape
        if not (folder / "config.json").exists():
            write_shape_checkpoint(folder, SHAPES[shape])
        text, data = plan(folder, method, pattern, budget)
        label = f"{method} {'50%' if pattern == 'unstructured' else pattern}"
        c = data["choice"]
        inverse = c["inverse_dtype"].removeprefix("torch.")
        choices = f"activations on {c['activations']}, {c['order']} order, inverse {inverse}"
        parts.append(
            f"| {shape} | {label} | {budget} | {data['peak_bytes'] / 2**30:.2f} | {data['host_bytes'] / 2**30:.2f} "
            f"| {choices} |"
        )
        texts.append(f"{shape}, {label}, --max-memory cuda={budget}:\n\n```\n{text}\n```")
        print(texts[-1], flush=True)
    section = "\n".join(parts) + "\n\n" + "\n\n".join(texts)
    if args.write:
        update_section(Path(args.write), section, "plan_shapes")


if __name__ == "__main__":
    main()
