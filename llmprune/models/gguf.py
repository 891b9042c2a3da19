"""Dequantize a GGUF file once (through transformers + gguf) into a cached safetensors folder.

The cached folder is then an ordinary model folder that the streaming engine reads layer by layer.
Dequantization itself goes through `transformers`, which holds the dequantized model in memory once:
GGUF models are small on-device models, and the conversion is cached by file identity.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where llmprune caches converted models: $LLMPRUNE_CACHE, else ~/.cache/llmprune."""
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune")).expanduser()


def _fingerprint(path: Path) -> str:
    """Identify a (possibly huge) file by name, size and its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(0, size - (1 << 20)))
        digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def cache_folder(path: Path) -> Path:
    """The folder a GGUF file converts into: named by the file's name, size and first and last MiB."""
    path = path.resolve()
    return cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"


def gguf_to_folder(path: Path, *, quiet: bool = False) -> Path:
    """Return the cached safetensors folder for a GGUF file, converting it on first use.

    Processes that start on the same new file at once (jobs of the service, ranks, parallel tests) take turns
    through a lock file: the first converts, the others wait and then find the folder.
    """
    path = path.resolve()
    target = cache_folder(path)
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_name(target.name + ".lock"), "a")  # noqa: SIM115  (closed by the `with` below)
    except OSError as exc:
        raise LLMPruneError(
            f"cannot write the GGUF cache {target.parent} ({exc.strerror}): set LLMPRUNE_CACHE to a writable folder"
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed holder's process ends
        if not (target / "config.json").is_file():
            _convert(path, target, quiet=quiet)
    return target


def _convert(path: Path, target: Path, *, quiet: bool) -> None:
    """Dequantize `path` into `target` (under the caller's lock), through a `.partial` folder renamed at the end."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise LLMPruneError("reading a .gguf file needs the `gguf` package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not quiet:
        log.info("dequantizing %s once into %s", path.name, target)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported GGUF
        raise LLMPruneError(f"cannot read GGUF file {path}: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet:
            hf_logging.enable_progress_bar()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _save_dequantized(model, partial)
    tokenizer.save_pretrained(partial)
    del model
    os.replace(partial, target)


def _save_dequantized(model, folder: Path) -> None:
    """Write the dequantized weights as safetensors and a config without GGUF quantization metadata.

    (`save_pretrained` refuses GGUF-loaded models, so the state dict is written directly; tied
    tensors such as a shared lm_head are written once.)
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    _strip_keys(folder / "config.json", ("quantization_config", "_model_name_or_path"))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def _strip_keys(config_path: Path, keys: tuple[str, ...]) -> None:
    config = json.loads(config_path.read_text())
    for key in keys:
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
