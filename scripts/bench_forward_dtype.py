"""One decoder layer's forward per calibration chunk in float32, under bfloat16 autocast (what
`--forward-dtype bfloat16` does to a float32 model) and with the layer cast to bfloat16 (a bfloat16
model's own dtype), with the torch-profiler share of the main operators.

    python scripts/bench_forward_dtype.py [--model smollm2-135m-gguf] [--windows 8] [--seqlen 512]
"""

from __future__ import annotations

import copy
import functools
import time

import torch
from benchlib import layer_forward, load_float32_model, machine, script_parser

OPS = ("aten::mm", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::mul", "aten::copy_", "aten::silu")


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--windows", type=int, default=8, help="windows per chunk (llmprune's default here)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from torch.profiler import profile

    model = load_float32_model(args.model)
    positions = torch.arange(args.seqlen)[None].expand(args.windows, -1)
    shape = (args.windows, args.seqlen, model.config.hidden_size)
    hidden = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    print(f"{machine()}; torch {torch.__version__}; one layer of {args.model}, {args.windows} x {args.seqlen} tokens")
    print("| forward | s per chunk | " + " | ".join(f"`{op.removeprefix('aten::')}` ms" for op in OPS) + " |")
    print("|---" * (len(OPS) + 2) + "|")
    for name in ("float32", "bfloat16 autocast", "bfloat16 layer"):
        low = name == "bfloat16 layer"
        layer = copy.deepcopy(model.model.layers[0]).to(torch.bfloat16 if low else torch.float32)
        x = hidden.to(torch.bfloat16 if low else torch.float32)
        rope = tuple(t.to(x.dtype) for t in model.model.rotary_emb(x, positions))
        run = functools.partial(layer_forward, layer, x, rope, positions, name == "bfloat16 autocast")
        for _ in range(2):
            run()
        started = time.perf_counter()
        for _ in range(args.repeats):
            run()
        seconds = (time.perf_counter() - started) / args.repeats
        with profile() as prof:
            run()
        by_op = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
        print(f"| {name} | {seconds:.3f} | " + " | ".join(f"{by_op.get(op, 0):.1f}" for op in OPS) + " |")


if __name__ == "__main__":
    main()
