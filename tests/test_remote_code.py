"""--trust-remote-code: a model that ships its own code (auto_map in config.json) is refused in one line
without consent, and pruned, evaluated, served and loadable with it (its code travels into the output)."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

from tests.helpers.cli import one_error_line, run_main
from tests.helpers.serving import Server

CONFIG_CODE = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "llmprune_tiny_custom"
"""
MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


@pytest.fixture
def custom_model(tiny_models, tmp_path):
    """A tiny Llama re-declared as an architecture transformers does not know, with its code in the folder."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_models("llama", layers=2), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="llmprune_tiny_custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny_custom.py").write_text(CONFIG_CODE)
    (folder / "modeling_tiny_custom.py").write_text(MODEL_CODE)
    return folder


def test_custom_code_needs_consent_then_prunes_evaluates_and_loads(custom_model, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(custom_model), "--method", "wanda", "--calibration", str(corpus_file), "--samples", "4"]
    args += ["--seqlen", "32", "--output", str(out), "--quiet"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and "ships its own model code" in one_error_line(err) and "--trust-remote-code" in err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()

    code, _, err = run_main([*args, "--trust-remote-code"], capsys)
    assert code == 0, err
    assert (out / "modeling_tiny_custom.py").read_text() == MODEL_CODE
    report = json.loads((out / "llmprune.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM"

    evaluate = ["eval", str(out), "--dataset", str(corpus_file), "--seqlen", "32", "--samples", "2", "--json"]
    code, _, err = run_main([*evaluate, "--quiet"], capsys)
    assert code == 2 and "ships its own model code" in one_error_line(err)
    code, stdout, err = run_main([*evaluate, "--quiet", "--trust-remote-code"], capsys)
    assert code == 0, err
    assert 1.0 < json.loads(stdout)["perplexity"] < float("inf")

    code, _, err = run_main(["serve", str(out), "--engine", "transformers"], capsys)
    assert code == 2 and "ships its own model code" in one_error_line(err)
    srv = Server(out, "--engine", "transformers", "--trust-remote-code")
    try:
        body = srv.wait_checked()
        assert body["ready"] and body["check"]["status"] == "passed", srv.log()[-2000:]
        reply = srv.post("/v1/completions", {"prompt": "Good morrow", "max_tokens": 2})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    finally:
        srv.stop()
