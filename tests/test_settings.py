"""settings.py: every option value is checked in one place, before any work (the CLI and the Python API alike)."""

from __future__ import annotations

import re

import pytest

from tests.helpers.cli import one_error_line as _one_error_line
from tests.helpers.cli import run_main as _run
from tests.helpers.publish import prune_args as _prune_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-ppl-increase", "-0.1"], "--max-ppl-increase must be >= 0"),
        (["--push-to-hub", "no-slash"], "Hub repository must be ORG/NAME"),
        (["--push-to-hub", "org/name", "--no-eval"], "--push-to-hub needs the quality gate"),
        (["--save-format", "zip"], "--save-format must be one of dense, packed-2:4"),
    ],
)
def test_bad_publish_options_fail_before_any_work(argv, message, trained, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_prune_args(trained, corpus_file, out, *argv), capsys)
    assert code == 2 and message in _one_error_line(err)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"samples": "12"}, "--samples must be a number (got '12')"),
        ({"samples": 2.5}, "--samples must be a whole number"),
        ({"dampening": float("nan")}, "--dampening must be a number (got nan)"),
        ({"method": "wanda", "dampening": 0.1}, "--dampening is an option of --method sparsegpt, not of wanda"),
        ({"method": "flap", "neuron_multiple": 0}, "--neuron-multiple must be at least 1"),
        ({"method": "flap", "keep_heads": 0}, "--keep-heads must be at least 1"),
        ({"method": "fisher", "tuning_damping": -0.1}, "--tuning-damping must be at least 0"),
        ({"method": "fisher", "order": "sequential"}, "--order is for the unstructured methods"),
        ({"method": "wanda", "mask_tuning": False}, "--no-mask-tuning is for the structured methods"),
        ({"method": "fisher", "resume": True}, "--resume: structured runs are not resumable"),
        ({"device": "cpu", "solver_devices": "cuda:0"}, "--solver-devices: cuda:0 is not a visible GPU"),
        ({"solver_devices": "bogus"}, "--solver-devices 'bogus': not a list of device names"),
        ({"method": "fisher", "keep_heads": 3}, "multiple of the group size"),
        ({"mystery": 1}, "unknown option 'mystery'"),
    ],
)
def test_every_bad_value_is_one_error_before_any_work(options, message, tiny_models, corpus_file, tmp_path):
    """The Python API and the CLI share one validation: a bad value, another method's option or another kind's
    setting is one LLMPruneError before the output folder exists or any weight is read."""
    import llmprune
    from llmprune.errors import LLMPruneError

    out = tmp_path / "out"
    common = {"calibration": str(corpus_file), "samples": 2, "seqlen": 16, "output": str(out), "quiet": True}
    with pytest.raises(LLMPruneError, match=re.escape(message)):
        llmprune.prune(str(tiny_models("llama", layers=2)), **{**common, **options})
    assert not list(tmp_path.iterdir())


def test_an_option_at_its_default_is_accepted_and_a_string_is_one_pattern(tiny_models, corpus_file, tmp_path):
    """Another method's option at its default changes nothing and passes (a caller may forward a full set of
    options); targets="mlp.*" is one pattern, not five characters."""
    import llmprune

    report = llmprune.prune(str(tiny_models("llama", layers=2)), method="wanda", dampening=0.01, targets="mlp.*",
                            calibration=str(corpus_file), samples=2, seqlen=16, no_eval=True, quiet=True,
                            output=str(tmp_path / "out"))  # fmt: skip
    assert report["targets"] == {"include": ["mlp.*"], "ignore": []}
    names = {module["name"].rsplit(".", 2)[-2] for layer in report["layers"] for module in layer["modules"]}
    assert names == {"mlp"} and report["options"] == {}
