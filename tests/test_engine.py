"""The streaming engine against a straightforward whole-model-in-memory implementation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, calibration_windows
from llmprune.eval.perplexity import streamed_logits
from llmprune.methods import METHODS, InputStats, Pattern


class _Stop(Exception):
    pass


def _read_output(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


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
            stats = {
                n: InputStats(m.in_features, cls.statistics, hidden.device) if cls.statistics != "none" else None
                for n, m in linears.items()
            }
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
                    st = InputStats(mod.in_features, cls.statistics, a[0].device) if cls.statistics != "none" else None
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


def test_chunked_sequential_matches_one_pass(tiny_models, corpus_file, tmp_path):
    """Sequential order over chunks (several partial passes) equals the single full-batch pass."""
    folder = tiny_models("llama", layers=2)
    common = dict(method="sparsegpt", calibration=str(corpus_file), samples=8, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "one"), batch_size=8, order="sequential", **common)
    llmprune.prune(str(folder), output=str(tmp_path / "chunks"), batch_size=3, order="sequential", **common)
    one, chunks = _read_output(tmp_path / "one"), _read_output(tmp_path / "chunks")
    for key in one:
        torch.testing.assert_close(chunks[key], one[key], rtol=0, atol=1e-5, msg=key)


def test_same_seed_same_masks_other_seed_other_masks(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("llama", layers=2)
    common = dict(method="wanda", calibration=str(corpus_file), samples=4, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "a"), seed=1, **common)
    llmprune.prune(str(folder), output=str(tmp_path / "b"), seed=1, **common)
    llmprune.prune(str(folder), output=str(tmp_path / "c"), seed=2, **common)
    a, b, c = (_read_output(tmp_path / n) for n in "abc")
    keys = [k for k in a if k.endswith("proj.weight")]
    assert all(torch.equal(a[k] == 0, b[k] == 0) for k in keys)
    assert any(not torch.equal(a[k] == 0, c[k] == 0) for k in keys)


def test_report_records_layers_and_exact_sparsity(tiny_models, corpus_file, tmp_path):
    folder = tiny_models("qwen2", layers=2)
    out = tmp_path / "out"
    report = llmprune.prune(
        str(folder),
        method="sparsegpt",
        sparsity=0.6,
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        output=str(out),
        eval_samples=4,
        quiet=True,
    )
    on_disk = json.loads((out / "llmprune.json").read_text())
    assert on_disk["method"] == "sparsegpt" and on_disk["pattern"] == "unstructured"
    assert on_disk["calibration"]["count"] == 4 and on_disk["calibration"]["seqlen"] == 32
    assert len(on_disk["layers"]) == 2
    tensors = _read_output(out)
    for layer in on_disk["layers"]:
        for module in layer["modules"]:
            weight = tensors[module["name"] + ".weight"]
            assert int((weight == 0).sum()) == round(0.6 * weight.numel())
            assert module["error"] > 0
    assert report["perplexity"]["dense"] > 1 and report["perplexity"]["pruned"] > 1
    assert on_disk["perplexity"]["pruned"] == report["perplexity"]["pruned"]
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in config and "quantization_config" not in config


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


def test_token_file_calibration_uses_exactly_those_windows(tiny_models, corpus_file, tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = tiny_models("llama", layers=2)
    windows = calibration_windows(TokenizedCorpus(resolve_source(str(corpus_file)), tokenizer), 5, 24, 9)
    token_file = tmp_path / "windows.safetensors"
    save_file({"input_ids": windows.ids}, str(token_file))
    from_file = llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(token_file),
        no_eval=True,
        output=str(tmp_path / "a"),
        quiet=True,
    )
    from_text = llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(corpus_file),
        samples=5,
        seqlen=24,
        seed=9,
        no_eval=True,
        output=str(tmp_path / "b"),
        quiet=True,
    )
    assert from_file["calibration"]["sha256"] == from_text["calibration"]["sha256"] == windows.fingerprint()
    a, b = _read_output(tmp_path / "a"), _read_output(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_token_file(tiny_models, tmp_path):
    from safetensors.torch import save_file

    from llmprune.errors import LLMPruneError

    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.full((2, 8), 10_000)}, str(bad))
    with pytest.raises(LLMPruneError, match="outside the vocabulary"):
        llmprune.prune(str(tiny_models("llama")), calibration=str(bad), no_eval=True, output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_concurrent_solves_on_several_devices_match_one(tiny_models, corpus_file, tmp_path):
    """--solver-devices runs a group's solves concurrently (one per GPU); here two CPU 'devices' exercise it."""
    folder = tiny_models("llama", layers=2)
    common = dict(method="sparsegpt", calibration=str(corpus_file), samples=4, seqlen=32, no_eval=True, quiet=True)
    llmprune.prune(str(folder), output=str(tmp_path / "one"), **common)
    report = llmprune.prune(str(folder), output=str(tmp_path / "two"), solver_devices="cpu,cpu", **common)
    assert report["solver_devices"] == ["cpu", "cpu"]
    one, two = _read_output(tmp_path / "one"), _read_output(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)


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


def _watch_statistics_and_solves(patch: pytest.MonkeyPatch, probe) -> list[tuple[str, object]]:
    """Record probe() at every statistics update (InputStats.add) and SparseGPT solve."""
    calls: list[tuple[str, object]] = []
    for owner, name in ((InputStats, "add"), (METHODS["sparsegpt"], "prune")):
        function = getattr(owner, name)

        def wrapper(*args, _name=name, _function=function, **kwargs):
            calls.append((_name, probe()))
            return _function(*args, **kwargs)

        patch.setattr(owner, name, wrapper)
    return calls


def _prune_tiny_sparsegpt(folder, corpus_file, output, **options) -> dict:
    return llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(corpus_file),
        samples=4,
        seqlen=32,
        batch_size=2,
        output=str(output),
        no_eval=True,
        quiet=True,
        **options,
    )


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


def test_chunk_tracker_only_when_parking_and_never_around_our_own_code(tiny_models, corpus_file, tmp_path):
    """The chunk tracker (a Python dispatch mode) is installed only when barrier state is parked, and
    our own code in the hooks leaves it: a SparseGPT solve is thousands of small ops, each of which
    would otherwise pass through Python. With every storage parked (min_bytes 1), disk parking still
    finds the chunks' state, and the result is bit-identical to keeping it in memory."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from llmprune.engine.parking import ChunkTracker, Parking

    folder = tiny_models("llama", layers=2)
    park_one, alive = Parking.park, ChunkTracker.alive

    def run(park: str) -> tuple[list, set, int, list[int]]:
        in_forward: set[type] = set()
        parked: list[int] = []
        tracked: list[int] = []

        def counting_park(self, tensor):
            result = park_one(self, tensor)
            parked.append(result.nbytes if result is not None else 0)
            return result

        def counting_alive(self):
            storages = alive(self)
            tracked.append(len(storages))
            return storages

        def linear_mode(module, args, output):
            if isinstance(module, nn.Linear):
                in_forward.add(type(_get_current_dispatch_mode()))

        handle = nn.modules.module.register_module_forward_hook(linear_mode)
        try:
            with pytest.MonkeyPatch.context() as patch:
                ours = _watch_statistics_and_solves(patch, _get_current_dispatch_mode)
                patch.setattr(Parking, "park", counting_park)
                patch.setattr(ChunkTracker, "alive", counting_alive)
                patch.setattr(Parking.__init__, "__defaults__", Parking.__init__.__defaults__[:-1] + (1,))
                patch.setattr(ChunkTracker.__init__, "__defaults__", (1,))
                _prune_tiny_sparsegpt(folder, corpus_file, tmp_path / park, park=park, order="sequential")
        finally:
            handle.remove()
        return ours, in_forward, sum(parked), tracked

    for park in ("memory", "disk"):
        ours, in_forward, parked, tracked = run(park)
        assert {name for name, _ in ours} == {"add", "prune"}
        assert all(mode is None for _, mode in ours), ours
        if park == "memory":
            assert in_forward == {type(None)} and parked == 0 and not tracked
        else:  # every barrier (q/k/v, o, gate/up, down of each layer, each chunk) finds state to park
            assert ChunkTracker in in_forward and parked > 0
            assert len(tracked) == 2 * 4 * 2 and all(tracked), tracked
    memory, disk = _read_output(tmp_path / "memory"), _read_output(tmp_path / "disk")
    assert memory.keys() == disk.keys() and all(torch.equal(memory[k], disk[k]) for k in memory)


def test_forward_dtype_choice():
    from llmprune.engine.devices import check_forward_mix, compute_dtype, forward_dtype, parse_forward_dtype
    from llmprune.errors import LLMPruneError

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert forward_dtype(cpu, torch.float32) == torch.float32
    assert forward_dtype(cpu, torch.bfloat16) == torch.float32  # bf16 on a CPU is opt-in (costs quality at 2:4)
    assert forward_dtype(cpu, torch.float16) == torch.float32
    assert forward_dtype(gpu, torch.float16) == torch.float16
    assert forward_dtype(cpu, torch.float32, parse_forward_dtype("bfloat16", cpu)) == torch.bfloat16
    assert parse_forward_dtype("auto", cpu) is None and parse_forward_dtype("float16", gpu) == torch.float16
    # the layers are held at least as wide as the forward: a float32 forward of a bf16 model on a GPU
    # loads float32 layers (autocast cannot widen), a bf16 forward keeps them in the model's dtype
    assert compute_dtype(gpu, torch.bfloat16, torch.float32) == torch.float32
    assert compute_dtype(gpu, torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert compute_dtype(gpu, torch.float32, torch.bfloat16) == torch.float32
    assert compute_dtype(cpu, torch.bfloat16, torch.bfloat16) == torch.float32
    check_forward_mix(torch.float32, torch.bfloat16)
    check_forward_mix(torch.bfloat16, torch.bfloat16)
    with pytest.raises(LLMPruneError, match="mixes half types"):
        check_forward_mix(torch.bfloat16, torch.float16)


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
