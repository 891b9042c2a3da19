"""The publishing steps of a prune run: check the options up front, finish the folder before it is committed
(command, base model, quality gate, model card, packed format), and push it to the Hub afterwards."""

from __future__ import annotations

from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.export.card import base_model_of, write_card
from llmprune.export.gate import check_limit, quality_gate
from llmprune.export.packed import FORMAT, pack_into
from llmprune.export.writer import OutputFolder

SAVE_FORMATS = ("dense", FORMAT)


def check_options(settings, pattern) -> None:
    """Reject bad publishing options before any work: save format, gate limit, Hub repo and token."""
    if settings.save_format not in SAVE_FORMATS:
        raise LLMPruneError(f"unknown --save-format {settings.save_format!r}: choose from {', '.join(SAVE_FORMATS)}")
    if settings.save_format == FORMAT and str(pattern) != "2:4":
        raise LLMPruneError(f"--save-format {FORMAT} needs --pattern 2:4 (got {pattern})")
    check_limit(settings.max_ppl_increase)
    if settings.push_to_hub:
        from llmprune.hub.push import check_repo_id, require_token

        check_repo_id(settings.push_to_hub)
        if settings.no_eval:
            raise LLMPruneError(
                "--push-to-hub needs the quality gate, which --no-eval skips "
                "(push later with `llmprune push DIR ORG/NAME --force`)"
            )
        require_token()


def api_call(settings, defaults) -> str:
    """The Python call equivalent to `settings`: llmprune.prune('MODEL', option=value, ...)."""
    options = [
        f"{name}={value!r}"
        for name, value in vars(settings).items()
        if name not in ("model", "command") and value != getattr(defaults, name)
    ]
    return f"llmprune.prune({', '.join([repr(settings.model), *options])})"


def finish_folder(writer: OutputFolder, report: dict, settings, source_folder: Path, report_name: str) -> None:
    """Complete the report (command, base model, quality gate), write it and the model card, pack if asked."""
    report["command"] = settings.command or api_call(settings, type(settings)(model=settings.model))
    report["base_model"] = base_model_of(settings.model, source_folder)
    report["save_format"] = settings.save_format
    report["quality_gate"] = quality_gate(report.get("perplexity"), settings.max_ppl_increase)
    writer.write_json(report_name, report)
    write_card(writer.partial, report)
    if settings.save_format == FORMAT:
        report["packed"] = pack_into(writer.partial, writer.partial)


def push_after_run(report: dict, settings) -> dict | None:
    """Push the committed folder when --push-to-hub was given and the gate passed; returns what happened."""
    if not settings.push_to_hub:
        return None
    if not report["quality_gate"]["passed"]:
        return {"pushed": False, "repo_id": settings.push_to_hub, "reason": "the quality gate failed"}
    from llmprune.hub.push import push_folder

    try:
        result = push_folder(
            Path(report["output"]),
            settings.push_to_hub,
            private=settings.private,
            revision=settings.revision,
            commit_message=settings.commit_message,
        )
    except LLMPruneError as exc:
        raise type(exc)(
            f"{exc} ({report['output']} is complete: retry with `llmprune push {report['output']} "
            f"{settings.push_to_hub}`)"
        ) from exc
    return {"pushed": True, **result}
