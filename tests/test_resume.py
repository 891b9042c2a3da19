"""Resume: a run killed with SIGKILL at a random point continues to a bit-identical result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

import llmprune
from llmprune.errors import LLMPruneError
from tests.helpers.cli import run_main


def _args(model, corpus, output, *extra) -> list[str]:
    """The arguments of `llmprune` for the runs below."""
    return [
        str(model),
        "--method",
        "sparsegpt",
        "--calibration",
        str(corpus),
        "--samples",
        "48",
        "--seqlen",
        "128",
        "--batch-size",
        "8",
        "--no-eval",
        "--quiet",
        "--output",
        str(output),
        *map(str, extra),
    ]


def _command(model, corpus, output, *extra) -> list[str]:
    return [sys.executable, "-m", "llmprune", *_args(model, corpus, output, *extra)]


def _tensor_bytes(folder) -> dict[str, bytes]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                out[key] = tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
    return out


def _kill_at_layer(cmd: list[str], state_file, layer: int, extra_delay: float) -> int:
    """Start cmd; SIGKILL it once its state says `layer` layers are committed (plus a delay: mid-layer)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state_file.read_text())["next_layer"] >= layer:
                break
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    time.sleep(extra_delay)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(state_file.read_text())["next_layer"]


@pytest.mark.slow
@pytest.mark.parametrize("activations,quantize", [("memory", None), ("disk", "w4a16")], ids=["memory", "disk-w4a16"])
def test_sigkill_then_resume_is_bit_identical(tiny_models, corpus_file, tmp_path, activations, quantize, capsys):
    """Activations in memory, and on disk with a quantized run (its layer units hold codes and scales): the
    resumed run writes the same bytes.
    Only the killed run is a process of its own; the reference and the resumed run are the same command
    run in this process (llmprune.cli.main)."""
    model = tiny_models("llama", layers=10, hidden=384, inter=1024, vocab=512)
    reference, output = tmp_path / "reference", tmp_path / "out"
    flags = ["--activations", activations, *(["--quantize", quantize] if quantize else [])]
    code, _, err = run_main(_args(model, corpus_file, reference, *flags), capsys)
    assert code == 0, err

    rng = random.Random(f"resume-{activations}")
    state_file = tmp_path / ".out.partial" / ".work" / "state.json"
    committed = _kill_at_layer(
        _command(model, corpus_file, output, *flags),
        state_file,
        layer=rng.randint(1, 7),
        extra_delay=rng.uniform(0.0, 0.2),
    )
    assert 1 <= committed < 10 and not output.exists()

    code, _, err = run_main(_args(model, corpus_file, output, *flags, "--seed", 7), capsys)
    assert code == 2 and "unfinished run with different settings (calibration differ)" in err

    code, _, err = run_main(_args(model, corpus_file, output, *flags), capsys)
    assert code == 0, err
    expected, got = _tensor_bytes(reference), _tensor_bytes(output)
    assert got.keys() == expected.keys()
    assert all(got[key] == expected[key] for key in expected)
    for shard in reference.glob("*.safetensors"):
        assert (output / shard.name).read_bytes() == shard.read_bytes()
    report = json.loads((output / "llmprune.json").read_text())
    assert [layer["index"] for layer in report["layers"]] == list(range(10))


def test_resume_flag_without_unfinished_run(tiny_models, corpus_file, tmp_path):
    with pytest.raises(LLMPruneError, match="no unfinished run to resume"):
        llmprune.prune(
            str(tiny_models("llama")),
            calibration=str(corpus_file),
            samples=2,
            seqlen=16,
            no_eval=True,
            resume=True,
            output=str(tmp_path / "out"),
            quiet=True,
        )


def test_requested_stop_ends_at_a_layer_boundary_and_resumes_identically(tiny_models, corpus_file, tmp_path):
    """A stop requested mid-run (as the service's worker does on SIGTERM) ends the run before its next layer;
    the partial output is a valid resume point and the resumed run writes the bytes of an uninterrupted one."""
    import threading

    from llmprune.stop import StopRequested, clear_stop, request_stop

    model = tiny_models("llama", layers=8, hidden=256, inter=512, vocab=512)
    options = dict(method="sparsegpt", calibration=str(corpus_file), samples=16, seqlen=64, no_eval=True, quiet=True)
    llmprune.prune(str(model), output=str(tmp_path / "reference"), **options)

    state_file = tmp_path / ".out.partial" / ".work" / "state.json"

    def stop_after_two_layers() -> None:
        while True:
            try:
                if json.loads(state_file.read_text())["next_layer"] >= 2:
                    return request_stop()
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.001)

    watcher = threading.Thread(target=stop_after_two_layers, daemon=True)
    watcher.start()
    try:
        with pytest.raises(StopRequested, match=r"stopped as requested before layer \d of 8"):
            llmprune.prune(str(model), output=str(tmp_path / "out"), **options)
    finally:
        clear_stop()
    committed = json.loads(state_file.read_text())["next_layer"]
    assert 2 <= committed < 8 and not (tmp_path / "out").exists()

    llmprune.prune(str(model), output=str(tmp_path / "out"), resume=True, **options)
    for shard in (tmp_path / "reference").glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == shard.read_bytes()
