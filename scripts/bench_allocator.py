"""One decoder layer's forward per calibration window under several allocator settings, in the main
thread and in lockstep chunk threads (as the engine runs it): how much llmprune's allocator setting
(`return_freed_memory`: M_MMAP_THRESHOLD 1 MiB, M_ARENA_MAX 2) costs the forward, and what torch's
transparent huge pages for large buffers take back.

Each setting runs in its own process (mallopt cannot be undone, torch reads THP_MEM_ALLOC_ENABLE once);
prints one Markdown table.

    python scripts/bench_allocator.py [--model smollm2-135m-gguf] [--windows 32] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import flags, layer_forward, load_float32_model, machine, run_measured, script_parser

SETTINGS = {  # name: (mallopt calls or "llmprune", environment)
    "glibc defaults": ([], {}),
    "llmprune's (`M_MMAP_THRESHOLD` 1 MiB, `M_ARENA_MAX` 2)": ("llmprune", {}),
    "llmprune's with torch's huge pages (`THP_MEM_ALLOC_ENABLE=1`)": ("llmprune", {"THP_MEM_ALLOC_ENABLE": "1"}),
    "`M_ARENA_MAX` 2 only": ([(-8, 2)], {}),
}
CASES = [("main", 8), ("lockstep", 8), ("main", 2), ("lockstep", 2)]


def measure(setting: str, model_name: str, windows: int, seqlen: int, repeats: int) -> list[float]:
    """Median ms per window for each case, in this process, after applying `setting`."""
    import ctypes

    import torch

    from llmprune.engine.devices import return_freed_memory
    from llmprune.engine.lockstep import Lockstep

    mallopts, _ = SETTINGS[setting]
    if mallopts == "llmprune":
        return_freed_memory()
    else:
        for option, value in mallopts:
            ctypes.CDLL("libc.so.6").mallopt(option, value)
    model = load_float32_model(model_name)
    layer = model.model.layers[0]
    hidden = torch.randn(windows, seqlen, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    calls: dict[int, tuple] = {}

    def forward(x: torch.Tensor) -> None:
        if x.shape[0] not in calls:
            positions = torch.arange(seqlen)[None].expand(x.shape[0], -1)
            calls[x.shape[0]] = (positions, model.model.rotary_emb(x, positions))
        positions, rope = calls[x.shape[0]]
        layer_forward(layer, x, rope, positions)

    def run(kind: str, size: int) -> float:
        started = time.perf_counter()
        if kind == "main":
            for start in range(0, windows, size):
                forward(hidden[start : start + size])
        else:
            Lockstep(windows // size).run(lambda k: forward(hidden[k * size : (k + 1) * size]))
        return time.perf_counter() - started

    for case in CASES:
        run(*case)
    seconds: dict[tuple, list[float]] = {case: [] for case in CASES}
    for _ in range(repeats):  # cases interleaved
        for case in CASES:
            seconds[case].append(run(*case))
    return [statistics.median(seconds[case]) / windows * 1000 for case in CASES]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # the child process's one setting
    args = parser.parse_args()
    if any(args.windows % size for _, size in CASES):  # a partial chunk would be timed as none
        parser.error(f"--windows must be a multiple of every chunk size ({sorted({size for _, size in CASES})})")
    if args.setting:
        per_window = measure(args.setting, args.model, args.windows, args.seqlen, args.repeats)
        print(" ".join(f"{ms:.1f}" for ms in per_window))
        return

    heads = [f"{'main thread' if kind == 'main' else 'lockstep threads'}, chunks of {size}" for kind, size in CASES]
    print(f"{machine()}; one layer of {args.model}, {args.windows} windows of {args.seqlen} tokens, ms per window")
    print("| allocator | " + " | ".join(heads) + " |")
    print("|---" * (len(CASES) + 1) + "|")
    for setting in SETTINGS:
        child = [sys.executable, __file__, "--setting", setting]
        child += flags(model=args.model, windows=args.windows, seqlen=args.seqlen, repeats=args.repeats)
        environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | SETTINGS[setting][1]
        result = run_measured(child, env=environment, check=setting)
        print(f"| {setting} | " + " | ".join(result.stdout.split()) + " |", flush=True)


if __name__ == "__main__":
    main()
