"""The run report, `llmprune.json`: its name, format version, typed sections, reading and writing.

A run assembles one `Report` and writes it once, atomically, at the end (just before the output folder
is renamed into place). Every reader (the model card, pack/unpack, push, serve's start-up check) reads
it through `read_report`; the only later change is `update_report` (pack/unpack set the "packed" block).
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmprune.errors import LLMPruneError
from llmprune.version import __version__

REPORT_NAME = "llmprune.json"
FORMAT_VERSION = 1


@dataclass
class PerplexitySection:
    """Dense and pruned perplexity on the same eval windows (either may be missing)."""

    eval: dict
    dense: dict | None = None  # Perplexity.as_dict()
    pruned: dict | None = None

    def as_dict(self) -> dict:
        dense = self.dense["perplexity"] if self.dense else None
        pruned = self.pruned["perplexity"] if self.pruned else None
        return {
            "eval": self.eval,
            "dense": dense,
            "pruned": pruned,
            "increase": (pruned / dense - 1) if dense and pruned else None,
            "dense_detail": self.dense,
            "pruned_detail": self.pruned,
        }


@dataclass
class PeakMemory:
    """Peak resident memory of the run, peak CUDA memory, and what the interpreter held before any work."""

    rss_bytes: int
    cuda_bytes: int
    overhead_bytes: int
    ranks: list[dict] | None = None  # a torchrun run: each rank's {"rank", "rss_bytes", "cuda_bytes"}

    def as_dict(self) -> dict:
        peaks = {"rss_bytes": self.rss_bytes, "cuda_bytes": self.cuda_bytes, "overhead_bytes": self.overhead_bytes}
        return {**peaks, "ranks": self.ranks} if self.ranks else peaks


@dataclass
class Report:
    """What a prune run did and measured. `sections` holds the body's own sections (the unstructured
    engine's order, targets and memory plan; the structured counts), in the order they are written."""

    model: str
    source_folder: str
    method: str
    pattern: str
    sparsity: float
    achieved_sparsity: float
    options: dict[str, Any]
    sections: dict[str, Any]
    calibration: dict
    dtype: str
    device: str
    layers: list[dict]
    timings: dict[str, float]
    perplexity: PerplexitySection | None
    peak_memory: PeakMemory
    command: str
    base_model: str | None
    save_format: str
    quality_gate: dict
    damping_retries: int | None = None  # methods that damp a factorization (SparseGPT) count their retries
    tasks: dict | None = None  # --eval-tasks: lm-eval accuracy of dense and pruned
    license: dict | None = None  # the source model's licence (license, license_name, license_link), carried over
    packed: dict | None = None
    versions: dict = field(default_factory=lambda: versions())

    def as_dict(self) -> dict:
        data = {
            "format_version": FORMAT_VERSION,
            "llmprune_version": __version__,
            "model": self.model,
            "source_folder": self.source_folder,
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "options": self.options,
            **self.sections,
            "calibration": self.calibration,
            "dtype": self.dtype,
            "device": self.device,
        }
        if self.damping_retries is not None:
            data["damping_retries"] = self.damping_retries
        data.update(
            {
                "layers": self.layers,
                "versions": self.versions,
                "timings": self.timings,
                "perplexity": self.perplexity.as_dict() if self.perplexity else None,
                **({"tasks": self.tasks} if self.tasks is not None else {}),
                "peak_memory": self.peak_memory.as_dict(),
                "command": self.command,
                "base_model": self.base_model,
                **({"license": self.license} if self.license else {}),
                "save_format": self.save_format,
                "quality_gate": self.quality_gate,
            }
        )
        if self.packed is not None:
            data["packed"] = self.packed
        return data


def versions() -> dict:
    """Versions of what produced a report."""
    import torch
    import transformers

    return {
        "llmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def report_path(folder: Path) -> Path:
    return Path(folder) / REPORT_NAME


def read_report(folder: Path) -> dict | None:
    """The report of a model folder, or None when it has none (a plain model); one-line error if unreadable."""
    path = report_path(folder)
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LLMPruneError(f"cannot read {path}: {exc}") from exc
    if not isinstance(report, dict):
        raise LLMPruneError(f"cannot read {path}: not a JSON object")
    version = report.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LLMPruneError(f"{path} has format_version {version}; this llmprune reads up to {FORMAT_VERSION}")
    return report


def write_report(folder: Path, report: dict) -> None:
    """Write the report atomically (temporary file, fsync, rename)."""
    path = report_path(folder)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        handle.write(json.dumps(report, indent=2, default=str) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def update_report(folder: Path, **changes: Any) -> tuple[dict, dict]:
    """Set (a value) or remove (None) top-level keys of a folder's report; returns (before, after). A folder
    without a report gets one only if a change sets something."""
    before = read_report(folder) or {}
    after = dict(before)
    for key, value in changes.items():
        if value is None:
            after.pop(key, None)
        else:
            after[key] = value
    if after:
        write_report(folder, after)
    elif report_path(folder).is_file():
        report_path(folder).unlink()
    return before, after
