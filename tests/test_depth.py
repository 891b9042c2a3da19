"""Depth removal: streamed layer statistics equal a whole-model computation; the shallower model is the dense one
without those layers, loads in stock transformers (and vLLM), and bad budgets are one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import llmprune
from llmprune.errors import LLMPruneError
from tests.helpers.vllm_generate import greedy, transformers_greedy


def _token_file(path, windows=6, seqlen=24, vocab=512, seed=0):
    ids = torch.randint(2, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(seed))
    save_file({"input_ids": ids}, str(path))
    return ids


def _whole_model_scores(folder, ids):
    """Block influence over every token and the last token's angular distances, from forward hooks on the whole
    model in memory (the definitions, computed the plain way)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs, outputs = [], []

    def record(module, args, kwargs, out) -> None:
        inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        outputs.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    cos = torch.nn.functional.cosine_similarity
    influence = [float(1 - cos(x, y, dim=-1).mean()) for x, y in zip(inputs, outputs)]
    boundaries = [x[:, -1] for x in inputs] + [outputs[-1][:, -1]]
    angular = {
        n: [float(cos(boundaries[s], boundaries[s + n], dim=-1).clamp(-1, 1).acos().mean() / math.pi)
            for s in range(len(inputs) - n + 1)]
        for n in range(1, len(inputs))
    }  # fmt: skip
    return influence, angular


@pytest.mark.parametrize("criterion", ["angular", "influence"])
def test_streamed_scores_equal_the_whole_model_and_the_output_is_the_dense_model_without_those_layers(
    criterion, tiny_models, tmp_path
):
    folder = tiny_models("llama", layers=4)
    ids = _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="depth", remove=0.5, depth_criterion=criterion,
                            depth_repair=False, calibration=str(tmp_path / "tokens.safetensors"), no_eval=True,
                            quiet=True, output=str(out))  # fmt: skip
    influence, angular = _whole_model_scores(folder, ids)
    info = report["depth"]
    assert info["block_influence"] == pytest.approx(influence, abs=1e-5)
    assert info["angular_distance"] == pytest.approx(angular[2], abs=1e-5)
    if criterion == "angular":
        start = min(range(len(angular[2])), key=lambda s: angular[2][s])
        assert info["removed_layers"] == [start, start + 1]
    else:
        assert info["removed_layers"] == sorted(sorted(range(4), key=lambda i: influence[i])[:2])
    assert report["options"] == {"depth_criterion": criterion, "depth_repair": False} and info["kept_layers"] == 2

    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dense.model.layers = torch.nn.ModuleList(
        [layer for i, layer in enumerate(dense.model.layers) if i not in info["removed_layers"]]
    )
    for index, layer in enumerate(dense.model.layers):
        layer.self_attn.layer_idx = index
    dense.config.num_hidden_layers = 2
    with torch.no_grad():
        expected = dense(ids, use_cache=False).logits
        got = pruned(ids, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert pruned.config.num_hidden_layers == 2
    decoder = sum(p.numel() for p in pruned.model.layers.parameters())
    assert decoder == info["parameters"]["decoder_after"] == info["parameters"]["decoder_before"] // 2
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    card = (out / "README.md").read_text()
    assert "2 of its 4 decoder layers removed" in card


def test_perplexity_search_removes_the_layer_whose_removal_costs_least(tiny_models, tmp_path):
    """The greedy search's first step equals a brute force over whole models in memory: each one-layer-shorter
    model's loss on the calibration windows, the lowest removed, its perplexity recorded."""
    folder = tiny_models("llama", layers=4)
    ids = _token_file(tmp_path / "tokens.safetensors")
    report = llmprune.prune(str(folder), method="depth", remove=0.5, depth_criterion="perplexity",
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                            output=str(tmp_path / "out"))  # fmt: skip
    losses = []
    for candidate in range(4):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(model.model.layers) if i != candidate])
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        with torch.no_grad():
            losses.append(float(model(ids, labels=ids, use_cache=False).loss))
    search = report["depth"]["search"]
    first = min(range(4), key=lambda i: losses[i])
    assert search[0]["removed"] == first
    assert search[0]["perplexity"] == pytest.approx(math.exp(losses[first]), rel=1e-4)
    assert len(search) == 2 and report["depth"]["removed_layers"] == sorted(step["removed"] for step in search)


def test_per_layer_config_lists_follow_the_kept_layers(tiny_models, tmp_path):
    folder = tiny_models("gemma3_text", layers=4)
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="depth", remove=0.25, depth_criterion="influence",
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                            output=str(out))  # fmt: skip
    dense = json.loads((folder / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    kept = [i for i in range(4) if i not in report["depth"]["removed_layers"]]
    assert config["num_hidden_layers"] == 3 and config["layer_types"] == [dense["layer_types"][i] for i in kept]
    assert AutoConfig.from_pretrained(out).layer_types == config["layer_types"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"remove": 0.9}, "removes every layer"),
        ({"remove": 0.1}, "removes no layer"),
        ({"remove": 1.0}, "--remove must be in (0, 1)"),
        (
            {"remove": 0.5, "depth_criterion": "random"},
            "--depth-criterion must be one of angular, influence, perplexity",
        ),
        ({"keep_heads": 2}, "--keep-heads is for the structured methods; --method depth is depth"),
        ({"sparsity": 0.5}, "--sparsity is for the unstructured methods; --method depth is depth"),
    ],
)
def test_bad_depth_input_is_one_line_and_no_output(options, message, tiny_models, tmp_path):
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llmprune.prune(str(tiny_models("llama", layers=2)), method="depth", no_eval=True, quiet=True,
                       calibration=str(tmp_path / "tokens.safetensors"), output=str(out), **options)  # fmt: skip
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tokens.safetensors"]


@pytest.mark.slow
def test_smollm2_without_three_layers_gives_the_same_greedy_tokens_in_transformers_and_vllm(
    smollm2, corpus_file, tmp_path
):
    out = tmp_path / "smol-depth"
    report = llmprune.prune(str(smollm2), method="depth", remove=0.1, calibration=str(corpus_file), samples=8,
                            seqlen=128, eval_samples=4, max_ppl_increase=float("inf"), quiet=True,
                            output=str(out))  # fmt: skip
    assert report["depth"]["kept_layers"] == 27 and len(report["depth"]["removed_layers"]) == 3
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.model.layers.parameters()) == report["depth"]["parameters"]["decoder_after"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [tokenizer(text)["input_ids"] for text in ("The king said to the queen", "What is the matter")]
    expected = transformers_greedy(model, prompts, 12)
    assert greedy(out, prompts, "float32", 12) == expected


def test_the_repair_is_the_least_squares_refit_of_the_layer_before_the_span(tiny_models, tmp_path):
    """The repair (on by default): the written down projection of the layer before the removed span is W + ΔW,
    ΔW the ridge least-squares fit of the span's residual computed the plain way on the whole model; it lowers
    the residual's error, and the untouched layers are the dense ones."""
    from llmprune.depth import REPAIR_DAMPING, SKIP, spans_of

    assert spans_of([7, 3, 4]) == [(3, 5), (7, 8)]
    folder = tiny_models("llama", layers=6)
    ids = _token_file(tmp_path / "tokens.safetensors", windows=12, seqlen=32)  # 372 tokens for 128 FFN inputs
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), method="depth", remove=0.34, depth_criterion="influence",
                            calibration=str(tmp_path / "tokens.safetensors"), no_eval=True,
                            quiet=True, output=str(out))  # fmt: skip
    info = report["depth"]
    removed = info["removed_layers"]
    spans = [(first, end) for first, end in spans_of(removed) if first > 0]
    assert spans, removed  # the tiny model's least influential layers are not layer 0
    assert [r["layer"] for r in info["repairs"]] == [first - 1 for first, _ in spans]
    assert all(r["error_after"] < 1.0 for r in info["repairs"])

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    inputs, outputs, downs = {}, {}, {}

    def record(index):
        def hook(module, args, kwargs, out) -> None:
            inputs[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outputs[index] = out[0] if isinstance(out, tuple) else out

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(record(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: downs.__setitem__(i, a[0])))
    with torch.no_grad():
        model(ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    kept = [i for i in range(6) if i not in removed]
    for first, end in spans:
        p = first - 1
        target = inputs[end] if end < 6 else outputs[5]
        a = downs[p][:, SKIP:].reshape(-1, downs[p].shape[-1])  # each window's first token left out
        r = (target - outputs[p])[:, SKIP:].reshape(-1, target.shape[-1])
        ata = a.T @ a
        damped = ata + REPAIR_DAMPING * ata.diagonal().mean() * torch.eye(ata.shape[0], dtype=torch.float64)
        expected = model.model.layers[p].mlp.down_proj.weight + torch.linalg.solve(damped, (r.T @ a).T).T
        written = pruned.model.layers[kept.index(p)].mlp.down_proj.weight
        torch.testing.assert_close(written, expected.float().double(), rtol=1e-4, atol=1e-5)
    untouched = [i for i in kept if i + 1 not in removed]
    for i in untouched:
        assert torch.equal(pruned.model.layers[kept.index(i)].mlp.down_proj.weight,
                           model.model.layers[i].mlp.down_proj.weight)  # fmt: skip


def test_too_few_calibration_tokens_skip_the_repair_and_say_so(tiny_models, tmp_path, caplog):
    """Fewer than 2 tokens per FFN input overfit the refit (SmolLM2: 533.9 perplexity against 75.21): the repair
    is skipped with a warning and a note in the report, and every written layer is the dense one."""
    folder = tiny_models("llama", layers=4)
    _token_file(tmp_path / "tokens.safetensors", windows=4, seqlen=24)  # 92 tokens for 128 FFN inputs
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="llmprune"):
        report = llmprune.prune(str(folder), method="depth", remove=0.5, depth_criterion="influence",
                                calibration=str(tmp_path / "tokens.safetensors"), no_eval=True, quiet=True,
                                output=str(out))  # fmt: skip
    note = report["depth"]["repair_note"]
    assert note.startswith("depth repair skipped: 92 calibration tokens are too few to fit 128 FFN inputs")
    assert note in caplog.text and report["depth"]["repairs"] is None
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    kept = [i for i in range(4) if i not in report["depth"]["removed_layers"]]
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.down_proj.weight, dense.model.layers[old].mlp.down_proj.weight)
