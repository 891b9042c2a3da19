"""Shared by the benchmark scripts: the machine they ran on, and writing their table into BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """CPU model, core count and Python version (plus the GPU, if torch sees one)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{platform.machine()} {model}, {os.cpu_count()} cores, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return text


def measure_llmprune(argv: list[str], folder: Path, result: Path, log: Path) -> tuple[int, dict, dict]:
    """Run `llmprune ARGV --output FOLDER --no-eval --overwrite` under measure_process.py, its output to LOG.

    Returns the exit code, the measured process (wall time, peak RSS) and the run's llmprune.json
    report; both dicts are empty when the run failed.
    """
    cmd = [sys.executable, str(HERE / "measure_process.py"), "--out", str(result), "--",
           sys.executable, "-m", "llmprune", *argv, "--no-eval", "--overwrite", "--output", str(folder)]  # fmt: skip
    with log.open("w") as handle:
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return code, {}, {}
    return 0, json.loads(result.read_text()), json.loads((folder / "llmprune.json").read_text())


def load_float32_model(name: str):
    """A causal LM that llmprune accepts (alias, folder, GGUF), loaded whole in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmprune.models.resolve import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(name, quiet=True), dtype=torch.float32)


def layer_forward(layer, x, rope: tuple, positions, autocast: bool = False) -> None:
    """One decoder layer on one chunk, as llmprune's stream calls it (causal, no mask tensor);
    under bfloat16 autocast when asked."""
    import torch

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x, position_embeddings=rope, attention_mask=None, position_ids=positions)


def update_section(path: Path, table: str, name: str) -> None:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` (appending it if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{table}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def add_window_args(parser) -> None:
    """The flags that pick the model, the corpus and the calibration and held-out window sizes."""
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--corpus", default="shakespeare")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=64)


def model_and_corpus(args) -> tuple:
    """From add_window_args' flags: the model folder, its tokenized corpus and the held-out windows."""
    from llmprune.data.sources import resolve_source
    from llmprune.data.windows import TokenizedCorpus, evaluation_windows
    from llmprune.models.resolve import resolve_model
    from llmprune.pipeline import load_tokenizer

    folder = resolve_model(args.model, quiet=True)
    corpus = TokenizedCorpus(resolve_source(args.corpus), load_tokenizer(folder))
    return folder, corpus, evaluation_windows(corpus, args.seqlen, args.eval_samples, spec=args.corpus)
