"""The start-up perplexity check: the serving engine's perplexity on a held-out sample, against a reference.

- A pruned folder (llmprune.json with a recorded perplexity): the eval windows of the prune run are rebuilt
  (`rebuild_eval_windows`, checked by sha256) and the engine must land within --ppl-tolerance of the pruned
  perplexity recorded then. A miss means an engine mismatch or weights changed since pruning.
- `--check-text FILE`: non-overlapping windows of FILE; the reference is --expect-ppl, else llmprune's own
  streamed evaluator (float32 on CPU) on the same windows, which catches an engine that computes differently.
- Either way, when llmprune.json records dense and pruned perplexity, the pruned model must also pass the
  quality gate: the `quality_gate` block the prune run recorded, or the gate recomputed at --max-ppl-increase.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.report import REPORT_NAME, read_report
from llmprune_serve.config import ServeConfig
from llmprune_serve.engines.base import Engine

DEFAULT_CHECK_SEQLEN = 512
log = logging.getLogger("llmprune.serve")


@dataclass
class CheckResult:
    """Outcome of the check: status pending, passed, failed or skipped, and why."""

    status: str
    reason: str
    perplexity: float | None = None
    reference: float | None = None
    reference_source: str | None = None
    windows: int = 0
    seqlen: int = 0
    tokens: int = 0
    seconds: float = 0.0
    engine: str | None = None
    dtype: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    """The token windows the check scores, with what they are and what they are compared to."""

    windows: list[list[int]]
    description: str
    reference: float | None
    reference_source: str


def load_report(folder: Path) -> dict | None:
    """The llmprune.json of a pruned folder, or None for a plain model."""
    return read_report(folder)


def recorded_perplexity(report: dict | None) -> dict | None:
    """The report's perplexity block when it has eval windows and a pruned perplexity."""
    block = (report or {}).get("perplexity") or {}
    return block if block.get("eval") and block.get("pruned") else None


def check_mode(config: ServeConfig, report: dict | None) -> str:
    """skip, text or recorded; a plain model with neither --check-text nor --skip-ppl-check is refused."""
    if config.skip_ppl_check:
        return "skip"
    if config.check_text is not None:
        if not config.check_text.exists():
            raise LLMPruneError(f"--check-text {config.check_text}: no such file or folder")
        return "text"
    if config.expect_ppl is not None:
        raise LLMPruneError("--expect-ppl needs --check-text FILE (the text it was measured on)")
    if recorded_perplexity(report) is None:
        raise LLMPruneError(
            f"{config.folder} has no llmprune.json with a recorded perplexity to check against: pass "
            "--check-text FILE (a held-out text; reference: llmprune's evaluator or --expect-ppl) or --skip-ppl-check"
        )
    return "recorded"


def quality_gate(report: dict | None, max_increase: float | None) -> tuple[bool, str] | None:
    """(passed, why) of the pruned-vs-dense gate, or None when the report records no dense and pruned perplexity.

    With --max-ppl-increase the gate is recomputed at that limit; otherwise the `quality_gate` block that
    the prune run wrote is used (computed at the default limit for reports that predate it).
    """
    from llmprune.export.gate import gate_of
    from llmprune.export.gate import quality_gate as gate_at

    gate = gate_at((report or {}).get("perplexity"), max_increase) if max_increase is not None else gate_of(report)
    if gate.get("passed") is None:
        return None
    return bool(gate["passed"]), gate.get("reason") or f"the quality gate recorded in {REPORT_NAME} {gate['status']}"


def build_sample(config: ServeConfig, report: dict | None, mode: str, tokenizer, max_len: int) -> Sample:
    """Token windows and reference for `mode` (text or recorded); slow for big sources, so run in a thread."""
    from llmprune.data.sources import resolve_source
    from llmprune.data.windows import TokenizedCorpus, Windows, rebuild_eval_windows

    if mode == "recorded":
        block = recorded_perplexity(report)
        assert block is not None
        try:
            windows = rebuild_eval_windows(block["eval"], tokenizer)
        except LLMPruneError as exc:
            raise LLMPruneError(f"cannot rebuild the recorded eval windows: {exc} (pass --check-text FILE)") from exc
        reference, source = float(block["pruned"]), "pruned perplexity recorded at prune time"
        what = f"the eval windows recorded in {REPORT_NAME}"
    else:
        seqlen = min(config.check_seqlen or DEFAULT_CHECK_SEQLEN, max_len - 1)
        tokens = TokenizedCorpus(resolve_source(str(config.check_text), split="test"), tokenizer).tokens
        count = min(len(tokens) // seqlen, config.check_samples)
        if count < 1:
            raise LLMPruneError(f"--check-text {config.check_text} has {len(tokens)} tokens, fewer than {seqlen}")
        windows = Windows(tokens[: count * seqlen].view(count, seqlen).clone(), config.check_text.name)
        reference, source = config.expect_ppl, "value given by --expect-ppl"
        what = f"--check-text {config.check_text.name}"
    if windows.seqlen >= max_len:
        raise LLMPruneError(f"check windows of {windows.seqlen} tokens do not fit --max-model-len {max_len}")
    if reference is None:
        from llmprune.engine.devices import resolve_device
        from llmprune.eval.perplexity import perplexity

        reference = perplexity(config.folder, windows, resolve_device(config.device), batch_size=1).perplexity
        source = "perplexity from llmprune's streamed evaluator on the same windows"
    description = f"{windows.count} x {windows.seqlen} tokens of {what}"
    return Sample(windows.ids.tolist(), description, reference, source)


async def run_check(
    config: ServeConfig, report: dict | None, mode: str, engine: Engine, tokenizer, max_len: int
) -> CheckResult:
    """Measure with the serving engine and decide; never raises (a failure is a failed result)."""
    started = time.perf_counter()
    result = CheckResult("failed", "", engine=engine.name, dtype=engine.dtype)
    try:
        sample = await asyncio.to_thread(build_sample, config, report, mode, tokenizer, max_len)
        nll, tokens = await engine.score(sample.windows)
    except Exception as exc:  # a check that cannot run leaves the service not ready, with the reason
        result.reason = f"perplexity check could not run: {exc}"
        result.seconds = time.perf_counter() - started
        return result
    measured = math.exp(nll / tokens) if tokens else math.nan
    result.perplexity, result.reference, result.reference_source = measured, sample.reference, sample.reference_source
    result.windows, result.seqlen, result.tokens = len(sample.windows), len(sample.windows[0]), tokens
    difference = measured / sample.reference - 1 if sample.reference else math.inf
    close = math.isfinite(measured) and abs(difference) <= config.ppl_tolerance
    reasons = [
        f"perplexity {measured:.3f} ({engine.name}, {engine.dtype}) on {sample.description} is {difference:+.2%} "
        f"from {sample.reference:.3f}, the {sample.reference_source}: "
        + (
            f"within ±{config.ppl_tolerance:.0%}"
            if close
            else f"beyond ±{config.ppl_tolerance:.0%} (engine mismatch or corrupted weights)"
        )
    ]
    gate = quality_gate(report, config.max_ppl_increase)
    if gate is not None:
        reasons.append(gate[1])
    result.status = "passed" if close and (gate is None or gate[0]) else "failed"
    result.reason = "; ".join(reasons)
    result.seconds = time.perf_counter() - started
    return result
