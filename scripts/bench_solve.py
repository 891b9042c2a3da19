"""Benchmark: one SparseGPT solve on a wide random layer, the plan's workspace against the measured peak,
the in-place solve against the previous out-of-place one (time and peak), and float32 against float64
inverses (mask agreement, reconstruction error).

Each solve runs in a fresh process that loads a saved Hessian, resets its peak RSS (VmHWM) and measures
what the solve adds; the old solve is tests/helpers/reference_sparsegpt.py, the engine's code before issue 18.

    python scripts/bench_solve.py --widths 8960 16384 --rows 1536 4096 [--out bench-solve] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from benchlib import machine, measure_here, publish_table, run_measured, script_parser


def child(folder: str, solver: str, dtype_name: str, pattern: str) -> None:
    """One solve in this fresh process (what solve() launches): loads the saved Hessian and weight, measures
    what the solve adds to the peak RSS (benchlib.measure_here), keeps the result and prints its row."""
    import torch

    from llmprune.engine.devices import return_freed_memory, warm_up_kernels
    from llmprune.methods import Hessian, InputStats, Pattern
    from llmprune.methods.sparsegpt import SparseGPT
    from tests.helpers.reference_sparsegpt import reference_prune  # the solve before issue 18, for comparison

    return_freed_memory()
    dtype = getattr(torch, dtype_name)
    hessian = torch.load(f"{folder}/hessian.pt")
    weight = torch.load(f"{folder}/weight.pt")
    pat = Pattern.parse(pattern, None)
    stats = InputStats.holding(Hessian.of(hessian))  # the accumulated statistics, as the engine holds them
    warm_up_kernels()
    with measure_here() as measured:
        if solver == "in-place":
            result = SparseGPT(inverse_dtype=dtype).prune(weight, stats, pat)
            pruned, mask = result.weight, result.mask
        else:
            pruned, mask = reference_prune(weight, hessian, pat, dtype)
    delta = weight - pruned
    error = float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())
    tag = f"{solver}-{dtype_name}-{pattern.replace(':', 'of')}"
    torch.save({"mask": mask, "weight": pruned}, f"{folder}/result-{tag}.pt")
    rows, n = weight.shape
    bound = SparseGPT.workspace_bytes(rows, n, torch.float32, dtype)
    print(json.dumps({"seconds": measured["seconds"], "peak": measured["peak_bytes"], "error": error, "bound": bound}))


def make_layer(folder: Path, n: int, rows: int, tokens: int) -> None:
    """A Hessian from heavy-tailed inputs with a few outlier features (as LLM activations have), a weight."""
    import torch

    from llmprune.methods import Hessian

    if (folder / "hessian.pt").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    hessian = Hessian(n, torch.device("cpu"))
    scales = torch.exp(torch.randn(n, generator=g))
    scales[torch.randperm(n, generator=g)[: n // 200]] *= 20  # outlier channels
    for start in range(0, tokens, 2048):
        hessian.add(torch.randn(min(2048, tokens - start), n, generator=g) * scales)
    torch.save(hessian.matrix, folder / "hessian.pt")
    torch.save(torch.randn(rows, n, generator=g) * 0.02, folder / "weight.pt")


def solve(folder: Path, solver: str, dtype: str, pattern: str, reuse: bool | str) -> dict:
    """One measured solve in a fresh process (its row kept in FOLDER/rows.jsonl; reused with --reuse;
    with --reuse-only, {} where none was measured)."""
    saved = folder / "rows.jsonl"
    key = {"solver": solver, "dtype": dtype, "pattern": pattern}
    if reuse and saved.exists():
        for line in saved.read_text().splitlines():
            row = json.loads(line)
            if all(row[k] == v for k, v in key.items()):
                return row
    if reuse == "only":
        return {}
    cmd = [sys.executable, Path(__file__).resolve(), "--child", folder, solver, dtype, pattern]
    row = {**key, **json.loads(run_measured(cmd, check="solve").stdout.strip().splitlines()[-1])}
    print(json.dumps({"folder": folder.name, **row}), flush=True)
    with saved.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def agreement(folder: Path, pattern: str) -> str:
    """How many mask entries the float32 and float64 in-place solves disagree on, of how many."""
    import torch

    tag = pattern.replace(":", "of")
    a = torch.load(folder / f"result-in-place-float32-{tag}.pt")["mask"]
    b = torch.load(folder / f"result-in-place-float64-{tag}.pt")["mask"]
    differ = int((a != b).sum())
    return f"{1 - differ / a.numel():.6f} ({differ} of {a.numel()} differ)"


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[8960, 16384])
    parser.add_argument("--rows", type=int, nargs="+", default=[1536, 4096], help="weight rows, one per width")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens of each Hessian")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--out", default="bench-solve")
    parser.add_argument("--reuse", action="store_true", help="reuse the solves already measured in --out")
    parser.add_argument("--reuse-only", action="store_true", help="tabulate the measured solves, run none")
    parser.add_argument("--write", help="update this Markdown file's bench_solve section")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)  # FOLDER SOLVER DTYPE PATTERN: one solve
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    from llmprune.methods.sparsegpt import SparseGPT

    lines = [
        f"Measured {date.today()} on {machine()}. Command: `python scripts/bench_solve.py {' '.join(sys.argv[1:])}`.",
        "",
        "One solve per fresh process; peak: what the solve adds to the process's peak RSS (the Hessian and the "
        "weight are loaded before it); bound: the plan's SparseGPT workspace for that shape; before: the "
        "out-of-place solve the engine ran until issue 18 (tests/helpers/reference_sparsegpt.py), run next to the "
        "in-place one; agreement: float32 and float64 masks, entry by entry; error: ‖ΔW X‖² / ‖W X‖².",
        "",
        "| n x n Hessian, weight | pattern | inverse | peak GiB (before) | bound GiB | n² of the inverse's dtype, GiB "
        "| s (before) | error | mask agreement fp32/fp64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, rows in zip(args.widths, args.rows):
        folder = Path(args.out) / f"n{n}-rows{rows}"
        make_layer(folder, n, rows, args.tokens)
        for pattern in args.patterns:
            for dtype in ("float64", "float32"):
                reuse = "only" if args.reuse_only else args.reuse
                new = solve(folder, "in-place", dtype, pattern, reuse)
                old = solve(folder, "reference", dtype, pattern, reuse)
                if not new or not old:
                    continue
                bound = SparseGPT.workspace_bytes(rows, n, torch.float32, getattr(torch, dtype))
                square = n * n * (8 if dtype == "float64" else 4) / 2**30
                tag = pattern.replace(":", "of")
                both = all((folder / f"result-in-place-{d}-{tag}.pt").exists() for d in ("float32", "float64"))
                agree = agreement(folder, pattern) if dtype == "float32" and both else ""
                lines.append(
                    f"| {n} x {n}, {rows} x {n} | {pattern} | {dtype} | {new['peak'] / 2**30:.2f} "
                    f"({old['peak'] / 2**30:.2f}) | {bound / 2**30:.2f} | {square:.2f} | "
                    f"{new['seconds']:.1f} ({old['seconds']:.1f}) | {new['error']:.5f} | {agree} |"
                )
    publish_table("\n".join(lines), "bench_solve", Path(args.out), args.write)


if __name__ == "__main__":
    main()
