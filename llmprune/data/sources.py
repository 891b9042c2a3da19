"""Text sources for calibration and evaluation: Hub datasets (c4, wikitext2, any id) and local files.

A source resolves to a `Corpus`: its documents, a stable description, and whether it is local
(local corpora hold out their last 10% of tokens for evaluation).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.models import assets

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass
class Corpus:
    """Documents of one source; `local` corpora split 90/10 into calibration and evaluation tokens."""

    name: str
    documents: list[str]
    local: bool
    sample_documents: bool = False  # draw each window from one random long document (C4 style)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"cannot read calibration file {path}: {exc}") from exc


def _read_jsonl(path: Path) -> list[str]:
    docs: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LLMPruneError(f"cannot read calibration file {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LLMPruneError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LLMPruneError(f'{path}:{number}: each JSONL line needs a string field "text"')
        docs.append(record["text"])
    return docs


def local_corpus(path: Path) -> Corpus:
    """A .txt/.md file, a .jsonl file with a `text` field, or a folder of such files (recursive, sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise LLMPruneError(f"folder {path} has no .txt, .md or .jsonl files")
        docs: list[str] = []
        for file in files:
            docs.extend(_read_jsonl(file) if file.suffix.lower() == ".jsonl" else [_read_text(file)])
    elif path.suffix.lower() == ".jsonl":
        docs = _read_jsonl(path)
    elif path.suffix.lower() in TEXT_SUFFIXES or path.suffix == "":
        docs = [_read_text(path)]
    else:
        raise LLMPruneError(f"unsupported calibration file {path}: use .txt, .md, .jsonl or a folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LLMPruneError(f"calibration source {path} holds no text")
    return Corpus(str(path), docs, local=True)


def _hub_dataset(name: str, split: str) -> Corpus:
    """c4, wikitext2, or `ORG/NAME[:SPLIT]` with a `text` column, through `datasets`."""
    try:
        import datasets
    except ImportError as exc:
        raise LLMPruneError("Hub calibration data needs the `datasets` package (pip install datasets)") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")
    hint = "; use a local .txt/.md/.jsonl file or folder instead (e.g. --calibration corpus.txt)"
    try:
        if name == "c4":
            shard = (
                "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
            )
            data = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
            return Corpus("c4", list(data["text"]), local=False, sample_documents=True)
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return Corpus(f"wikitext2:{split}", list(data["text"]), local=False)
        repo, _, repo_split = name.partition(":")
        data = datasets.load_dataset(repo, split=repo_split or split)
        if "text" not in data.column_names:
            raise LLMPruneError(f"dataset {repo} has no `text` column (columns: {', '.join(data.column_names)})")
        return Corpus(name, [t for t in data["text"] if t], local=False)
    except LLMPruneError:
        raise
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
        why = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)" if offline else str(exc).splitlines()[0][:160]
        raise LLMPruneError(f"cannot load dataset {name!r} from the Hub: {why}{hint}") from exc


def resolve_source(spec: str, split: str = "train") -> Corpus:
    """Resolve a --calibration / --eval value to a Corpus."""
    path = Path(spec).expanduser()
    if path.exists():
        return local_corpus(path)
    embedded = assets.embedded_corpus(spec)
    if embedded is not None:
        corpus = local_corpus(embedded)
        corpus.name = spec.lower()
        return corpus
    if spec.lower() in assets.EMBEDDED_CORPORA:
        raise LLMPruneError(f"corpus {spec!r} is not installed: {assets.EMBEDDED_CORPORA[spec.lower()][2]}")
    if spec in ("c4", "wikitext2") or (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        return _hub_dataset(spec, split)
    if any(sep in spec for sep in ("/", "\\")) or Path(spec).suffix:
        raise LLMPruneError(f"calibration file {spec} does not exist")
    raise LLMPruneError(f"unknown calibration source {spec!r}: use c4, wikitext2, a Hub dataset id, or a local path")
