"""MODEL resolution: local folders, aliases, the Hub cache (HF_HOME, HF_HUB_OFFLINE), clear failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from llmprune.errors import LLMPruneError
from llmprune.models.resolve import ALIASES, resolve_model


def test_aliases_cover_the_opt_family():
    for size in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b"):
        assert ALIASES[f"opt-{size}"] == f"facebook/opt-{size}"


def test_local_folder(tiny_models):
    folder = tiny_models("llama")
    assert resolve_model(str(folder)) == folder.resolve()


def test_alias_offline_says_what_was_tried():
    with pytest.raises(LLMPruneError) as info:
        resolve_model("opt-125m")
    message = str(info.value)
    assert "alias 'opt-125m' -> 'facebook/opt-125m'" in message
    assert "HF_HUB_OFFLINE" in message and "local path" in message


def test_nonsense_name():
    with pytest.raises(LLMPruneError, match="cannot find model 'definitely not a model'"):
        resolve_model("definitely not a model")


def test_folder_with_bin_weights_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LLMPruneError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_hub_id_from_hf_home_cache_offline(tiny_models, corpus_file, tmp_path):
    """A Hub id resolves from the HF_HOME cache with HF_HUB_OFFLINE=1 (what users with a warm cache get)."""
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_models("llama"), snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmprune",
            "eval",
            "acme/tiny-llama",
            "--dataset",
            str(corpus_file),
            "--seqlen",
            "32",
            "--samples",
            "2",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"perplexity"' in proc.stdout and str(snapshot) in proc.stdout
