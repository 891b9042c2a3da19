"""Resumable runs: after each layer the work folder holds a durable state file naming the next
layer, the side (A or B) holding its input activations, the finished layers' reports, and a
fingerprint of everything the result depends on. The same command on the same OUTPUT continues
from there; a different run is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.export.writer import fsync_write
from llmprune.version import __version__

STATE_NAME = "state.json"


def folder_identity(folder: Path) -> str:
    """sha256 of a model folder's config and shard headers (names, dtypes, shapes, offsets)."""
    from llmprune.models.tensorfile import read_header

    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(shard.name.encode())
        digest.update(json.dumps(read_header(shard).raw, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class RunState:
    """Progress of one pruning run, committed after each layer."""

    fingerprint: dict
    choice: dict = field(default_factory=dict)  # the memory plan's knobs, reused on resume
    next_layer: int = 0
    side: str | None = None
    chunk_shapes: list[list[int]] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    dense_perplexity: dict | None = None
    profile: dict | None = None  # a non-uniform sparsity profile's per-layer sparsities, found before layer 0
    prune_seconds: float = 0.0

    @staticmethod
    def side_for(layer: int) -> str:
        """The side a layer writes its outputs to (its inputs are on the other one)."""
        return "acts-a" if layer % 2 == 0 else "acts-b"

    def save(self, work: Path) -> None:
        fsync_write(work / STATE_NAME, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, work: Path) -> RunState | None:
        path = work / STATE_NAME
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise LLMPruneError(f"unreadable run state {path}: {exc}; pass --overwrite to start over") from exc


def make_fingerprint(**parts) -> dict:
    """What the result depends on; JSON-normalized so it compares equal after a round trip."""
    return json.loads(json.dumps({"llmprune": __version__, **parts}, sort_keys=True, default=str))


def check_resumable(saved: RunState, fingerprint: dict, partial: Path) -> None:
    """Refuse to continue a partial run that is not this one."""
    if saved.fingerprint == fingerprint:
        return
    keys = sorted(
        k for k in set(saved.fingerprint) | set(fingerprint) if saved.fingerprint.get(k) != fingerprint.get(k)
    )
    raise LLMPruneError(
        f"{partial} holds an unfinished run with different settings ({', '.join(keys)} differ); "
        "run the same command to resume it, or pass --overwrite to discard it"
    )
