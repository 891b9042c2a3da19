"""OWL sparsity profiles: per-layer sparsities stay within ±λ of the target and average to it exactly, the streamed
outlier ratios equal a whole-model computation, each layer is pruned to its own sparsity, a resumed run keeps the
profile, and bad combinations are one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.cli import main
from llmprune.engine.owl import outlier_ratio, owl_sparsities
from llmprune.errors import LLMPruneError
from tests.helpers.engine import read_output


@pytest.mark.parametrize(
    "ratios,sizes",
    [
        ([0.01, 0.02, 0.05, 0.03], [1, 1, 1, 1]),
        ([0.01, 0.01, 0.01, 0.2], [1, 1, 1, 1]),  # lopsided: the reference's formula would go 1.5 λ under the target
        ([0.03, 0.01, 0.07], [100, 300, 50]),  # layers of different sizes
    ],
)
@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2)])
def test_sparsities_stay_within_lambda_and_average_to_the_target(ratios, sizes, target, lam):
    sparsities = owl_sparsities(ratios, sizes, target, lam)
    assert all(abs(s - target) <= lam + 1e-12 for s in sparsities)
    weighted = sum(s * n for s, n in zip(sparsities, sizes, strict=True)) / sum(sizes)
    assert weighted == pytest.approx(target, abs=1e-12)
    by_ratio = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [sparsities[i] for i in by_ratio] == sorted(sparsities, reverse=True)  # more outliers, fewer pruned
    if len(set(sizes)) == 1:  # the plain mean: the published formula's extremes are at or past λ, and end at it
        assert max(abs(s - target) for s in sparsities) == pytest.approx(lam, rel=1e-9)


def test_a_layer_without_targets_takes_no_part():
    """Its ratio (none: 0) does not stretch the others' scaling, and it keeps the target it is never pruned to."""
    alone = owl_sparsities([0.02, 0.05, 0.03], [1, 1, 1], 0.5, 0.08)
    assert owl_sparsities([0.0, 0.02, 0.05, 0.03], [0, 1, 1, 1], 0.5, 0.08) == pytest.approx([0.5, *alone])


def test_the_reference_formula_is_kept_when_it_stays_within_lambda():
    """Min-max scaled to [0, 2λ], minus the mean: the published formula, unchanged for balanced ratios."""
    ratios, lam = [0.0, 0.5, 1.0], 0.08
    assert owl_sparsities(ratios, [1, 1, 1], 0.5, lam) == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.3, 0.3], [1, 1], 0.5, lam) == [0.5, 0.5]  # equal ratios: uniform


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    """Scores |W_ij| x norm_j of two Linears together: mean 2.125 over 12 scores; a block of rows at a time."""
    parts = [
        (torch.tensor([[0.0, 0, 0], [0, 0, -12]]), torch.tensor([1.0, 1.0, 2.0])),  # one score of 24
        (torch.tensor([[0.0, 0, 0, 0, 0, 3]]), torch.full((6,), 0.5)),  # one of 1.5
    ]
    for rows in (1, 4096):
        assert outlier_ratio(parts, 5.0, rows) == pytest.approx(1 / 12)  # above 10.625: 24
        assert outlier_ratio(parts, 0.5, rows) == pytest.approx(2 / 12)  # above 1.0625: 24 and 1.5


def _whole_model_ratios(folder, ids, m: float) -> list[float]:
    """The definition the plain way, on the whole dense model in memory: per decoder layer, the share of Wanda scores
    |W_ij| ||X_j|| of all its Linears above m times their mean."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    norms: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):

            def hook(mod, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                norms[name] = norms.get(name, 0) + x.pow(2).sum(0)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    ratios = []
    for index, layer in enumerate(model.model.layers):
        linears = [(n, m_) for n, m_ in layer.named_modules() if isinstance(m_, torch.nn.Linear)]
        scores = torch.cat(
            [(mod.weight.detach().abs().double() * norms[f"{index}.{n}"].sqrt()).flatten() for n, mod in linears]
        )
        ratios.append(float((scores > m * scores.mean()).double().mean()))
    return ratios


def _token_file(path, windows=6, seqlen=32, seed=0):
    ids = torch.randint(2, 512, (windows, seqlen), generator=torch.Generator().manual_seed(seed))
    save_file({"input_ids": ids}, str(path))
    return ids


@pytest.mark.parametrize(
    "method,activations,order",
    [("wanda", "memory", "parallel"), ("sparsegpt", "disk", "parallel"), ("sparsegpt", "memory", "sequential")],
)
def test_streamed_ratios_equal_the_whole_model_and_each_layer_gets_its_sparsity(
    tiny_models, tmp_path, method, activations, order
):
    folder = tiny_models("llama", layers=4, seed=3)
    ids = _token_file(tmp_path / "calib.safetensors")
    out = tmp_path / "out"
    report = llmprune.prune(
        str(folder),
        method=method,
        sparsity=0.6,
        sparsity_profile="owl",
        owl_m=3.0,
        activations=activations,
        order=order,
        calibration=str(tmp_path / "calib.safetensors"),
        output=str(out),
        no_eval=True,
        quiet=True,
    )
    profile = report["sparsity_profile"]
    assert profile["profile"] == "owl" and profile["lambda"] == 0.08 and profile["m"] == 3.0
    streamed = [layer["outlier_ratio"] for layer in profile["layers"]]
    whole = _whole_model_ratios(folder, ids, 3.0)
    weights = profile["layers"][0]["weights"]
    assert streamed == pytest.approx(whole, abs=2 / weights)  # at most a score or two on the threshold
    assert len(set(streamed)) > 1
    sparsities = [layer["sparsity"] for layer in profile["layers"]]
    assert max(abs(s - 0.6) for s in sparsities) == pytest.approx(0.08)
    for layer, wanted in zip(report["layers"], sparsities, strict=True):  # each layer pruned to its own sparsity
        assert layer["sparsity"] == pytest.approx(wanted, abs=len(layer["modules"]) / weights)
    total = sum(layer["weights"] for layer in profile["layers"])
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=len(report["layers"]) * 7 / total)
    saved = json.loads((out / "llmprune.json").read_text())
    assert saved["sparsity_profile"] == profile
    assert "OWL" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    zeros = sum(int((m.weight == 0).sum()) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert zeros / total == pytest.approx(0.6, abs=len(report["layers"]) * 7 / total)


def test_experts_are_pruned_to_their_layer_sparsity(tiny_models, tmp_path):
    """On an MoE model the experts' projections are targets like any Linear: scored with the tokens routed to them,
    and pruned to their layer's sparsity."""
    folder = tiny_models("olmoe", layers=3, seed=1)
    _token_file(tmp_path / "calib.safetensors", windows=8)
    report = llmprune.prune(
        str(folder), method="wanda", sparsity=0.6, sparsity_profile="owl", no_eval=True, quiet=True,
        calibration=str(tmp_path / "calib.safetensors"), output=str(tmp_path / "out"),
    )  # fmt: skip
    profile = report["sparsity_profile"]["layers"]
    assert max(abs(layer["sparsity"] - 0.6) for layer in profile) == pytest.approx(0.08)
    for layer, wanted in zip(report["layers"], profile, strict=True):
        experts = [m for m in layer["modules"] if ".experts." in m["name"] and m["tokens"]]
        assert experts and all(m["sparsity"] == pytest.approx(wanted["sparsity"], abs=1e-3) for m in experts)


def test_uniform_is_the_default_and_recorded(model, corpus_file, tmp_path):
    report = llmprune.prune(
        str(model), method="wanda", calibration=str(corpus_file), samples=2, seqlen=32, output=str(tmp_path / "o"),
        no_eval=True, quiet=True,
    )  # fmt: skip
    assert report["sparsity_profile"] == {"profile": "uniform"}
    assert {layer["sparsity"] for layer in report["layers"]} == {0.5}


@pytest.mark.parametrize("killed_after", [0, 1])
def test_a_resumed_owl_run_keeps_its_profile(tiny_models, tmp_path, monkeypatch, killed_after):
    """Killed after the statistics pass or after its first layer, the run resumes without a second pass and ends as
    an unbroken run."""
    from llmprune.engine import owl, unstructured

    folder = tiny_models("llama", layers=3, seed=5)
    _token_file(tmp_path / "calib.safetensors")
    options = dict(
        method="wanda", sparsity=0.5, sparsity_profile="owl", calibration=str(tmp_path / "calib.safetensors"),
        no_eval=True, quiet=True,
    )  # fmt: skip
    llmprune.prune(str(folder), output=str(tmp_path / "whole"), **options)

    class Killed(Exception):
        pass

    original = unstructured.prune_layers

    def one_layer_then_die(*args, **kwargs):
        state = args[7]
        real_save = state.save
        if killed_after == 0:
            raise Killed

        def save(work):
            real_save(work)
            if state.next_layer == killed_after:
                raise Killed

        state.save = save
        original(*args, **kwargs)

    monkeypatch.setattr(unstructured, "prune_layers", one_layer_then_die)
    with pytest.raises(Killed):
        llmprune.prune(str(folder), output=str(tmp_path / "resumed"), **options)
    monkeypatch.setattr(unstructured, "prune_layers", original)
    passes = []

    def counted(*args, **kwargs):
        passes.append(1)
        return owl.layer_outlier_ratios(*args, **kwargs)

    monkeypatch.setattr(unstructured, "layer_outlier_ratios", counted)
    resumed = llmprune.prune(str(folder), output=str(tmp_path / "resumed"), resume=True, **options)
    assert passes == []
    whole = json.loads((tmp_path / "whole" / "llmprune.json").read_text())
    assert resumed["sparsity_profile"]["layers"] == whole["sparsity_profile"]["layers"]
    assert [lay["sparsity"] for lay in resumed["layers"]] == [lay["sparsity"] for lay in whole["layers"]]
    expected, got = read_output(tmp_path / "whole"), read_output(tmp_path / "resumed")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sparsity-profile", "owl", "--pattern", "2:4"], "fixes it at 0.5 in every group"),
        (["--owl-lambda", "0.1"], "--owl-lambda is for --sparsity-profile owl"),
        (["--owl-m", "7"], "--owl-m is for --sparsity-profile owl"),
        (["--sparsity-profile", "owl", "--sparsity", "0.95"], "outside \\[0, 1\\)"),
        (["--sparsity-profile", "owl", "--sparsity", "0.5", "--owl-lambda", "-1"], "at least 0"),
        (["--sparsity-profile", "spiky"], "must be one of uniform, owl"),
    ],
)
def test_bad_profiles_are_one_line(model, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main([str(model), "--method", "wanda", "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_profile_options_through_the_python_api_are_checked(model):
    with pytest.raises(LLMPruneError, match="--owl-lambda is for"):
        llmprune.prune(str(model), method="wanda", owl_lambda=0.2)
