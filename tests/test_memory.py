"""Memory: the plan before the run, adaptation to a budget, refusal before reading weights, flat peak RSS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import Checkpoint
from tests.helpers.engine import read_output

WIDE = dict(hidden=256, inter=768, vocab=512)


MEASURE = Path(__file__).resolve().parent.parent / "scripts" / "measure_process.py"


def _run(argv: list, timeout: int = 600) -> dict:
    """One prune in a fresh process, launched by a small process that measures it with getrusage
    (a child's ru_maxrss starts at its parent's size at fork, so the big pytest process must not be the
    parent). Returns the --json summary, the llmprune.json report, and the measured peak RSS."""
    proc = subprocess.run(
        [sys.executable, str(MEASURE), "--", sys.executable, "-m", "llmprune", *map(str, argv), "--json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    summary["report"] = json.loads((Path(summary["output"]) / "llmprune.json").read_text())
    summary["measured"] = json.loads(proc.stderr.strip().splitlines()[-1])
    return summary


def test_plan_only_reads_no_weights_and_names_components(tiny_models, corpus_file, monkeypatch, capsys):
    folder = tiny_models("llama", layers=4, **WIDE)

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(Checkpoint, "read", no_weights)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, no_eval=True, plan_only=True, output="unused")
    default = llmprune.prune(str(folder), **common)
    assert default["memory_plan"]["choice"]["order"] == "parallel" and "barrier state" not in default["plan"]
    result = llmprune.prune(str(folder), order="sequential", **common)
    text = result["plan"]
    for component in (
        "layer weights",
        "barrier state",
        "chunk temporaries",
        "statistics (Hessian)",
        "SparseGPT workspace",
        "interpreter and libraries",
    ):
        assert component in text
    assert result["memory_plan"]["peak_bytes"] > 0


def test_plan_peak_is_the_largest_phase_and_counts_what_each_phase_holds(tiny_models, corpus_file):
    """A layer's forward, solves and write never overlap: the peak is the largest phase, not their sum; the
    two-pass order holds every group's Hessian at once, the sequential order one group's."""
    folder = tiny_models("llama", layers=2, **WIDE)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, no_eval=True, plan_only=True, output="unused")
    plans = {
        order: llmprune.prune(str(folder), method="sparsegpt", order=order, **common)["memory_plan"]
        for order in ("sequential", "parallel")
    }
    for plan in plans.values():
        totals = {name: sum(parts.values()) for name, parts in plan["phases"].items()}
        assert plan["peak_bytes"] == max(totals.values())
        assert set(totals) >= {"begin", "layer forward", "layer solve", "layer write"}
        solve, forward = plan["phases"]["layer solve"], plan["phases"]["layer forward"]
        assert "SparseGPT workspace" in solve and "chunk temporaries" not in solve
        assert "chunk temporaries" in forward and "SparseGPT workspace" not in forward
        assert "writing a layer" in plan["phases"]["layer write"]
    hidden, inter = WIDE["hidden"], WIDE["inter"]
    one_group = inter * inter * 4  # the widest input: down_proj's
    every_group = (3 * hidden * hidden + inter * inter) * 4  # q/k/v, o, gate/up (hidden wide) and down
    assert plans["sequential"]["phases"]["layer solve"]["statistics (Hessian)"] == one_group
    assert plans["parallel"]["phases"]["layer solve"]["statistics (Hessian)"] == every_group


def test_the_plan_counts_the_runs_sparsegpt_block(tiny_models, corpus_file):
    """--blocksize reaches the plan: a solve's workspace is SparseGPT's for the block the run sweeps, at most a
    weight's width, the largest of the layer's Linears' (q, k, v, o, gate, up: 256 inputs; down: 768)."""
    from llmprune.methods.sparsegpt import SparseGPT

    folder = tiny_models("llama", layers=2, **WIDE)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, no_eval=True, plan_only=True, output="unused")
    hidden, inter = WIDE["hidden"], WIDE["inter"]
    shapes = ((hidden, hidden), (inter, hidden), (hidden, inter))
    f32, f64 = torch.float32, torch.float64
    planned = {}
    for block in (128, 512, 10**6):  # a block past a weight's last column is the whole width
        plan = llmprune.prune(str(folder), method="sparsegpt", blocksize=block, **common)["memory_plan"]
        planned[block] = plan["phases"]["layer solve"]["SparseGPT workspace"]
        expected = max(SparseGPT.workspace_bytes(o, i, f32, f64, {"blocksize": min(block, i)}) for o, i in shapes)
        assert planned[block] == expected
    assert planned[128] < planned[512] < planned[10**6] < 2**30
    assert SparseGPT.workspace_bytes(hidden, inter, f32, f64, {"blocksize": 512}) > SparseGPT.workspace_bytes(
        hidden, inter, f32, f64
    )


def test_evaluation_plans_its_layer_pass_and_its_head_apart(tiny_models, corpus_file):
    """The evaluation runs every layer over its windows, then the head over slices of the last hidden states once
    the last layer is unloaded: the layer's weights and chunk temporaries and the logits are never held at once."""
    folder = tiny_models("llama", layers=2, **WIDE)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, plan_only=True, output="unused")
    plan = llmprune.prune(str(folder), method="wanda", eval_samples=16, **common)["memory_plan"]
    forward, head = plan["phases"]["eval forward"], plan["phases"]["eval head"]
    assert forward["eval activations"] == head["eval activations"] == 16 * 64 * WIDE["hidden"] * 4
    assert {"layer weights", "chunk temporaries"} <= set(forward) and "logits of a slice" not in forward
    assert "logits of a slice" in head and not {"layer weights", "chunk temporaries"} & set(head)
    totals = {name: sum(parts.values()) for name, parts in plan["phases"].items()}
    assert plan["peak_bytes"] == max(totals.values())


def test_impossible_budget_is_refused_before_any_weight_is_read(tiny_models, corpus_file, tmp_path, monkeypatch):
    folder = tiny_models("llama", layers=4, **WIDE)
    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: (_ for _ in ()).throw(AssertionError("weight read")))
    with pytest.raises(LLMPruneError, match=r"needs at least .* use --max-memory (\d+)MiB") as info:
        llmprune.prune(
            str(folder),
            calibration=str(corpus_file),
            samples=8,
            seqlen=64,
            no_eval=True,
            max_memory="64KB",
            output=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    smallest = info.value.args[0].split("use --max-memory ")[1].split()[0]
    plan = llmprune.prune(
        str(folder),
        calibration=str(corpus_file),
        samples=8,
        seqlen=64,
        no_eval=True,
        max_memory=smallest,
        plan_only=True,
        output=str(tmp_path / "out"),
    )
    assert plan["memory_plan"]["peak_bytes"] <= plan["memory_plan"]["budget_bytes"]


def test_a_refusal_names_the_least_budget_and_says_whether_fewer_tokens_would_fit(tiny_models, corpus_file):
    """The budget a refusal names is the least any configuration tried needs (the sequential order's barrier state
    can make the last adaptation the largest): a rerun at it plans, 2 MiB less is refused. Fewer calibration
    tokens are suggested only where one token would fit; else the refusal names what does not shrink."""
    folder = tiny_models("llama", layers=2, context=2048, **WIDE)
    common = dict(calibration=str(corpus_file), samples=8, no_eval=True, plan_only=True, output="unused")
    with pytest.raises(LLMPruneError, match="use --max-memory") as long:
        llmprune.prune(str(folder), seqlen=2048, max_memory="45MiB", **common)
    assert long.value.args[0].endswith("or more, fewer --samples or a shorter --seqlen")
    least = int(long.value.args[0].split("use --max-memory ")[1].split("MiB")[0])
    plan = llmprune.prune(str(folder), seqlen=2048, max_memory=f"{least}MiB", **common)["memory_plan"]
    assert plan["peak_bytes"] <= least * 2**20
    with pytest.raises(LLMPruneError, match="use --max-memory"):
        llmprune.prune(str(folder), seqlen=2048, max_memory=f"{least - 2}MiB", **common)
    assert llmprune.prune(str(folder), seqlen=256, max_memory="45MiB", **common)["memory_plan"]["peak_bytes"]
    with pytest.raises(LLMPruneError, match="use --max-memory") as short:
        llmprune.prune(str(folder), seqlen=256, max_memory="30MiB", **common)
    message = short.value.args[0]
    assert "; fewer --samples or a shorter --seqlen would not fit: with one token the layer solve phase" in message
    with pytest.raises(LLMPruneError, match="use --max-memory"):  # true: one window of 8 tokens is refused too
        llmprune.prune(str(folder), **{**common, "samples": 1}, seqlen=8, max_memory="30MiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU this machine does not have")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_plan_only_for_a_gpu_this_machine_lacks(tiny_models, corpus_file, capsys, device):
    from llmprune.cli import main

    folder = tiny_models("llama", layers=2, **WIDE)
    base = [str(folder), "--calibration", str(corpus_file), "--samples", "8", "--seqlen", "64", "--no-eval"]
    assert main([*base, "--plan-only", "--device", device, "--max-memory", f"{device}=1GB,cpu=4GB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for " + device in out and "which this machine does not have" in out
    assert "layers in float32" in out  # the model's own dtype: the GPU default, not the CPU's float32 rule
    assert main([*base, "--plan-only", "--device", device]) == 2  # a plan for an absent GPU needs its budget
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-memory cuda=80GB" in lines[0]
    assert main([*base, "--device", device]) == 2  # only a plan can target it


@pytest.fixture(scope="module")
def opt_175b(tmp_path_factory) -> Path:
    """OPT-175B's config and shard headers of the real shapes (sparse files: a few MB of disk)."""
    from scripts.shape_checkpoint import SHAPES, write_shape_checkpoint

    return write_shape_checkpoint(tmp_path_factory.mktemp("opt-175b"), SHAPES["opt-175b"], windows=128, seqlen=2048)


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU this machine does not have")
def test_opt_175b_sparsegpt_plans_within_40_gib_of_one_gpu(opt_175b):
    """The headline: SparseGPT 50% on OPT-175B (128 x 2048 calibration tokens) fits a 40 GiB GPU with the
    activations in host memory, and its solve workspace is about one Hessian of fc2 (49152 x 49152)."""
    common = dict(calibration=str(opt_175b / "calibration.safetensors"), no_eval=True, plan_only=True, output="unused")
    wide = llmprune.prune(str(opt_175b), device="cuda", max_memory="cuda=80GB,cpu=1TB", **common)["memory_plan"]
    n, rows = 49152, 12288
    solve = wide["phases"]["layer solve"]
    weight_buffers = rows * n * (4 + 1 + 2)  # float32 working weight, mask, float16 result
    assert solve["SparseGPT workspace"] <= 1.25 * n * n * 8 + weight_buffers + 64 * n * 128
    assert wide["choice"]["inverse_dtype"] == "torch.float64" and wide["peak_bytes"] <= 80e9
    tight = llmprune.prune(str(opt_175b), device="cuda", max_memory="cuda=40GiB,cpu=1TB", **common)["memory_plan"]
    assert tight["peak_bytes"] <= 40 * 2**30
    assert tight["choice"]["activations"] == "host" and tight["choice"]["inverse_dtype"] == "torch.float64"


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU this machine does not have")
def test_alps_on_opt_175b_is_refused_naming_its_workspace(opt_175b):
    """ALPS on OPT-175B does not fit an 80 GB GPU: fc2's 49152 x 49152 eigendecomposition in float64 alone is
    over the budget, which fewer calibration tokens would not change; the refusal says so and names the part."""
    common = dict(calibration=str(opt_175b / "calibration.safetensors"), no_eval=True, plan_only=True, output="unused")
    with pytest.raises(LLMPruneError, match="use --max-memory") as refused:
        llmprune.prune(str(opt_175b), method="alps", device="cuda", max_memory="cuda=80GB,cpu=1TB", **common)
    message = refused.value.args[0]
    assert "fewer --samples or a shorter --seqlen would not fit" in message and message.endswith("the ALPS workspace")
    n = 49152
    workspace = float(message.split(", ")[-1].split(" GiB")[0]) * 2**30
    assert workspace >= 4 * n * n * 8  # H' and its eigenvectors in float64, with LAPACK's workspace


def test_two_pass_order_adapts_to_one_group_at_a_time(tiny_models, corpus_file):
    """With few tokens, one group's Hessian at a time (the sequential order, waiting chunks parked) needs
    less than the two-pass order's every group at once: a budget between the two adapts to it (with the
    inverse's dtype fixed: a float32 inverse, the earlier adaptation, would fit first)."""
    folder = tiny_models("llama", layers=2, **WIDE)
    common = dict(calibration=str(corpus_file), samples=1, seqlen=16, no_eval=True, plan_only=True, output="unused")
    common["inverse_dtype"] = "float64"
    parallel = llmprune.prune(str(folder), **common)["memory_plan"]
    sequential = llmprune.prune(str(folder), order="sequential", park="disk", **common)["memory_plan"]
    assert sequential["peak_bytes"] < parallel["peak_bytes"]
    budget = str((sequential["peak_bytes"] + parallel["peak_bytes"]) // 2)
    plan = llmprune.prune(str(folder), max_memory=budget, **common)["memory_plan"]
    assert (plan["choice"]["order"], plan["choice"]["park"]) == ("sequential", "disk")
    assert plan["adaptations"][-1].startswith("sequential order") and plan["peak_bytes"] <= plan["budget_bytes"]


def test_spilled_activations_give_identical_weights(tiny_models, corpus_file, tmp_path):
    """Activations on disk (and parked barrier state) change where bytes live, not a single result bit."""
    folder = tiny_models("llama", layers=3, **WIDE)
    common = dict(
        method="sparsegpt", calibration=str(corpus_file), samples=8, seqlen=64, batch_size=2, no_eval=True, quiet=True
    )
    llmprune.prune(str(folder), output=str(tmp_path / "memory"), park="memory", order="sequential", **common)
    report = llmprune.prune(
        str(folder), output=str(tmp_path / "disk"), park="disk", activations="disk", order="sequential", **common
    )
    assert report["memory_plan"]["choice"]["activations"] == "disk"
    assert report["memory_plan"]["choice"]["order"] == "sequential"
    a, b = read_output(tmp_path / "memory"), read_output(tmp_path / "disk")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_peak_rss_is_flat_in_depth(tiny_models, corpus_file, tmp_path):
    """4 and 16 layers of the same width, each pruned in a fresh process: peak RSS stays flat."""
    peaks = {}
    for layers in (4, 16):
        folder = tiny_models("llama", layers=layers, hidden=512, inter=1536, vocab=512)
        summary = _run(
            [
                folder,
                "--method",
                "wanda",
                "--calibration",
                corpus_file,
                "--samples",
                16,
                "--seqlen",
                128,
                "--no-eval",
                "--output",
                tmp_path / f"out{layers}",
            ]
        )
        peaks[layers] = summary["measured"]["peak_rss_bytes"]
        # the run's own reading (VmHWM) agrees with getrusage from outside
        assert summary["report"]["peak_memory"]["rss_bytes"] == pytest.approx(peaks[layers], rel=0.05)
    assert peaks[16] <= 1.15 * peaks[4], peaks


@pytest.mark.slow
def test_model_larger_than_the_budget_prunes_within_it(tiny_models, corpus_file, tmp_path):
    """Weights of 16 layers (~200 MB) pruned under a 160 MiB budget: peak RSS <= budget + start-up overhead."""
    folder = tiny_models("llama", layers=16, hidden=512, inter=1536, vocab=512)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    budget = 160 * 2**20
    assert weights > budget
    summary = _run(
        [
            folder,
            "--calibration",
            corpus_file,
            "--samples",
            16,
            "--seqlen",
            128,
            "--no-eval",
            "--max-memory",
            f"{budget}",
            "--output",
            tmp_path / "out",
        ]
    )
    report = summary["report"]
    memory = report["peak_memory"]
    assert report["memory_plan"]["peak_bytes"] <= budget
    # overhead_bytes: the process's resident size when it plans (interpreter, torch, transformers, the meta
    # skeleton, the tokenizer and calibration tokens), measured by the run itself and printed with the plan
    assert summary["measured"]["peak_rss_bytes"] <= budget + memory["overhead_bytes"], memory
    assert report["achieved_sparsity"] == pytest.approx(0.5)


def test_a_tied_head_is_held_and_planned_once(tiny_models, corpus_file, tmp_path):
    """A tied checkpoint that also carries the head's copy (some do) holds one matrix, as stock loaders do."""
    from safetensors.torch import save_file

    from llmprune.models.skeleton import build_skeleton

    folder = tmp_path / "tied"
    shutil.copytree(tiny_models("llama", layers=2, **WIDE), folder)
    tensors = read_output(folder)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    skeleton = build_skeleton(folder)
    assert "lm_head.weight" in skeleton.rest_keys() and "lm_head.weight" not in skeleton.resident_rest_keys()
    skeleton.load_rest("cpu", torch.float32)
    head, embed = skeleton.model.get_output_embeddings().weight, skeleton.model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    plan = llmprune.prune(
        str(folder), calibration=str(corpus_file), samples=8, seqlen=64, eval_samples=2, plan_only=True, output="x"
    )["memory_plan"]
    table = WIDE["vocab"] * WIDE["hidden"] * 4
    assert plan["phases"]["begin"]["embeddings"] == table + WIDE["hidden"] * 4  # the matrix and the final norm
    assert plan["phases"]["eval forward"]["embeddings and head"] == table + WIDE["hidden"] * 4


def test_inverse_dtype_flag_and_the_float32_adaptation_comes_before_a_change_of_order(tiny_models, corpus_file):
    folder = tiny_models("llama", layers=2, **WIDE)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, no_eval=True, plan_only=True, output="unused")
    wide = llmprune.prune(str(folder), method="sparsegpt", **common)["memory_plan"]
    narrow = llmprune.prune(str(folder), method="sparsegpt", inverse_dtype="float32", **common)["memory_plan"]
    assert wide["choice"]["inverse_dtype"] == "torch.float64" and narrow["choice"]["inverse_dtype"] == "torch.float32"
    solve = "layer solve"
    saved = wide["phases"][solve]["SparseGPT workspace"] - narrow["phases"][solve]["SparseGPT workspace"]
    assert saved == 768 * 768 * 4  # half the factor of the widest input (down_proj's 768)
    with pytest.raises(LLMPruneError, match="needs at least") as refused:
        llmprune.prune(str(folder), method="sparsegpt", **{**common, "max_memory": "64KB"})
    steps = refused.value.args[0]
    assert steps.index("float32 Hessian inverse") < steps.index("sequential order")
