"""The quality gate: a pruned model whose perplexity rose more than allowed is written but marked failed,
so that nobody ships it by accident (`llmprune push` refuses it without --force)."""

from __future__ import annotations

import math

from llmprune.errors import QualityGateError
from llmprune.report import REPORT_NAME
from llmprune.settings import DEFAULT_MAX_PPL_INCREASE


def quality_gate(
    perplexity: dict | None, max_ppl_increase: float, tasks: dict | None = None, max_acc_drop: float | None = None
) -> dict:
    """The gate's verdict for a report's "perplexity" block (and its "tasks" block when --max-acc-drop is
    given): passed, failed or not evaluated, with the reason."""
    limit = f"+{max_ppl_increase:.0%}" if math.isfinite(max_ppl_increase) else "none"
    gate = {"status": "not_evaluated", "passed": None, "max_ppl_increase": max_ppl_increase}
    if max_acc_drop is not None:
        gate["max_acc_drop"] = max_acc_drop
    dense = (perplexity or {}).get("dense")
    pruned = (perplexity or {}).get("pruned")
    if dense is None or pruned is None:
        return {**gate, "reason": "perplexity was not evaluated (--no-eval)"}
    increase = pruned / dense - 1
    passed = math.isfinite(pruned) and pruned <= dense * (1 + max_ppl_increase)
    verdict = "within" if passed else "above"
    reason = f"pruned perplexity {pruned:.3f} is {increase:+.1%} over dense {dense:.3f}, {verdict} the limit of {limit}"
    if tasks is not None and max_acc_drop is not None:
        drops = {name: r["dense"] - r["pruned"] for name, r in tasks["results"].items()}
        over = {name: drop for name, drop in drops.items() if drop > max_acc_drop}
        passed = passed and not over
        worst = max(drops, key=drops.get)
        reason += (
            f"; accuracy drops above {max_acc_drop:.3f}: "
            + ", ".join(f"{name} {drop:+.3f}" for name, drop in over.items())
            if over
            else f"; every task within an accuracy drop of {max_acc_drop:.3f} (largest: {worst} {drops[worst]:+.3f})"
        )
    status = "passed" if passed else "failed"
    return {**gate, "status": status, "passed": passed, "increase": increase, "reason": reason}


def gate_of(report: dict | None) -> dict:
    """The recorded gate of a folder's report (recomputed at the default limit for reports that predate it)."""
    if report is None:
        return {"status": "not_evaluated", "passed": None, "reason": f"the folder has no {REPORT_NAME}"}
    return report.get("quality_gate") or quality_gate(report.get("perplexity"), DEFAULT_MAX_PPL_INCREASE)


def require_passed(report: dict | None, force: bool) -> dict:
    """Raise QualityGateError unless the gate passed or `force`; returns the gate."""
    gate = gate_of(report)
    if gate["passed"] or force:
        return gate
    if gate["status"] == "failed":
        raise QualityGateError(f"refusing to push: the quality gate failed ({gate['reason']}); pass --force to push it")
    raise QualityGateError(
        f"refusing to push: the quality gate was not evaluated ({gate['reason']}); "
        "prune again with an eval set, or pass --force to push it"
    )
