"""Benchmark: one SparseGPT solve on a wide random layer, the plan's workspace against the measured peak,
the in-place solve against the previous out-of-place one (time and peak), and float32 against float64
inverses (mask agreement, reconstruction error).

Each solve runs in a fresh process that loads a saved Hessian, resets its peak RSS (VmHWM) and measures
what the solve adds; the old solve is tests/reference_sparsegpt.py, the engine's code before issue 18.

    python scripts/bench_solve.py --widths 8960 16384 --rows 1536 4096 [--out bench-solve] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time, torch
sys.path.insert(0, {tests!r})
from llmprune.engine.devices import current_rss, peak_rss, return_freed_memory, trim_heap, warm_up_kernels
from llmprune.methods import InputStats, Pattern
from llmprune.methods.sparsegpt import SparseGPT
from reference_sparsegpt import reference_prune
return_freed_memory()
folder, solver, dtype, pattern = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
hessian = torch.load(folder + "/hessian.pt")
weight = torch.load(folder + "/weight.pt")
pat = Pattern.parse(pattern, None)
stats = InputStats.from_hessian(hessian)  # the accumulated statistics, as the engine holds them when it solves
warm_up_kernels()
trim_heap()
open("/proc/self/clear_refs", "w").write("5")
base = current_rss()
started = time.perf_counter()
if solver == "in-place":
    result = SparseGPT(inverse_dtype=dtype).prune(weight, stats, pat)
    pruned, mask = result.weight, result.mask
else:
    pruned, mask = reference_prune(weight, hessian, pat, dtype)
seconds = time.perf_counter() - started
peak = peak_rss() - base
delta = weight - pruned
error = float(((delta @ hessian) * delta).sum() / ((weight @ hessian) * weight).sum())
tag = f"{{solver}}-{{sys.argv[3]}}-{{pattern.replace(':', 'of')}}"
torch.save({{"mask": mask, "weight": pruned}}, folder + f"/result-{{tag}}.pt")
rows, n = weight.shape
print(json.dumps({{"seconds": seconds, "peak": peak, "error": error,
                  "bound": SparseGPT.workspace_bytes(rows, n, torch.float32, dtype)}}))
"""


def make_layer(folder: Path, n: int, rows: int, tokens: int) -> None:
    """A Hessian from heavy-tailed inputs with a few outlier features (as LLM activations have), a weight."""
    import torch

    from llmprune.methods import InputStats

    if (folder / "hessian.pt").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(n)
    stats = InputStats(n, "hessian", torch.device("cpu"))
    scales = torch.exp(torch.randn(n, generator=g))
    scales[torch.randperm(n, generator=g)[: n // 200]] *= 20  # outlier channels
    for start in range(0, tokens, 2048):
        stats.add(torch.randn(min(2048, tokens - start), n, generator=g) * scales)
    torch.save(stats.hessian, folder / "hessian.pt")
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
    code = CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder), solver, dtype, pattern], capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"solve failed: {proc.stderr[-2000:]}")
    row = {**key, **json.loads(proc.stdout.strip().splitlines()[-1])}
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[8960, 16384])
    parser.add_argument("--rows", type=int, nargs="+", default=[1536, 4096], help="weight rows, one per width")
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens of each Hessian")
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--out", default="bench-solve")
    parser.add_argument("--reuse", action="store_true", help="reuse the solves already measured in --out")
    parser.add_argument("--reuse-only", action="store_true", help="tabulate the measured solves, run none")
    parser.add_argument("--write", help="update this Markdown file's bench_solve section")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from llmprune.methods.sparsegpt import SparseGPT

    lines = [
        f"Measured {date.today()} on {_machine()}. Command: `python scripts/bench_solve.py {' '.join(sys.argv[1:])}`.",
        "",
        "One solve per fresh process; peak: what the solve adds to the process's peak RSS (the Hessian and the "
        "weight are loaded before it); bound: the plan's SparseGPT workspace for that shape; before: the "
        "out-of-place solve the engine ran until issue 18 (tests/reference_sparsegpt.py), run next to the "
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
    table = "\n".join(lines)
    print(table)
    Path(args.out, "bench_solve.md").write_text(table + "\n")
    if args.write:
        from benchlib import update_section

        update_section(Path(args.write), table, "bench_solve")


def _machine() -> str:
    from benchlib import machine

    return machine()


if __name__ == "__main__":
    main()
