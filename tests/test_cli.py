"""The command line: bad input gets one clear line and a non-zero exit, and nothing is left behind; the
summary, the eval subcommand and the real process's exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from tests.helpers.cli import leftovers as _leftovers
from tests.helpers.cli import run_main as _run


def _bad_cases(model, corpus_file, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model, corrupt)
    shard = corrupt / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    unreadable = tmp_path / "unreadable"
    shutil.copytree(model, unreadable)
    (unreadable / "model.safetensors").unlink()
    (unreadable / "model.safetensors").mkdir()  # root reads any file: a folder is what cannot be read
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(model / "tokenizer.json", sharded)
    sorted(sharded.glob("model-*.safetensors"))[-1].unlink()
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad utf8 \x81")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    base = ["--calibration", corpus_file, "--samples", 2, "--seqlen", 16, "--no-eval"]
    return {
        "sparsity": ([model, "--sparsity", 1.2, *base], "[0, 1)"),
        "negative sparsity": ([model, "--sparsity", -0.5, *base], "[0, 1)"),
        "n:m width": ([model, "--pattern", "2:7", *base], "does not divide the input width"),
        "bad pattern": ([model, "--pattern", "half", *base], "N:M"),
        "corrupt shard": ([corrupt, *base], "corrupt shard model.safetensors"),
        "truncated shard": ([corrupt, *base], "truncated: tensor"),
        "unreadable shard": ([unreadable, *base], "cannot read shard"),
        "missing shard": ([sharded, *base], "missing shard"),
        "unknown method": ([model, "--method", "obs", *base], "unknown --method 'obs'"),
        "unreadable calibration": ([model, "--calibration", binary, "--no-eval"], "cannot read calibration file"),
        "missing calibration": ([model, "--calibration", tmp_path / "nope.txt", "--no-eval"], "does not exist"),
        "empty calibration folder": ([model, "--calibration", empty_dir, "--no-eval"], "no .txt, .md or .jsonl"),
        "missing model": ([tmp_path / "no-such-model", *base], "cannot find model"),
        "bad int": ([model, "--samples", "many", *base[:1]], "invalid int value"),
        "bad forward dtype": ([model, "--forward-dtype", "fp8", *base], "--forward-dtype must be one of"),
        "float16 forward on cpu": ([model, "--forward-dtype", "float16", "--device", "cpu", *base], "needs a GPU"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "sparsity",
        "negative sparsity",
        "n:m width",
        "bad pattern",
        "corrupt shard",
        "truncated shard",
        "unreadable shard",
        "missing shard",
        "unknown method",
        "unreadable calibration",
        "missing calibration",
        "empty calibration folder",
        "missing model",
        "bad int",
        "bad forward dtype",
        "float16 forward on cpu",
    ],
)
def test_bad_input_one_line_error_and_no_output(case, model, corpus_file, tmp_path, capsys):
    argv, message = _bad_cases(model, corpus_file, tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, stderr = _run([*argv, "--output", out], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), stderr
    assert message in lines[0]
    assert not out.exists() and _leftovers(tmp_path, "out") == []


def test_log_lines_and_bars_on_stderr_summary_or_json_on_stdout(model, corpus_file, tmp_path, capsys):
    """stdout holds only the summary (or, with --json, only the JSON); log lines and progress bars go to
    stderr, with --json too unless --quiet."""
    argv = [model, "--method", "wanda", "--calibration", corpus_file, "--samples", 4, "--seqlen", 32,
            "--eval-samples", 4, "--output", tmp_path / "out", "--overwrite"]  # fmt: skip
    code, stdout, stderr = _run(argv, capsys)
    assert code == 0 and "perplexity       dense" in stdout
    assert not any(line.startswith("llmprune: ") for line in stdout.splitlines())
    assert "llmprune: dense perplexity" in stderr and "memory plan for cpu" in stderr and "wanda unstructured" in stderr
    code, stdout, stderr = _run([*argv, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["method"] == "wanda"
    assert "llmprune: dense perplexity" in stderr and "pruned ppl" in stderr
    code, stdout, stderr = _run([*argv, "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(stdout)["quality_gate"] == "passed" and stderr == ""


def test_summary_and_eval_subcommand(model, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(
        [
            model,
            "--method",
            "wanda",
            "--calibration",
            corpus_file,
            "--samples",
            4,
            "--seqlen",
            32,
            "--eval-samples",
            4,
            "--output",
            out,
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and stdout == ""
    code, stdout, _ = _run(
        [
            model,
            "--method",
            "wanda",
            "--calibration",
            corpus_file,
            "--samples",
            4,
            "--seqlen",
            32,
            "--eval-samples",
            4,
            "--output",
            out,
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0
    assert "perplexity       dense" in stdout and "achieved sparsity 0.5000" in stdout and "peak memory" in stdout
    code, stdout, _ = _run(["eval", out, "--dataset", corpus_file, "--seqlen", 32, "--samples", 4, "--json"], capsys)
    assert code == 0
    result = json.loads(stdout)
    report = json.loads((out / "llmprune.json").read_text())
    assert result["windows"] == 4
    assert result["perplexity"] > 1
    # a local corpus is evaluated on its held-out last 10%: the same windows the prune run used
    assert result["eval"]["sha256"] == report["perplexity"]["eval"]["sha256"]
    assert result["perplexity"] == pytest.approx(report["perplexity"]["pruned"], rel=1e-9)


def test_real_process_exit_code(model, tmp_path):
    """The installed entry point itself: exit status 2 and one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune", str(model), "--sparsity", "2", "--no-eval", "--output", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["llmprune: error: --sparsity must be in [0, 1) (got 2.0)"]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["MODEL", "--sparsity", "2"], ["eval", "--help"]],
    ids=["help", "bad-flag", "eval-help"],
)
def test_help_and_flag_errors_answer_before_transformers_is_imported(argv):
    """The flags (every method's included) are parsed with torch alone: transformers, which takes most of a
    run's start-up, is imported when a model is read, so `--help` and a bad flag answer without it."""
    script = (
        "import sys\nfrom llmprune.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as exc:\n"
        "    code = exc.code\nprint(code, 'transformers' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    code, imported = proc.stderr.strip().splitlines()[-1].split()
    assert (code, imported) == ("0" if "--help" in argv else "2", "False"), proc.stderr[-2000:]
