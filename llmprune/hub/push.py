"""Push a finished output folder to the Hugging Face Hub through huggingface_hub's HfApi: create the repo if
missing, then upload the folder as one commit (the library picks regular, LFS or Xet uploads)."""

from __future__ import annotations

import importlib
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.export.gate import gate_of, require_passed
from llmprune.report import read_report
from llmprune.settings import check_repo_id
from llmprune.version import __version__


def require_token() -> str:
    """The Hub token (HF_TOKEN, else the saved login); a one-line error when offline or logged out."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise LLMPruneError("cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hugging Face Hub)")
    token = get_token()
    if not token:
        raise LLMPruneError(
            "cannot push: no Hugging Face token (set HF_TOKEN or run `hf auth login` with a write token)"
        )
    return token


def check_folder(folder: Path) -> dict | None:
    """A complete output folder (config.json and weights, not a .partial build); returns its report if any."""
    folder = Path(folder)
    if folder.name.endswith(".partial") or not folder.is_dir():
        raise LLMPruneError(f"{folder} is not a finished model folder")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise LLMPruneError(f"{folder} has no config.json with safetensors weights: nothing to push")
    return read_report(folder)


def default_message(report: dict | None) -> str:
    if report and "method" in report:
        return f"Upload {report['method']} {report['pattern']} pruned model (llmprune {__version__})"
    return f"Upload model (llmprune {__version__})"


def commit_description(report: dict | None) -> str:
    """The commit's description: what was pruned and how well it held up."""
    if not report or "method" not in report:
        return ""
    lines = [f"{report['method']} {report['pattern']}, achieved sparsity {report['achieved_sparsity']:.4f}"]
    ppl = report.get("perplexity") or {}
    if ppl.get("dense") is not None:
        lines.append(f"perplexity dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f}")
    gate = gate_of(report)
    lines.append(f"quality gate: {gate['status'].replace('_', ' ')}")
    if report.get("command"):
        lines.append(f"command: {report['command']}")
    return "\n".join(lines)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
) -> dict:
    """Upload `folder` to `repo_id` as one commit; refuses a folder whose quality gate did not pass unless `force`.

    Returns {"repo_id", "url", "revision", "commit", "commit_url"}.
    """
    check_repo_id(repo_id)
    report = check_folder(folder)
    require_passed(report, force)
    token = require_token()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.whoami()
        url = api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or default_message(report),
            commit_description=commit_description(report),
        )
    except HfHubHTTPError as exc:
        raise LLMPruneError(_http_reason(exc, repo_id)) from exc
    except OfflineModeIsEnabled as exc:
        raise LLMPruneError("cannot push: HF_HUB_OFFLINE is set (unset it to reach the Hugging Face Hub)") from exc
    except _transport_errors() as exc:
        raise LLMPruneError(f"cannot reach the Hugging Face Hub at {api.endpoint}: {_first_line(exc)}") from exc
    return {
        "repo_id": repo_id,
        "url": str(url),
        "revision": revision or "main",
        "commit": info.oid,
        "commit_url": info.commit_url,
    }


def _transport_errors() -> tuple[type[BaseException], ...]:
    """OSError plus the transport error class of whichever httpx huggingface_hub uses (httpx2 or httpx)."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def _http_reason(exc, repo_id: str) -> str:
    status = exc.response.status_code if exc.response is not None else None
    if status == 401:
        return "the Hugging Face Hub rejected the token (401): set a valid HF_TOKEN or run `hf auth login`"
    if status == 403:
        return (
            f"no write access to {repo_id} (403): it belongs to another user or organization, or the token is read-only"
        )
    return f"the Hugging Face Hub refused the push ({status}): {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
