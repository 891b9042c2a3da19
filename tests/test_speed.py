"""The speed-aware search (--target-speedup): the cost model's fit and candidate cuts, a combined depth and width
cut that is the dense model without those layers and units, and bad targets refused with no output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import llmprune
from llmprune.costmodel import (
    Architecture,
    DecodeShape,
    Timing,
    decode_costs,
    fit,
    random_model,
)
from llmprune.errors import LLMPruneError
from llmprune.speed import candidate_cuts, spaced
from llmprune.structured.arch import Shape, structure_of
from tests.helpers.costs import fixed_costs, write_costs
from tests.helpers.vllm_generate import greedy, transformers_greedy


def _arch(config) -> Architecture:
    structure = structure_of(config)
    return Architecture(config.get_text_config().to_dict(), structure, Shape.of(config, structure))


def _token_file(path, windows=6, seqlen=24, vocab=512):
    ids = torch.randint(2, vocab, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(path))
    return ids


def test_the_fit_recovers_the_parts_of_a_linear_cost():
    dense = DecodeShape(8, 4, 512)
    truth = fixed_costs(base=3.0, layer=0.5, group=0.25, neuron=0.002)
    shapes = [DecodeShape(2, 4, 512), DecodeShape(8, 4, 512), DecodeShape(8, 4, 256), DecodeShape(8, 2, 512)]
    times = {shape: truth.step(shape) for shape in shapes}
    assert fit(dense, times, 2, 8, 256, 2) == pytest.approx((3.0, 0.5, 0.25, 0.002))


def test_candidate_cuts_are_the_widest_per_depth_until_full_width_reaches_the_target():
    costs = fixed_costs(layer=1.0, neuron=1 / 1024)  # a full layer costs 2, its FFN half of it
    dense = DecodeShape(10, 2, 1024)
    cuts = candidate_cuts(costs, dense, 1.25, [2], [256, 512, 768, 1024])
    # 10 layers x 2 = 20; 20 / 1.25 = 16 is the budget: L' (1 + n/1024) <= 16
    assert [(d, n) for d, _, n, _ in cuts] == [(0, 512), (1, 768), (2, 1024)]
    assert all(s >= 1.25 for *_, s in cuts)
    assert cuts[0][3] == pytest.approx(20 / (10 * 1.5))


def test_a_noisy_fit_keeps_its_parts_positive_within_the_layer():
    """Timings where narrowing looks dearer than the whole layer: the parts are scaled into the layer's cost,
    which the two depths measured, and none is negative."""
    dense = DecodeShape(8, 4, 512)
    times = {
        DecodeShape(2, 4, 512): 4.0,
        DecodeShape(8, 4, 512): 7.0,  # 0.5 per layer
        DecodeShape(8, 4, 256): 3.0,  # narrowing "saves" 4.0 > the layers' 4 x 0.5 x 8 / 8
        DecodeShape(8, 2, 512): 7.5,  # fewer groups "cost" more: clipped to 0
    }
    base, layer, group, neuron = fit(dense, times, 2, 8, 256, 2)
    assert base == pytest.approx(3.0) and group == 0.0 and layer >= 0 and neuron > 0
    assert layer + 4 * group + 512 * neuron == pytest.approx(0.5)


def test_candidate_cuts_cover_every_group_count_and_spacing_keeps_the_ends():
    costs = fixed_costs(layer=1.0, group=0.25, neuron=1 / 1024)  # a dense layer: 1 + 4 x 0.25 + 1 = 3
    dense = DecodeShape(6, 4, 1024)
    cuts = candidate_cuts(costs, dense, 1.5, [2, 4], [256, 512, 768, 1024])
    # budget 18 / 1.5 = 12: L' (1 + g/4 + n/1024) <= 12; 4 groups need a layer gone, 2 groups do not
    assert [(d, g, n) for d, g, n, _ in cuts] == [(1, 4, 256), (2, 4, 1024), (0, 2, 512), (1, 2, 768), (2, 2, 1024)]
    assert spaced(list(range(10)), 4) == [0, 3, 6, 9] and spaced([1, 2], 5) == [1, 2] and spaced([7, 8], 1) == [7]


def test_a_random_model_has_the_asked_shape(tiny_models):
    gemma = _arch(AutoConfig.from_pretrained(tiny_models("gemma3_text", layers=4)))
    model = random_model(gemma, DecodeShape(3, 1, 64), torch.float32, "cpu")
    assert len(model.model.layers) == 3 and len(model.config.layer_types) == 3
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert model.model.layers[0].mlp.down_proj.in_features == 64
    qwen2 = AutoConfig.for_model(
        "qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=512,
    )
    model = random_model(_arch(qwen2), DecodeShape(1, 2, 128), torch.float32, "cpu")  # head_dim stays 64 / 8
    assert model.model.layers[0].self_attn.q_proj.out_features == 4 * 8
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 8


def test_the_measured_cost_model_is_cached(tiny_models, tmp_path, monkeypatch):
    """Measured once (positive parts that predict the timed shapes), then read back from the cache."""
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    llama = _arch(AutoConfig.from_pretrained(tiny_models("llama", layers=2)))
    dense, timing = DecodeShape(4, 2, 128), Timing(batch=2, prompt=8, new_tokens=4, rounds=1)
    costs = decode_costs(llama, dense, torch.float32, torch.device("cpu"), timing, smallest_groups=1)
    assert min(costs.base, costs.layer, costs.group, costs.neuron) >= 0
    assert costs.layer + costs.group * 2 + costs.neuron * 128 > 0
    assert sorted(costs.measured) == ["1x2x128", "4x1x128", "4x2x128", "4x2x64"]
    cached = list((tmp_path / "costs").glob("*.json"))
    assert len(cached) == 1
    again = decode_costs(llama, dense, torch.float32, torch.device("cpu"), timing, smallest_groups=1)
    assert again == costs


def test_a_combined_cut_is_the_dense_model_without_those_layers_and_units(tiny_models, tmp_path, monkeypatch):
    """Without mask tuning, the output is the dense model with the removed layers skipped and the removed heads and
    neurons masked: its perplexity on the search windows is the one the search measured, and its parameters are
    the ones the report claims."""
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tiny_models("llama", layers=8, inter=256)
    ids = _token_file(tmp_path / "tokens.safetensors", windows=24)  # 552 tokens: enough to fit the depth repair
    # every layer costs 1 + n/256: width alone reaches at most 2/1.25 = 1.6x, so 2x needs layers and neurons
    write_costs(folder, fixed_costs(layer=1.0, neuron=1 / 256))
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), target_speedup=2.0, calibration=str(tmp_path / "tokens.safetensors"),
                            no_eval=True, quiet=True, output=str(out), neuron_multiple=32, mask_tuning=False,
                            search_windows=4, measure_speedup=False)  # fmt: skip
    assert report["method"] == "speed"
    info = report["speed"]
    assert info["predicted_speedup"] >= 2.0 and info["measured"] is None
    kept = info["kept"]
    best = min(info["candidates"], key=lambda c: c["search_perplexity"])
    assert best["removed_layers"] == info["removed_layers"] and best["neurons"] == kept["intermediate"]
    # 8 layers x 2 = 16, halved: L' (1 + n/256) <= 8, n a multiple of 32
    assert [(len(c["removed_layers"]), c["neurons"]) for c in info["candidates"]] == [
        (1, 32),
        (2, 64),
        (3, 128),
        (4, 256),
    ]

    first = info["removed_layers"][0]  # the layer before the span is refit (depth repair), in the search too
    assert (info["repair"] or {}).get("layer") == (first - 1 if first > 0 else None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == kept["layers"] == 8 - len(info["removed_layers"])
    assert model.config.intermediate_size == kept["intermediate"]
    assert sum(p.numel() for p in model.model.layers.parameters()) == info["parameters"]["decoder_after"]
    search = ids[:4]
    with torch.no_grad():
        loss = model(search, labels=search, use_cache=False).loss
    assert math.exp(float(loss)) == pytest.approx(best["search_perplexity"], rel=1e-4)
    assert "cut for 2x decode speed" in (out / "README.md").read_text()


def test_a_cut_of_layers_and_kv_groups_loads_with_explicit_head_dim(tmp_path, monkeypatch):
    """A Qwen2 (head_dim implicit, hidden / heads) cut to 1 of 2 layers and 2 of 4 KV groups: the config
    says so with an explicit head_dim, stock transformers loads it, and untuned it computes what the search
    measured."""
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=8,
                                  num_key_value_heads=4, num_hidden_layers=2, vocab_size=512,
                                  max_position_embeddings=256, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    # only KV groups cost time: 4 groups x 2 layers = 8; 2.5x needs one layer with 2 groups (2: 4x)
    write_costs(folder, fixed_costs(layer=0.0, group=1.0))
    ids = _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(str(folder), target_speedup=2.5, calibration=str(tmp_path / "tokens.safetensors"),
                            no_eval=True, quiet=True, output=str(out), mask_tuning=False, search_windows=4,
                            measure_speedup=False)  # fmt: skip
    info = report["speed"]
    assert [(len(c["removed_layers"]), c["kv_groups"]) for c in info["candidates"]] == [(1, 2)]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["num_key_value_heads"], saved["num_attention_heads"]) == (1, 2, 4)
    assert saved["head_dim"] == 8 and saved["intermediate_size"] == 128
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.model.layers.parameters()) == info["parameters"]["decoder_after"]
    with torch.no_grad():
        loss = model(ids[:4], labels=ids[:4], use_cache=False).loss
    assert math.exp(float(loss)) == pytest.approx(info["candidates"][0]["search_perplexity"], rel=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"target_speedup": 1.0}, "--target-speedup must be more than 1 (got 1.0)"),
        ({"target_speedup": 0.5}, "--target-speedup must be more than 1 (got 0.5)"),
        ({"target_speedup": 50.0}, "--target-speedup 50 is out of reach: the cost model measured on cpu predicts"),
        ({"target_speedup": 1.5, "method": "sparsegpt"}, "--target-speedup is for the speed methods"),
        ({"target_speedup": 1.5, "remove": 0.2}, "--remove is for the structured, depth and expert methods"),
        ({"target_speedup": 1.5, "keep_neurons": 64}, "--keep-heads, --keep-neurons and --heads-per-group fix"),
    ],
)
def test_bad_targets_are_one_line_and_no_output(options, message, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tiny_models("llama", layers=4)
    write_costs(folder, fixed_costs(base=1.0, layer=1.0))  # at most (1 + 4) / (1 + 1) = 2.5x
    _token_file(tmp_path / "tokens.safetensors")
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llmprune.prune(str(folder), no_eval=True, quiet=True, calibration=str(tmp_path / "tokens.safetensors"),
                       output=str(out), **options)  # fmt: skip
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tokens.safetensors"]


@pytest.mark.slow
def test_smollm2_cut_in_depth_and_width_gives_the_same_greedy_tokens_in_transformers_and_vllm(
    smollm2, corpus_file, tmp_path, monkeypatch
):
    """A combined cut of the real model (layers removed and every kept layer narrowed, mask tuning on) loads in
    stock transformers and in vLLM, which continue greedily alike, with the parameter count the report claims."""
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    write_costs(smollm2, fixed_costs(layer=1.0, neuron=1 / 1536))  # width alone reaches at most 1.92x
    out = tmp_path / "smol-speed"
    report = llmprune.prune(str(smollm2), target_speedup=2.5, max_candidates=1, calibration=str(corpus_file),
                            samples=8, seqlen=128, eval_samples=4, max_ppl_increase=float("inf"), quiet=True,
                            measure_speedup=False, output=str(out))  # fmt: skip
    info = report["speed"]
    assert info["removed_layers"] and info["kept"]["intermediate"] < 1536
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.model.layers.parameters()) == info["parameters"]["decoder_after"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = [tokenizer(text)["input_ids"] for text in ("The king said to the queen", "What is the matter")]
    expected = transformers_greedy(model, prompts, 12)
    assert greedy(out, prompts, "float32", 12) == expected
