"""Turn what the user typed as MODEL into a local folder holding config.json and safetensors shards.

Accepted: a local folder, a `.gguf` file (dequantized once into a cached folder), a short alias
(`opt-125m` ... `opt-175b` and a few other common models), an embedded asset name, or a Hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmprune.errors import LLMPruneError
from llmprune.models import assets

OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b")

ALIASES: dict[str, str] = {f"opt-{size}": f"facebook/opt-{size}" for size in OPT_SIZES}
ALIASES.update(
    {
        "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "llama-2-13b": "meta-llama/Llama-2-13b-hf",
        "llama-2-70b": "meta-llama/Llama-2-70b-hf",
        "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
        "qwen2.5-7b": "Qwen/Qwen2.5-7B",
        "gemma-3-1b": "google/gemma-3-1b-pt",
        "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
        "pythia-160m": "EleutherAI/pythia-160m",
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
        "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
        "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
    }
)

# What a Hub download fetches: configs, tokenizer files and safetensors weights (never .bin/.pt copies), and
# the card and licence files whose terms the pruned model's card carries over.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "README.md"]
HUB_PATTERNS += ["LICENSE*", "LICENCE*", "USE_POLICY*", "NOTICE*"]


def is_model_folder(path: Path) -> bool:
    """A folder we can stream from: a config.json and at least one safetensors file."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(spec: str, *, quiet: bool = False, revision: str | None = None, token: str | None = None) -> Path:
    """Return a local folder for `spec`, or raise one LLMPruneError that lists everything tried.

    `revision` (a branch, tag or commit) and `token` are for a Hub model only."""
    tried: list[str] = []
    path = Path(spec).expanduser()
    if revision is not None and (path.exists() or assets.embedded_model(spec) is not None):
        raise LLMPruneError(f"--source-revision is for a Hub model; {spec!r} is local")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from llmprune.models.gguf import gguf_to_folder

            return gguf_to_folder(path, quiet=quiet)
        raise LLMPruneError(
            f"MODEL {spec!r} is a file but not a .gguf file; give a model folder, a .gguf file or a Hub id"
        )
    if path.is_dir():
        if is_model_folder(path):
            return path.resolve()
        if (path / "config.json").is_file() and any(path.glob("*.bin")):
            raise LLMPruneError(
                f"{path} holds PyTorch .bin weights only; llmprune streams safetensors (convert with "
                "`model.save_pretrained(dir, safe_serialization=True)`)"
            )
        raise LLMPruneError(f"folder {path} has no config.json with safetensors weights")
    tried.append(f"local path {str(path)!r} (does not exist)")

    embedded = assets.embedded_model(spec)
    if embedded is not None:
        from llmprune.models.gguf import gguf_to_folder

        return gguf_to_folder(embedded, quiet=quiet)
    if spec.lower() in assets.EMBEDDED_MODELS:
        tried.append(f"embedded model {spec!r} ({assets.EMBEDDED_MODELS[spec.lower()][2]})")

    repo_id = ALIASES.get(spec.lower(), spec)
    if repo_id != spec:
        tried.append(f"alias {spec!r} -> {repo_id!r}")
    if _looks_like_repo_id(repo_id):
        folder, why = _download(repo_id, quiet=quiet, revision=revision, token=token)
        if folder is not None:
            return folder
        tried.append(f"Hugging Face Hub {repo_id!r} ({why})")
    else:
        tried.append(f"Hub id (not of the form ORG/NAME; known aliases: {', '.join(sorted(ALIASES)[:6])}, ...)")
    raise LLMPruneError(f"cannot find model {spec!r}: tried " + "; ".join(tried))


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download(
    repo_id: str, *, quiet: bool, revision: str | None = None, token: str | None = None
) -> tuple[Path | None, str]:
    """Fetch a snapshot through huggingface_hub (honours HF_HOME, HF_TOKEN, HF_HUB_OFFLINE)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        return None, "gated: accept its licence on the Hub and set HF_TOKEN"
    except RevisionNotFoundError:
        return None, f"no revision {revision!r} in it"
    except RepositoryNotFoundError:
        return None, "no such repository, or it is private"
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the Hub is unreachable and it is not cached"
        )
        return None, why
    except OSError as exc:
        return None, f"download failed: {str(exc).splitlines()[0][:160]}"
    if not is_model_folder(folder):
        return None, "the repository has no safetensors weights"
    return folder, ""
