"""engine/prune_layer.py: one layer's Linears pruned in either order against a whole-model-in-memory
implementation; target rules, concurrent solves, statistics and solves out of autocast, the statistics pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, calibration_windows
from llmprune.methods import METHODS, InputStats, Pattern
from tests.helpers.engine import prune_tiny_sparsegpt as _prune_tiny_sparsegpt
from tests.helpers.engine import read_output as _read_output
from tests.helpers.engine import watch_statistics_and_solves as _watch_statistics_and_solves


class _Stop(Exception):
    pass


def reference_prune(folder, ids: torch.Tensor, method: str, pattern: Pattern, order: str) -> dict[str, torch.Tensor]:
    """Whole model in memory, plain hooks: the obvious implementation the engine must match."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    cls = METHODS[method]
    calls = {}

    def catch(index):
        def hook(module, args, kwargs):
            calls[index] = (args, kwargs)
            if index == 0:
                calls["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        return hook

    # Layer i's keyword arguments: hook layer i and run the model up to it.
    for index, layer in enumerate(layers):
        handle = layer.register_forward_pre_hook(catch(index), with_kwargs=True)
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        handle.remove()
    hidden = calls["hidden"]
    for index, layer in enumerate(layers):
        args, kwargs = calls[index]
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}

        def run(x, layer=layer, args=args, kwargs=kwargs):
            out = layer(x, *args[1:], **kwargs)
            return out[0] if isinstance(out, tuple) else out

        if order == "parallel":
            stats = {n: InputStats(m.in_features, cls.statistics, hidden.device) for n, m in linears.items()}
            handles = [
                m.register_forward_pre_hook(lambda mod, a, st=stats[n]: st.add(a[0]) if st is not None else None)
                for n, m in linears.items()
            ]
            with torch.no_grad():
                run(hidden)
            for h in handles:
                h.remove()
            for n, m in linears.items():
                m.weight.data = cls().prune(m.weight.data, stats[n], pattern).weight
        else:

            def prune_on_first_call(mod, a, n=None):
                if not getattr(mod, "_done", False):
                    st = InputStats(mod.in_features, cls.statistics, a[0].device)
                    if st is not None:
                        st.add(a[0])
                    mod.weight.data = cls().prune(mod.weight.data, st, pattern).weight
                    mod._done = True

            handles = [m.register_forward_pre_hook(prune_on_first_call) for m in linears.values()]
            with torch.no_grad():
                run(hidden)
            for h in handles:
                h.remove()
        with torch.no_grad():
            hidden = run(hidden)
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "method,pattern,order",
    [
        ("sparsegpt", "unstructured", "parallel"),
        ("sparsegpt", "2:4", "parallel"),
        ("wanda", "unstructured", "parallel"),
        ("magnitude", "unstructured", "parallel"),
        ("sparsegpt", "unstructured", "sequential"),
        ("wanda", "2:4", "sequential"),
    ],
)
def test_streamed_engine_matches_whole_model_reference(
    tiny_models, corpus_file, tokenizer, tmp_path, method, pattern, order
):
    folder = tiny_models("llama", layers=3)
    out = tmp_path / "out"
    llmprune.prune(
        str(folder),
        method=method,
        pattern=pattern,
        sparsity=None,
        calibration=str(corpus_file),
        samples=6,
        seqlen=48,
        seed=3,
        output=str(out),
        no_eval=True,
        order=order,
        quiet=True,
    )
    windows = calibration_windows(TokenizedCorpus(resolve_source(str(corpus_file)), tokenizer), 6, 48, 3)
    expected = reference_prune(folder, windows.ids, method, Pattern.parse(pattern, None), order)
    got = _read_output(out)
    layer_keys = [k for k in got if ".layers." in k and k.endswith("proj.weight")]
    assert layer_keys and all(float((got[k] == 0).float().mean()) >= 0.5 for k in layer_keys)
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=key)


def test_targets_and_ignore(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("llama", layers=2)
    out = tmp_path / "out"
    llmprune.prune(
        str(folder),
        method="magnitude",
        calibration=str(corpus_file),
        samples=2,
        seqlen=16,
        targets=("mlp.*",),
        ignore=("mlp.down_proj",),
        output=str(out),
        no_eval=True,
        quiet=True,
    )
    tensors = _read_output(out)
    dense = _read_output(folder)
    for key, value in tensors.items():
        pruned = ".mlp.gate_proj." in key or ".mlp.up_proj." in key
        if key.endswith("proj.weight"):
            assert (int((value == 0).sum()) == value.numel() // 2) == pruned, key
        if not pruned:
            assert torch.equal(value, dense[key]), key


def test_concurrent_solves_on_several_devices_match_one(tiny_models, corpus_file, tmp_path):
    """--solver-devices runs a group's solves concurrently (one per GPU); here two CPU 'devices' exercise it."""
    folder = tiny_models("llama", layers=2)
    common = dict(method="sparsegpt", calibration=str(corpus_file), samples=4, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "one"), **common)
    report = llmprune.prune(str(folder), output=str(tmp_path / "two"), solver_devices="cpu,cpu", **common)
    assert report["solver_devices"] == ["cpu", "cpu"]
    one, two = _read_output(tmp_path / "one"), _read_output(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_bfloat16_forward_keeps_statistics_and_solves_out_of_autocast(order, tiny_models, corpus_file, tmp_path):
    """The statistics and the SparseGPT solve run inside the forward's hooks, so inside its autocast:
    they must switch it off, or their matmuls (Hessian, OBS updates, errors) would run in bfloat16."""
    folder = tiny_models("llama", layers=2)
    with pytest.MonkeyPatch.context() as patch:
        calls = _watch_statistics_and_solves(patch, lambda: torch.is_autocast_enabled("cpu"))
        report = _prune_tiny_sparsegpt(folder, corpus_file, tmp_path / "out", order=order, forward_dtype="bfloat16")
    assert {name for name, _ in calls} == {"add", "prune"}
    assert not any(enabled for _, enabled in calls), calls
    errors = [m["error"] for layer in report["layers"] for m in layer["modules"]]
    assert all(0 < e < 1 for e in errors), errors


def test_statistics_pass_stops_once_every_group_is_fed(tiny_models, corpus_file, tmp_path):
    """In the papers' order a chunk's dense pass ends once the last group (down_proj) has fed its
    statistics: down_proj's matmul runs only in the propagating pass, gate/up in both."""
    folder = tiny_models("llama", layers=2)  # hidden 64, intermediate 128
    calls = {"gate/up": 0, "down": 0}

    def count(module, args, output):
        if not isinstance(module, nn.Linear) or args[0].shape[0] != 2:  # chunks of 2 (not the one-window probes)
            return
        if module.in_features == 128:
            calls["down"] += 1
        elif module.out_features == 128:
            calls["gate/up"] += 1

    handle = nn.modules.module.register_module_forward_hook(count)
    try:
        _prune_tiny_sparsegpt(folder, corpus_file, tmp_path / "out")  # 4 windows in chunks of 2, default order
    finally:
        handle.remove()
    layers, chunks = 2, 2
    assert calls == {"gate/up": layers * chunks * 2 * 2, "down": layers * chunks}
