"""The OPT-175B plan: what one SparseGPT layer costs as the width grows, fitted, and extrapolated to OPT-175B on
1, 2, 4 and 8 GPUs under torchrun.

Measured here, on this machine's CPU in float32, for OPT-shaped decoder layers (random weights; hidden H, FFN 4H,
H / 64 heads) of growing width, and for the Llama-2-7B layer the H100 rows of BENCHMARKS.md ran:
- forward: one decoder layer over a batch of tokens (seconds per token; the engine runs two per layer);
- statistics: Hessian accumulation for each input width (seconds per token);
- solves: SparseGPT 50% of every Linear of the layer, with its exact reconstruction error (seconds per layer), and
  apart from them the inverse Hessian factor of each (float64, as on a CPU).
Each part is fitted as a power law of H (log-log least squares), then:
- CPU: the fitted parts at H = 12288 with 128 x 2048 calibration tokens, times 96 layers;
- GPU: each part scaled by the ratio of the H100's measured seconds to this CPU's on the Llama-2-7B layer
  (Wanda's s/layer for the forwards, SparseGPT's minus Wanda's for statistics + solves), which assumes the GPU
  runs both kinds of work at the same relative speed at 175B's width as at 7B's.
- N GPUs: forwards and statistics split N ways; the all-gather of the float32 Hessians (19 H^2 values) and of the
  solved rows (12 H^2 weights in float16 and the float32 mask scores) at an assumed 150 GB/s per GPU; the solves
  split by rows (the engine's way for SparseGPT): every rank factors each group's inverse Hessian (q/k/v share
  one), then solves its 1/N of the rows. The rows' part of a solve is its measured time less its factor's.
- for comparison, the other way ranks can share solves (other methods'): whole Linears dealt out round-robin
  (q, k, v, out, fc1, fc2), each with its own factor, so a layer waits for the rank that has fc2.
- memory per GPU: the engine's own plan for one rank of N (`--plan-only --plan-ranks N`: its shard of the 128
  windows, its 1/N of each Linear's rows and the gathered weight).

    python scripts/bench_plan175.py --out bench-plan [--widths 1024 2048 4096] [--write BENCHMARKS.md]
    python scripts/bench_plan175.py --out bench-plan --measured bench-plan/rows.json  # re-plan, no measuring
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import date
from pathlib import Path

import torch
from benchlib import machine, publish_table, script_parser
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from llmprune.methods.sparsegpt import SparseGPT, inverse_factor
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.pattern import Pattern

TOKENS = 128 * 2048  # the papers' calibration
OPT175 = 12288
LAYERS175 = 96
H100 = {"wanda": 3.7, "sparsegpt": 7.8}  # s / layer, Llama-2-7B-shaped layers, 128 x 2048 tokens (BENCHMARKS.md)
FACTORED = ("q", "out", "fc1", "fc2")  # one inverse factor per group: q/k/v share q's
LINK_BYTES_S = 150e9  # assumed all-gather bandwidth per GPU (NVLink-class), for the Hessian sums


def opt_shapes(h: int) -> dict[str, tuple[int, int]]:
    return {"q": (h, h), "k": (h, h), "v": (h, h), "out": (h, h), "fc1": (4 * h, h), "fc2": (h, 4 * h)}


def llama7b_shapes() -> dict[str, tuple[int, int]]:
    h, f = 4096, 11008
    return {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}


def layer_model(kind: str, h: int):
    if kind == "opt":
        config = OPTConfig(hidden_size=h, ffn_dim=4 * h, num_attention_heads=h // 64, num_hidden_layers=1,
                           vocab_size=1024, word_embed_proj_dim=h, max_position_embeddings=2048)  # fmt: skip
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=1,
                             vocab_size=1024, max_position_embeddings=2048)  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def forward_time(model, tokens: int) -> float:
    """Seconds per token of the model's forward (one decoder layer; its tiny embeddings and head are noise)."""
    ids = torch.randint(0, 1024, (tokens // 512, 512))
    with torch.no_grad():
        return best_of(2, lambda: model(ids)) / tokens


def measure(kind: str, h: int, shapes: dict[str, tuple[int, int]], tokens: int) -> dict:
    """Seconds per token of a forward and of the Hessians; seconds of the layer's solves (and per module)."""
    forward = forward_time(layer_model(kind, h), tokens)
    widths = sorted({cols for _, cols in shapes.values()})
    groups = {"opt": [h, h, h, 4 * h], "llama": [4096, 4096, 4096, 11008]}[kind]  # qkv, out/o, fc1/gate+up, fc2/down
    per_width = {}
    for width in widths:
        x = torch.randn(tokens, width)
        per_width[width] = best_of(2, lambda w=width, x=x: Hessian(w, torch.device("cpu")).add(x)) / tokens
    statistics = sum(per_width[w] for w in groups)
    solves, factors = {}, {}
    for name, (rows, cols) in shapes.items():
        x = torch.randn(max(2048, cols // 4), cols)
        stats = InputStats(cols, (Hessian,), torch.device("cpu"))
        stats.add(x)
        stats.finish()
        weight = torch.randn(rows, cols) * 0.02
        started = time.perf_counter()
        inverse_factor(stats[Hessian].matrix, 0.01, torch.float64)
        factors[name] = time.perf_counter() - started
        started = time.perf_counter()
        result = SparseGPT().prune(weight, stats, Pattern(0.5))
        stats.relative_error(weight, result.weight)
        solves[name] = time.perf_counter() - started
        print(f"  {kind} {h} {name} {rows}x{cols}: {solves[name]:.2f} s (factor {factors[name]:.2f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    return {"kind": kind, "h": h, "forward_s_per_token": forward, "statistics_s_per_token": statistics,
            "solves_s": solves, "solve_s": sum(solves.values()), "factors_s": factors}  # fmt: skip


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = c * x^p by least squares on logs: (c, p)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    n = len(xs)
    mx, my = sum(lx) / n, sum(ly) / n
    p = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return math.exp(my - p * mx), p


def rank_memory(ranks: int, folder: Path) -> float | None:
    """GPU GiB per rank from the engine's plan for one rank of `ranks` (`--plan-only --plan-ranks`) on an OPT-175B
    shape checkpoint at `folder`."""
    if not (folder / "config.json").exists():
        return None
    import llmprune

    result = llmprune.prune(str(folder), method="sparsegpt", calibration=str(folder / "calibration.safetensors"),
                            no_eval=True, plan_only=True, plan_ranks=ranks, device="cuda",
                            max_memory="cuda=80GB,cpu=2TB", output="unused", quiet=True)  # fmt: skip
    return result["memory_plan"]["peak_bytes"] / 2**30


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward and statistics measurement")
    parser.add_argument("--shape-folder", type=Path, default=None, help="an OPT-175B shape checkpoint (plans)")
    parser.add_argument("--out", type=Path, default=Path("bench-plan175"))
    parser.add_argument("--write", default=None)
    parser.add_argument("--measured", type=Path, default=None, help="a rows.json of an earlier run: plan from it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.measured:
        measured = json.loads(args.measured.read_text())
        rows, llama = measured["opt"], measured["llama7b"]
        about = measured.get("about", f"Measured (when and where not recorded in {args.measured.name})")
        about += f"; planned {date.today()} from those measurements"
    else:
        rows = [measure("opt", h, opt_shapes(h), args.tokens) for h in args.widths]
        llama = measure("llama", 4096, llama7b_shapes(), args.tokens)
        about = f"Measured {date.today()} on {machine()}, float32, {torch.get_num_threads()} threads"
    saved = {"about": about.split("; planned")[0], "opt": rows, "llama7b": llama}
    (args.out / "rows.json").write_text(json.dumps(saved, indent=1))
    hs = [r["h"] for r in rows]
    forward = fit(hs, [r["forward_s_per_token"] for r in rows])
    statistics = fit(hs, [r["statistics_s_per_token"] for r in rows])
    solve = fit(hs, [r["solve_s"] for r in rows])
    modules = {name: fit(hs, [r["solves_s"][name] for r in rows]) for name in opt_shapes(1)}
    factors = {name: fit(hs, [r["factors_s"][name] for r in rows]) for name in FACTORED}
    row_parts = {
        name: fit(hs, [max(r["solves_s"][name] - r["factors_s"][name], 1e-3) for r in rows]) for name in opt_shapes(1)
    }

    def at(f: tuple[float, float], h: float) -> float:
        return f[0] * h ** f[1]

    # the Llama-2-7B layer: the H100/CPU ratios of the two kinds of work
    gpu_forward = H100["wanda"] / (2 * llama["forward_s_per_token"] * TOKENS)
    gpu_extra = (H100["sparsegpt"] - H100["wanda"]) / (llama["statistics_s_per_token"] * TOKENS + llama["solve_s"])
    cpu_forward = 2 * at(forward, OPT175) * TOKENS  # the engine's two forwards per layer
    cpu_statistics = at(statistics, OPT175) * TOKENS
    cpu_factors = sum(at(f, OPT175) for f in factors.values())  # one per group, on every rank
    cpu_rows = sum(at(f, OPT175) for f in row_parts.values())  # split N ways
    cpu_hours = (cpu_forward + cpu_statistics + cpu_factors + cpu_rows) * LAYERS175 / 3600
    hessian_bytes = 19 * OPT175**2 * 4  # q/k/v, out and fc1 (H^2 each), fc2 ((4H)^2), float32
    row_bytes = 12 * OPT175**2 * (2 + 4)  # the layer's weights in float16, and their scores in float32
    plans = []
    for n in (1, 2, 4, 8):
        hessians_gather = hessian_bytes * (n - 1) / LINK_BYTES_S
        rows_gather = row_bytes * (n - 1) / n / LINK_BYTES_S
        parts = {
            "forward": gpu_forward * cpu_forward / n,
            "statistics": gpu_extra * cpu_statistics / n,
            "factors": gpu_extra * cpu_factors,
            "rows": gpu_extra * cpu_rows / n,
            "all-gather": hessians_gather + rows_gather,
        }
        per_layer = sum(parts.values())
        owned = [0.0] * n  # the other way, for comparison: whole Linears dealt out round-robin, factors included
        for position, f in enumerate(modules.values()):
            owned[position % n] += at(f, OPT175)
        dealt = parts["forward"] + parts["statistics"] + hessians_gather + gpu_extra * max(owned)
        dealt = per_layer if n == 1 else dealt  # one process: q/k/v share their factor
        memory = rank_memory(n, args.shape_folder) if args.shape_folder else None
        plans.append({"gpus": n, "s_per_layer": per_layer, "hours": per_layer * LAYERS175 / 3600, "parts": parts,
                      "memory": memory, "dealt_s_per_layer": dealt})  # fmt: skip
    for plan in plans:
        plan["efficiency"] = plans[0]["s_per_layer"] / (plan["gpus"] * plan["s_per_layer"])
        plan["dealt_efficiency"] = plans[0]["dealt_s_per_layer"] / (plan["gpus"] * plan["dealt_s_per_layer"])
    (args.out / "plans.json").write_text(json.dumps(plans, indent=1))

    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"{about}. Command: `python scripts/bench_plan175.py {' '.join(sys.argv[1:])}`.",
        "",
        "| layer | H | forward ms / 1k tokens | Hessians ms / 1k tokens | SparseGPT solves s (of which fc2 / down) |",
        "|---|---|---|---|---|",
        *(
            f"| OPT-shaped | {r['h']} | {r['forward_s_per_token'] * 1e6:.1f} | {r['statistics_s_per_token'] * 1e6:.1f} "
            f"| {r['solve_s']:.1f} ({r['solves_s']['fc2']:.1f}) |"
            for r in rows
        ),  # fmt: skip
        f"| Llama-2-7B | 4096 | {llama['forward_s_per_token'] * 1e6:.1f} | {llama['statistics_s_per_token'] * 1e6:.1f}"
        f" | {llama['solve_s']:.1f} ({llama['solves_s']['down']:.1f}) |",
        "",
        f"Fitted c * H^p over H = {', '.join(map(str, hs))}: forward p = {forward[1]:.2f}, Hessians p = "
        f"{statistics[1]:.2f}, solves p = {solve[1]:.2f} (fc2 alone p = {modules['fc2'][1]:.2f}; its factor p = "
        f"{factors['fc2'][1]:.2f}, its rows p = {row_parts['fc2'][1]:.2f}). Factors at H = {hs[-1]}: "
        f"{sum(rows[-1]['factors_s'][name] for name in FACTORED):.1f} s of the layer's {rows[-1]['solve_s']:.1f} s.",
        "",
        f"OPT-175B (H = {OPT175}, {LAYERS175} layers, 128 x 2048 tokens), SparseGPT 50%: {cpu_hours:,.0f} h on this "
        f"CPU. On H100s, each part scaled by the H100/CPU ratio measured on the Llama-2-7B layer (forwards "
        f"{1 / gpu_forward:.0f}x, statistics and solves {1 / gpu_extra:.0f}x this CPU's speed):",
        "",
        "| GPUs | s / layer | forward | statistics | solves: factors | solves: rows | all-gather | hours | scaling "
        "efficiency | the same, Linears dealt out | GPU GiB per rank (plan, 80 GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {p['gpus']} | {p['s_per_layer']:.0f} | {p['parts']['forward']:.0f} | {p['parts']['statistics']:.0f} | "
            f"{p['parts']['factors']:.1f} | {p['parts']['rows']:.0f} | {p['parts']['all-gather']:.1f} | "
            f"{p['hours']:.2f} | {p['efficiency']:.2f} | {p['dealt_efficiency']:.2f} | {gib(p['memory'])} |"
            for p in plans
        ),  # fmt: skip
    ]
    publish_table("\n".join(lines), "bench_plan175", args.out, args.write)


if __name__ == "__main__":
    main()
