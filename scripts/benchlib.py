"""Shared by the benchmark scripts: their argument parser and the machine they ran on; one launcher that
runs and measures a whole process (wall time, peak RSS: run_measured, and measure_llmprune for an llmprune
run) and one measurement inside a process (measure_here); one builder of random-weight models
(random_model, on scripts/shape_checkpoint.py's shapes); the calibration and held-out windows the peer and
order benchmarks share; and writing their tables into BENCHMARKS.md.

Importing it puts the repository root on sys.path, so a script can import a reference implementation kept
with the tests (`from tests.helpers.reference_sparsegpt import reference_prune`); nothing else in tests/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # after scripts/ itself: `from tests.helpers.reference_sparsegpt import ...`
    sys.path.insert(1, str(ROOT))


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's argument parser, its docstring (usage lines included) as the description."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


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


@dataclass
class Measured:
    """One whole process as scripts/measure_process.py saw it, and what it printed."""

    returncode: int
    seconds: float  # wall time
    peak_rss_bytes: int  # its own peak RSS (getrusage of the launcher's child)
    stdout: str = ""  # when captured
    stderr: str = ""
    log: Path | None = None  # its stdout and stderr together, when it wrote them to a log

    def tail(self, chars: int = 2000) -> str:
        """The end of what it printed: its log, else its captured stderr."""
        text = self.log.read_text(errors="replace") if self.log else self.stderr
        return text[-chars:]


def run_measured(
    cmd: Sequence, env: dict | None = None, log: Path | None = None, capture: bool = True, check: str | None = None
) -> Measured:
    """Run CMD as a whole process under scripts/measure_process.py and measure its wall time and peak RSS.

    The small launcher is the parent, so the child's ru_maxrss is its own (a Linux child starts at its
    parent's resident size, and a script holding torch would inflate it). Its stdout and stderr go to LOG
    when given (the measurement beside it, as LOG with the suffix .json), else are captured (`capture`) or
    left on this terminal. With CHECK (what the run is, for the message), a failed run ends this script
    with the end of its output.
    """
    cmd = [str(part) for part in cmd]
    with tempfile.TemporaryDirectory() as scratch:
        result = log.with_suffix(".json") if log else Path(scratch) / "measured.json"
        result.unlink(missing_ok=True)
        launcher = [sys.executable, str(HERE / "measure_process.py"), "--out", str(result), "--", *cmd]
        started = time.perf_counter()
        with open(log, "w") if log else contextlib.nullcontext() as handle:
            output = dict(stdout=handle, stderr=subprocess.STDOUT) if log else dict(capture_output=capture)
            proc = subprocess.run(launcher, env=env, text=True, **output)
        wall = time.perf_counter() - started
        measured = json.loads(result.read_text()) if result.exists() else {}  # none if the launcher failed
    run = Measured(
        measured.get("returncode", proc.returncode),
        measured.get("wall_seconds", wall),
        measured.get("peak_rss_bytes", 0),
        proc.stdout or "",
        proc.stderr or "",
        log,
    )
    if check and run.returncode != 0:
        sys.exit(f"{check} failed (exit {run.returncode}){f'; see {log}' if log else ''}:\n{run.tail()}")
    return run


def flags(**values) -> list[str]:
    """Command-line flags from keyword arguments: flags(samples=128, eval_samples=4) is
    ["--samples", "128", "--eval-samples", "4"]."""
    return [part for name, value in values.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def measure_llmprune(
    argv: list, folder: Path, log: Path | None = None, evaluate: bool = False, check: str | None = None
) -> tuple[Measured, dict]:
    """Run `llmprune MODEL --overwrite --output FOLDER ... ARGV's flags` as a measured process (run_measured,
    ARGV[0] the model; ARGV's flags come last, so they win), without evaluating (--no-eval) unless EVALUATE
    (then with --json --max-ppl-increase inf: the summary on its stdout, no perplexity gate).

    Returns the measurement and the run's llmprune.json report ({} when the run failed).
    """
    fixed = ["--json", "--max-ppl-increase", "inf"] if evaluate else ["--no-eval"]
    cmd = [sys.executable, "-m", "llmprune", argv[0], *fixed, "--overwrite", "--output", folder, *argv[1:]]
    run = run_measured(cmd, log=log, check=check)
    report = json.loads((Path(folder) / "llmprune.json").read_text()) if run.returncode == 0 else {}
    return run, report


@contextlib.contextmanager
def measure_here() -> Iterator[dict]:
    """Wall time and the peak RSS that a block adds, measured inside this process: the heap trimmed, the
    kernel's peak (VmHWM) reset through /proc/self/clear_refs, then the peak over the block less the
    resident size at its start. Yields a dict that gets `seconds` and `peak_bytes` when the block ends."""
    from llmprune.engine.devices import current_rss, peak_rss, trim_heap

    trim_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = current_rss()
    measured: dict = {}
    started = time.perf_counter()
    yield measured
    measured["seconds"] = time.perf_counter() - started
    measured["peak_bytes"] = peak_rss() - base


def random_model(
    folder: Path, shape: str | dict, tokenizer: Path, device: str = "cpu", shard_bytes: int | None = None, **fields
) -> Path:
    """A causal LM with random weights, written once (a FOLDER that has a config.json is taken as it is).

    SHAPE: a name in scripts/shape_checkpoint.py's SHAPES, or config fields in its form (`model_type`,
    `dtype`, the config's keyword arguments); FIELDS add to them or override them; without a `vocab_size`
    the tokenizer's size. The weights are as transformers initializes them (normal with the config's
    initializer_range for matrices and embeddings, ones for norm weights, zeros for biases), drawn with a
    seeded generator on DEVICE and stored in the shape's dtype, in shards of at most SHARD_BYTES (by default
    one per decoder layer), beside TOKENIZER's files (a folder).
    """
    if (folder / "config.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from shape_checkpoint import SHAPES, model_config, plan_shards, tensor_shapes, write_index
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    config = model_config({"vocab_size": len(tok), **(SHAPES[shape] if isinstance(shape, str) else shape), **fields})
    dtype = config.dtype
    std = getattr(config.get_text_config(), "initializer_range", 0.02)
    gen = torch.Generator(device).manual_seed(0)

    def draw(name: str, size: tuple[int, ...]) -> torch.Tensor:
        if name.endswith(".bias"):
            return torch.zeros(size, dtype=dtype)
        if len(size) == 1:
            return torch.ones(size, dtype=dtype)
        return (torch.randn(size, generator=gen, device=device) * std).to(dtype).cpu()

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map, total = {}, 0
    for file, shard in plan_shards(tensor_shapes(config), dtype, shard_bytes).items():
        save_file({name: draw(name, size) for name, size in shard.items()}, str(partial / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(dtype.itemsize * torch.Size(size).numel() for size in shard.values())
    write_index(partial, weight_map, total)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]  # vLLM picks its model by this
    config.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(folder)
    return folder


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


def publish_table(table: str, section: str, out: Path | None = None, write: str | None = None) -> None:
    """Print TABLE; keep it as OUT/SECTION.md when OUT is given; put it into the Markdown file WRITE's
    SECTION when that is given."""
    print(table, flush=True)
    if out is not None:
        (out / f"{section}.md").write_text(table + "\n")
    if write:
        update_section(Path(write), table, section)


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
    from llmprune.models.text import load_tokenizer

    folder = resolve_model(args.model, quiet=True)
    corpus = TokenizedCorpus(resolve_source(args.corpus), load_tokenizer(folder))
    return folder, corpus, evaluation_windows(corpus, args.seqlen, args.eval_samples, spec=args.corpus)


def prune_on_windows(
    model: Path, windows: Path, method: str, pattern: str, output: Path, log: Path, extra: Sequence[str] = ()
) -> Measured:
    """`llmprune MODEL --method M --pattern P --calibration WINDOWS --quiet EXTRA`, pruning only (the caller
    evaluates), as a measured process (measure_llmprune) that ends this script if it fails."""
    argv = [model, *flags(method=method, pattern=pattern, calibration=windows), "--quiet", *extra]
    return measure_llmprune(argv, output, log=log, check=log.stem)[0]


def held_out_perplexity(folder: Path, windows) -> float:
    """llmprune's streamed perplexity of a model folder on model_and_corpus' held-out windows (CPU, chunks of 8)."""
    import torch

    from llmprune.eval.perplexity import perplexity

    return perplexity(folder, windows, torch.device("cpu"), 8).perplexity


def calibration_file(corpus, args, seed: int, path: Path) -> Path:
    """The calibration windows of add_window_args' sizes drawn with SEED, saved as a token file llmprune
    (`--calibration PATH`) and llm-compressor read alike."""
    from safetensors.torch import save_file

    from llmprune.data.windows import calibration_windows

    ids = calibration_windows(corpus, args.samples, args.seqlen, seed).ids
    save_file({"input_ids": ids.contiguous()}, str(path))
    return path
