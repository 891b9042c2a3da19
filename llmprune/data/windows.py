"""Token windows: N random calibration windows of L tokens (seeded) and non-overlapping eval windows."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmprune.data.sources import Corpus
from llmprune.errors import LLMPruneError

HELD_OUT_FRACTION = 0.1
log = logging.getLogger(__name__)


@dataclass
class Windows:
    """A [N, L] tensor of token ids plus where they came from."""

    ids: torch.Tensor
    source: str
    seed: int | None = None
    description: dict = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.ids.shape[1])

    def fingerprint(self) -> str:
        """sha256 of the token ids: identical windows give identical fingerprints."""
        return hashlib.sha256(self.ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "count": self.count,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "sha256": self.fingerprint(),
            **self.description,
        }


class TokenizedCorpus:
    """A corpus with its token stream computed once (the documents joined by blank lines)."""

    def __init__(self, corpus: Corpus, tokenizer) -> None:
        self.corpus = corpus
        self.tokenizer = tokenizer
        self._tokens: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            self._tokens = _encode(self.tokenizer, "\n\n".join(self.corpus.documents))
        return self._tokens

    def split_point(self) -> int:
        """First held-out token of a local corpus (its last 10% are kept for evaluation)."""
        return int(len(self.tokens) * (1 - HELD_OUT_FRACTION))


# One tokenizer call holds ~160 bytes per character (1.3 GiB for Shakespeare's plays at once); pieces bound it.
ENCODE_PIECE_CHARS = 1 << 18


def _encode(tokenizer, text: str, piece_chars: int = ENCODE_PIECE_CHARS) -> torch.Tensor:
    """The token ids of `text` with the tokenizer's special tokens, in bounded memory.

    A long text is tokenized in overlapping pieces and stitched at a character where both pieces
    start a token, far from either piece's edge, so the ids equal those of one call on the whole
    text (tests/test_data.py checks this) while the tokenizer's working memory stays that of a piece.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than model max length"
    try:
        ids = encode_pieces(tokenizer, text, piece_chars) if len(text) > 2 * piece_chars else None
        if ids is None:
            if len(text) > 2 * piece_chars:
                log.info("tokenizing %d characters in one call (no stitchable pieces with this tokenizer)", len(text))
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][0]
    finally:
        hf_logging.set_verbosity(verbosity)
    return ids.to(torch.int64)


def encode_pieces(tokenizer, text: str, piece_chars: int) -> torch.Tensor | None:
    """Piecewise ids (see `_encode`); None where the tokenizer gives no offsets or no shared boundary is found."""
    overlap = piece_chars // 8
    prefix, suffix = _special_tokens(tokenizer)
    kept: list[torch.Tensor] = [torch.tensor(prefix, dtype=torch.int64)]
    cut, piece = 0, None  # the first character whose tokens are still to be kept; the previous piece's tokens
    for start in range(0, len(text), piece_chars - overlap):
        try:
            enc = tokenizer(text[start : start + piece_chars], add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets
            return None
        current = (enc["input_ids"], [a + start for a, _ in enc["offset_mapping"]], _boundaries(enc, start))
        if piece is not None:  # stitch the previous piece to this one in the middle of their overlap
            middle = [c for c in piece[2] & current[2] if start + overlap // 4 <= c <= start + 3 * overlap // 4]
            if not middle:
                return None
            boundary = min(middle, key=lambda c: abs(c - start - overlap // 2))
            kept.append(torch.tensor([i for i, a in zip(*piece[:2]) if cut <= a < boundary], dtype=torch.int64))
            cut = boundary
        piece = current
        if start + piece_chars >= len(text):
            break
    kept.append(torch.tensor([i for i, a in zip(*piece[:2]) if a >= cut], dtype=torch.int64))
    kept.append(torch.tensor(suffix, dtype=torch.int64))
    return torch.cat(kept)


def _boundaries(encoding, start: int) -> set[int]:
    """Characters (of the whole text) where a token starts and no earlier token reaches past it."""
    found, reach = set(), -1
    for a, b in encoding["offset_mapping"]:
        if a >= reach:
            found.add(a + start)
        reach = max(reach, b)
    return found


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BOS, EOS...), found on a probe text."""
    probe = "Hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    raise LLMPruneError("the tokenizer's special tokens could not be told apart from the text's")


def is_token_file(spec: str) -> bool:
    """A pre-tokenized calibration set: a .safetensors file holding an int tensor `input_ids` [N, L]."""
    return spec.lower().endswith(".safetensors")


def windows_from_file(path: Path) -> Windows:
    """Exact calibration windows from a token file (as written by scripts/bench_peer.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ids = load_file(str(path)).get("input_ids")
    except (SafetensorError, OSError) as exc:
        raise LLMPruneError(f"cannot read token file {path}: {exc}") from exc
    if ids is None or ids.dim() != 2 or ids.is_floating_point() or ids.numel() == 0:
        raise LLMPruneError(f"token file {path} needs an integer tensor `input_ids` of shape [windows, tokens]")
    return Windows(ids.to(torch.int64), str(path), None, {"token_file": True})


def calibration_windows(source: TokenizedCorpus, samples: int, seqlen: int, seed: int) -> Windows:
    """Draw `samples` windows of `seqlen` tokens, deterministically from `seed`."""
    if samples < 1:
        raise LLMPruneError(f"--samples must be at least 1 (got {samples})")
    if seqlen < 2:
        raise LLMPruneError(f"--seqlen must be at least 2 (got {seqlen})")
    generator = torch.Generator().manual_seed(seed)
    corpus = source.corpus
    if corpus.sample_documents:
        return _document_windows(source, samples, seqlen, seed, generator)
    tokens = source.tokens[: source.split_point()] if corpus.local else source.tokens
    if len(tokens) < seqlen:
        raise LLMPruneError(
            f"calibration source {corpus.name} has {len(tokens)} tokens for calibration, fewer than --seqlen {seqlen}"
        )
    starts = torch.randint(0, len(tokens) - seqlen + 1, (samples,), generator=generator)
    ids = torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])
    held_out = "last 10% of tokens held out for evaluation" if corpus.local else None
    return Windows(ids, corpus.name, seed, {"corpus_tokens": len(source.tokens), "held_out": held_out})


def _document_windows(source: TokenizedCorpus, samples: int, seqlen: int, seed: int, generator) -> Windows:
    """C4 style (as in the SparseGPT reference): a random window of a random document longer than seqlen."""
    docs = source.corpus.documents
    rows: list[torch.Tensor] = []
    attempts = 0
    while len(rows) < samples:
        attempts += 1
        if attempts > 100 * samples:
            raise LLMPruneError(f"{source.corpus.name}: too few documents longer than --seqlen {seqlen}")
        doc = docs[int(torch.randint(0, len(docs), (1,), generator=generator))]
        ids = _encode(source.tokenizer, doc)
        if len(ids) <= seqlen:
            continue
        start = int(torch.randint(0, len(ids) - seqlen, (1,), generator=generator))
        rows.append(ids[start : start + seqlen])
    return Windows(torch.stack(rows), source.corpus.name, seed, {"documents": len(docs)})


def evaluation_windows(
    source: TokenizedCorpus, seqlen: int, max_windows: int | None = None, spec: str | None = None, split: str = "test"
) -> Windows:
    """Non-overlapping windows over the eval tokens (the held-out 10% for a local corpus).

    `spec`/`split` (what the user typed, and the dataset split) are recorded so that the same
    windows can be rebuilt later, e.g. by the serving perplexity check (`rebuild_eval_windows`).
    """
    tokens = source.tokens[source.split_point() :] if source.corpus.local else source.tokens
    count = len(tokens) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise LLMPruneError(
            f"evaluation source {source.corpus.name} has {len(tokens)} tokens, fewer than one window of {seqlen}"
        )
    ids = tokens[: count * seqlen].view(count, seqlen)
    part = "held-out last 10%" if source.corpus.local else "all"
    description = {"tokens_used": part, "spec": spec or source.corpus.name, "split": split}
    return Windows(ids.clone(), source.corpus.name, None, description)


def rebuild_eval_windows(description: dict, tokenizer) -> Windows:
    """The eval windows a report describes (source spec, split, count, seqlen), checked by sha256."""
    from llmprune.data.sources import resolve_source

    source = TokenizedCorpus(resolve_source(description["spec"], split=description.get("split", "test")), tokenizer)
    windows = evaluation_windows(
        source, description["seqlen"], description["count"], description["spec"], description.get("split", "test")
    )
    if description.get("sha256") and windows.fingerprint() != description["sha256"]:
        raise LLMPruneError(f"eval source {description['spec']} no longer gives the recorded windows (sha256 differs)")
    return windows
