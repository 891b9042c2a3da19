"""A method is one file and one registry line: a throwaway method with its own option and its own statistic,
loaded from a temporary module, runs end to end through the CLI with nothing else changed."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from llmprune.depth import DEPTH
from llmprune.methods import METHODS
from llmprune.structured.methods import STRUCTURED
from tests.helpers.cli import one_error_line, run_main

THROWAWAY = '''
import torch

from llmprune.methods import masks
from llmprune.methods.base import Pruned, PruningMethod
from llmprune.methods.statistics import Statistic
from llmprune.settings import Option

CALLS = {"prune": 0, "fail_at": None}


class MeanAbs(Statistic):
    """Per input feature, the sum of |x| over tokens (a statistic no built-in method uses)."""

    def __init__(self, dim, device):
        self.value = torch.zeros(dim, device=device)
        self.tokens = 0

    @classmethod
    def nbytes(cls, dim):
        return dim * 4

    def add(self, x):
        self.value += x.float().abs().sum(0)
        self.tokens += x.shape[0]

    def to(self, device):
        copy = MeanAbs(0, device)
        copy.value, copy.tokens = self.value.to(device), self.tokens
        return copy


class Throwaway(PruningMethod):
    name = "throwaway"
    summary = "|W| x mean|x| ** power"
    statistics = (MeanAbs,)
    options = (Option("power", 1.0, "exponent of the input term (default 1.0)", type=float, minimum=0.0),)

    def prune(self, weight, stats, pattern):
        CALLS["prune"] += 1
        if CALLS["fail_at"] is not None and CALLS["prune"] >= CALLS["fail_at"]:
            raise RuntimeError("throwaway: stopped on purpose")
        mean = stats[MeanAbs]
        assert mean.tokens > 0
        scores = weight.abs().float() * (mean.value / mean.tokens).pow(self.values["power"]).unsqueeze(0)
        mask = masks.select(scores, pattern, per_row=True)
        return Pruned(weight.masked_fill(mask, 0), mask)
'''


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """The throwaway method's module, imported from a temporary file and registered with one line."""
    path = tmp_path / "throwaway_method.py"
    path.write_text(THROWAWAY)
    spec = importlib.util.spec_from_file_location("throwaway_method", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throwaway_method", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(METHODS, module.Throwaway.name, module.Throwaway)  # the registry line
    return module


def _argv(model, corpus_file, out, *extra):
    return [model, "--method", "throwaway", "--calibration", corpus_file, "--samples", 4, "--seqlen", 32,
            "--no-eval", "--quiet", "--output", out, *extra]  # fmt: skip


def test_a_new_method_runs_end_to_end_through_the_cli(throwaway, tiny_models, corpus_file, tmp_path, capsys):
    model = tiny_models("llama", layers=2)
    with pytest.raises(SystemExit):
        run_main(["--help"], capsys)
    help_text = capsys.readouterr().out
    assert "--method throwaway: |W| x mean|x| ** power" in help_text and "--power" in help_text

    out = tmp_path / "out"
    throwaway.CALLS["fail_at"] = 8  # 7 Linears a layer: layer 0 commits, layer 1 stops
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        run_main(_argv(model, corpus_file, out, "--power", 0.5), capsys)
    assert "the same command resumes it" in capsys.readouterr().err  # a warning, shown even with --quiet
    state = json.loads((tmp_path / ".out.partial" / ".work" / "state.json").read_text())
    assert state["next_layer"] == 1 and state["fingerprint"]["power"] == 0.5

    code, _, err = run_main(_argv(model, corpus_file, out, "--power", 2), capsys)
    assert code == 2 and "different settings (power differ)" in one_error_line(err)

    throwaway.CALLS["fail_at"] = None
    code, _, err = run_main(_argv(model, corpus_file, out, "--power", 0.5), capsys)
    assert code == 0, err
    report = json.loads((out / "llmprune.json").read_text())
    assert report["method"] == "throwaway" and report["options"] == {"power": 0.5}
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert "--power 0.5" in report["command"]
    assert report["layers"][0]["modules"] and report["layers"][1]["modules"]


def test_an_option_of_another_method_is_refused(throwaway, tiny_models, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main([*_argv(tiny_models("llama", layers=2), corpus_file, out), "--dampening", 0.1], capsys)
    assert code == 2 and "--dampening is an option of --method sparsegpt, not of throwaway" in one_error_line(err)
    code, _, err = run_main([*_argv(tiny_models("llama", layers=2), corpus_file, out), "--power", -1], capsys)
    assert code == 2 and "--power must be at least 0 (got -1.0)" in one_error_line(err)
    assert not out.exists()


def test_every_registered_method_declares_its_interface():
    """The registries hold classes with a name, a summary for --help, and options with help and defaults that
    shadow no common setting."""
    from llmprune.settings import SECTIONS, options_of

    settings = {option.name for section in SECTIONS.values() for option in options_of(section)}
    for registry in (METHODS, STRUCTURED, DEPTH):
        for name, method in registry.items():
            assert method.name == name and method.summary
            for option in method.options:
                assert option.help and option.cli_flag.startswith("--") and option.name not in settings
