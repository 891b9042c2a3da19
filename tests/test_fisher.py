"""Fisher structured pruning: streamed mask gradients against whole-model autograd, search, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.models.skeleton import build_skeleton
from llmprune.structured.arch import Shape, structure_of
from llmprune.structured.fisher import mask_gradients


def whole_model_mask_gradients(folder, ids: torch.Tensor, chunk: int, per_token: bool = False):
    """The same gradients from one autograd graph over the whole model in memory (per_token: a mask per token
    and unit, [layers, chunks, windows, tokens, units])."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.requires_grad_(False)
    structure = structure_of(model.config)
    shape = Shape.of(model.config, structure)
    heads, neurons = [], []
    for start in range(0, ids.shape[0], chunk):
        batch = ids[start : start + chunk]
        lead = tuple(batch.shape) if per_token else ()
        masks_h = [torch.ones(*lead, shape.heads, requires_grad=True) for _ in model.model.layers]
        masks_n = [torch.ones(*lead, shape.intermediate, requires_grad=True) for _ in model.model.layers]
        handles = []
        for layer, mh, mn in zip(model.model.layers, masks_h, masks_n):
            handles.append(
                layer.self_attn.o_proj.register_forward_pre_hook(
                    lambda m, a, mh=mh: (a[0] * mh.repeat_interleave(shape.head_dim, dim=-1),)
                )
            )
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mn=mn: (a[0] * mn,)))
        model(input_ids=batch, labels=batch).loss.backward()
        for handle in handles:
            handle.remove()
        heads.append(torch.stack([m.grad for m in masks_h]))
        neurons.append(torch.stack([m.grad for m in masks_n]))
    return torch.stack(heads, 1), torch.stack(neurons, 1)  # [layers, chunks, units]


def _both_ways(tiny_models, tmp_path, per_token: bool):
    """A 3-layer tiny Llama's mask gradients, streamed and from one whole-model graph (chunks of 2 windows)."""
    folder = tiny_models("llama", layers=3)
    ids = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    skeleton = build_skeleton(folder)
    structure = structure_of(skeleton.config)
    shape = Shape.of(skeleton.config, structure)
    streamed = mask_gradients(skeleton, ids, structure, shape, torch.device("cpu"), 2, tmp_path, per_token=per_token)
    return shape, streamed, *whole_model_mask_gradients(folder, ids, chunk=2, per_token=per_token)


def test_streamed_mask_gradients_equal_whole_model_autograd(tiny_models, tmp_path):
    _, streamed, heads, neurons = _both_ways(tiny_models, tmp_path, per_token=False)
    assert heads.abs().max() > 0 and neurons.abs().max() > 0
    for layer in range(3):
        torch.testing.assert_close(streamed.heads[layer], heads[layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(streamed.neurons[layer], neurons[layer], rtol=0, atol=1e-5)


def test_per_token_fisher_equals_whole_model_autograd(tiny_models, tmp_path):
    """--fisher-samples token: Σ over every token of (∂L/∂m_token)², from the same streamed backward pass."""
    shape, streamed, heads, neurons = _both_ways(tiny_models, tmp_path, per_token=True)
    for layer in range(3):
        fisher_n = neurons[layer].pow(2).flatten(0, -2).sum(0)
        groups = heads[layer].reshape(*heads[layer].shape[:-1], shape.kv_heads, -1).sum(-1)
        torch.testing.assert_close(streamed.fisher_neurons[layer], fisher_n, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(streamed.fisher_heads[layer], heads[layer].pow(2).flatten(0, -2).sum(0),
                                   rtol=1e-4, atol=1e-9)  # fmt: skip
        torch.testing.assert_close(streamed.fisher_groups[layer], groups.pow(2).flatten(0, -2).sum(0),
                                   rtol=1e-4, atol=1e-9)  # fmt: skip
        torch.testing.assert_close(streamed.neurons[layer], neurons[layer].sum((1, 2)), rtol=0, atol=1e-5)


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("arch,heads_per_group", [("llama", False), ("llama", True), ("qwen2", False), ("opt", False)])
def test_smaller_model_equals_the_masked_dense_model(arch, heads_per_group, tiny_models, corpus_file, tmp_path):
    """Without tuning, the exported smaller model computes exactly what the dense model computes with the
    removed heads and neurons masked to zero: slicing loses nothing else."""
    folder = tiny_models(arch, layers=2)
    out = tmp_path / "out"
    keep_heads = None if arch == "opt" else (2 if heads_per_group else 2)
    report = llmprune.prune(
        str(folder),
        method="fisher",
        keep_heads=keep_heads,
        keep_neurons=64,
        heads_per_group=heads_per_group,
        mask_tuning=False,
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        no_eval=True,
        output=str(out),
        quiet=True,
    )
    kept = report["structured"]["kept"]
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    small_logits, small = _logits(out, ids)
    assert small.config.get_text_config().to_dict()[structure_of(small.config).inter_key] == 64
    assert sum(p.numel() for p in small.parameters()) == report["structured"]["parameters"]["total_after"]
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    structure = structure_of(dense.config)
    shape = Shape.of(dense.config, structure)
    layers = dense.model.layers if arch != "opt" else dense.model.decoder.layers
    cut_heads = [layer["heads"] for layer in report["layers"]]
    assert all(h == kept["heads"] for h in cut_heads)
    # Rebuild the kept units by matching the exported weights against the dense ones.
    handles = []
    for layer, small_layer in zip(layers, small.model.layers if arch != "opt" else small.model.decoder.layers):
        down_dense = layer.get_submodule(structure.down).weight
        down_small = small_layer.get_submodule(structure.down).weight
        neurons = [int((down_dense - col.unsqueeze(1)).abs().sum(0).argmin()) for col in down_small.T]
        neuron_mask = torch.zeros(shape.intermediate)
        neuron_mask[neurons] = 1
        handles.append(
            layer.get_submodule(structure.down).register_forward_pre_hook(lambda m, a, mask=neuron_mask: (a[0] * mask,))
        )
        if structure.heads:
            o_dense = layer.get_submodule(structure.o).weight.reshape(shape.hidden, shape.heads, shape.head_dim)
            o_small = small_layer.get_submodule(structure.o).weight.reshape(shape.hidden, -1, shape.head_dim)
            heads = [int((o_dense - o_small[:, j : j + 1]).abs().sum((0, 2)).argmin()) for j in range(o_small.shape[1])]
            head_mask = torch.zeros(shape.heads)
            head_mask[heads] = 1
            handles.append(
                layer.get_submodule(structure.o).register_forward_pre_hook(
                    lambda m, a, mask=head_mask: (a[0] * mask.repeat_interleave(shape.head_dim),)
                )
            )
    with torch.no_grad():
        masked = dense(ids).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(small_logits, masked, rtol=0, atol=1e-4)


def test_search_respects_the_budget_and_the_even_head_rule():
    from llmprune.structured.arch import LLAMA_LIKE
    from llmprune.structured.search import Costs, Counts, search_counts

    shape = Shape(heads=12, kv_heads=6, head_dim=64, hidden=768, intermediate=2048)
    costs = Costs(
        fixed=1536,
        group=2 * 64 * 768 * 2 + 2 * 64 * 768,
        query_head=2 * 64 * 768,
        neuron=3 * 768,
        group_macs=1.0,
        query_head_macs=1.0,
        neuron_macs=1.0,
        fixed_macs=0.0,
    )
    layers = 4
    torch.manual_seed(0)
    heads = torch.rand(layers, 6)
    neurons = torch.rand(layers, 2048) * 0.01
    dense = costs.layer(6, 2, 2048, 2)
    for keep in (0.9, 0.7, 0.5):
        counts = search_counts(heads, neurons, shape, LLAMA_LIKE, costs, keep, False, False, 64)
        assert isinstance(counts, Counts)
        assert costs.layer(counts.kv_groups, counts.heads_per_group, counts.neurons, 2) <= keep * dense
        assert counts.kv_groups == 6 or counts.kv_groups % 2 == 0
        assert counts.neurons % 64 == 0 or counts.neurons == 2048


def test_rearrangement_lowers_the_block_diagonal_loss():
    from llmprune.structured.search import rearrange

    torch.manual_seed(1)
    common = torch.randn(16, 1)
    grads = torch.randn(16, 40) * 0.3 + common * torch.linspace(-1, 1, 40)  # correlated gradients
    pruned = 12

    def loss(units):
        return float(grads[:, units].sum(1).pow(2).sum())

    by_diagonal = grads.pow(2).sum(0).argsort()[:pruned].tolist()
    rearranged = rearrange(grads, pruned)
    assert len(rearranged) == pruned and len(set(rearranged)) == pruned
    assert loss(rearranged) < loss(by_diagonal)


def test_structured_bad_input(tiny_models, corpus_file, tmp_path):
    from llmprune.errors import LLMPruneError

    folder = tiny_models("llama", layers=2)
    common = dict(calibration=str(corpus_file), samples=2, seqlen=16, no_eval=True, output=str(tmp_path / "o"))
    with pytest.raises(LLMPruneError, match="--remove must be in"):
        llmprune.prune(str(folder), method="fisher", remove=1.5, **common)
    with pytest.raises(LLMPruneError, match="--sparsity is for the unstructured methods; --method fisher is struct"):
        llmprune.prune(str(folder), method="fisher", sparsity=0.5, **common)
    with pytest.raises(LLMPruneError, match="multiple of the group size"):
        llmprune.prune(str(folder), method="fisher", keep_heads=3, **common)
    with pytest.raises(LLMPruneError, match="structured pruning supports"):
        llmprune.prune(str(tiny_models("gpt_neox", layers=2)), method="fisher", **common)
    with pytest.raises(LLMPruneError, match="--fisher-batch must be at least 1"):
        llmprune.prune(str(folder), method="fisher", fisher_batch=0, **common)
    with pytest.raises(LLMPruneError, match="--plan-only is for the unstructured methods"):
        llmprune.prune(str(folder), method="fisher", plan_only=True, **common)
    assert not (tmp_path / "o").exists()


def test_fisher_batch_sets_the_gradient_minibatch(tiny_models, corpus_file, tmp_path, monkeypatch):
    """--fisher-batch N: the streamed gradients come in minibatches of N windows (one Fisher sample each)."""
    import llmprune.structured.fisher as run

    seen = []
    original = run.mask_gradients

    def spy(skeleton, ids, structure, shape, device, chunk, *rest, **options):
        grads = original(skeleton, ids, structure, shape, device, chunk, *rest, **options)
        seen.append((chunk, grads.heads[0].shape[0]))
        return grads

    import llmprune.structured.body as body

    rearranged = []
    original_rearrange = body.rearrange
    monkeypatch.setattr(run, "mask_gradients", spy)
    monkeypatch.setattr(body, "rearrange", lambda g, n: rearranged.append(g.shape) or original_rearrange(g, n))
    report = llmprune.prune(
        str(tiny_models("llama", layers=2)),
        method="fisher",
        fisher_batch=1,
        fisher_samples="minibatch",  # Kwon's configuration: a sample per minibatch, the rearrangement
        fisher_combine="none",
        calibration=str(corpus_file),
        samples=4,
        seqlen=16,
        no_eval=True,
        output=str(tmp_path / "o"),
        quiet=True,
    )
    assert seen == [(1, 4)]
    assert report["options"]["fisher_batch"] == 1 and report["options"]["fisher_samples"] == "minibatch"
    assert rearranged and all(shape[0] == 4 for shape in rearranged)  # 4 samples (windows) per layer
