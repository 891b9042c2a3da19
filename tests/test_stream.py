"""engine/stream.py: the layer-by-layer forward equals stock transformers; a lower --forward-dtype runs the
layers under autocast and keeps the weights in full precision."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.eval.perplexity import streamed_logits
from tests.helpers.engine import read_output as _read_output


def test_engine_forward_equals_stock_transformers(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("llama", layers=2)
    out = tmp_path / "out"
    llmprune.prune(
        str(folder),
        method="sparsegpt",
        pattern="2:4",
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        output=str(out),
        no_eval=True,
        quiet=True,
    )
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        stock = model(ids).logits
    torch.testing.assert_close(streamed_logits(out, ids), stock, rtol=0, atol=1e-5)


def test_bfloat16_forward_runs_matmuls_in_bf16_and_keeps_full_precision_weights(tiny_models, corpus_file, tmp_path):
    """--forward-dtype bfloat16 on an fp32 model: the layers' Linears compute in bf16 (autocast), yet the
    saved weights are the fp32 originals where kept, and the masks stay close to the fp32 run's."""
    folder = tiny_models("llama", layers=2)
    common = dict(method="wanda", calibration=str(corpus_file), samples=8, seqlen=32, no_eval=True, quiet=True)

    def linear_output_dtypes(**options) -> tuple[dict, set[torch.dtype]]:
        seen: set[torch.dtype] = set()

        def record(module, args, output):
            if isinstance(module, nn.Linear):
                seen.add(output.dtype)

        handle = nn.modules.module.register_module_forward_hook(record)
        try:
            return llmprune.prune(str(folder), **options, **common), seen
        finally:
            handle.remove()

    low, low_seen = linear_output_dtypes(output=str(tmp_path / "bf16"), forward_dtype="bfloat16")
    full, full_seen = linear_output_dtypes(output=str(tmp_path / "fp32"))
    assert torch.bfloat16 in low_seen and full_seen == {torch.float32}  # (argument capture runs in fp32)
    assert low["forward_dtype"] == "bfloat16" and full["forward_dtype"] == "float32"
    dense = _read_output(folder)
    low_w, full_w = _read_output(tmp_path / "bf16"), _read_output(tmp_path / "fp32")
    keys = [k for k in dense if k.endswith("proj.weight")]
    agree = []
    for key in keys:
        original, pruned = dense[key].float(), low_w[key]
        assert pruned.dtype == torch.float32
        assert not torch.equal(original, original.bfloat16().float())  # bf16 rounding would show
        kept = pruned != 0
        torch.testing.assert_close(pruned[kept], original[kept], rtol=0, atol=0)
        agree.append(float(((low_w[key] == 0) == (full_w[key] == 0)).float().mean()))
    assert min(agree) > 0.9, agree
