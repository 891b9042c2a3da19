"""hub/push.py: `llmprune push` and `--push-to-hub` against a local stand-in for the Hub API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmprune.export.card import read_front_matter
from tests.helpers.cli import one_error_line as _one_error_line
from tests.helpers.cli import run_main as _run
from tests.helpers.hub_server import FakeHub
from tests.helpers.publish import BASE_MODEL, TOKEN
from tests.helpers.publish import files as _files
from tests.helpers.publish import prune_args as _prune_args


def _hub_env(hub: FakeHub, tmp_path: Path, token: str | None = TOKEN, **extra) -> dict[str, str]:
    drop = ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
    env.update(HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


def _llmprune(argv: list, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmprune", *map(str, argv)], env=env, capture_output=True, text=True, timeout=300
    )


def test_push_uploads_the_folder_as_one_commit(passed_run, hub, tmp_path):
    argv = ["push", passed_run, "llmprune-org/tiny-wanda", "--private", "--revision", "exp"]
    proc = _llmprune([*argv, "--commit-message", "First pruned upload"], _hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert hub.repos == {"llmprune-org/tiny-wanda": {"visibility": "private", "type": None}}
    assert hub.branches["llmprune-org/tiny-wanda"] == {"main", "exp"}
    [commit] = hub.commits
    assert (commit.repo_id, commit.revision, commit.summary) == (
        "llmprune-org/tiny-wanda",
        "exp",
        "First pruned upload",
    )
    assert "wanda 2:4" in commit.description and "quality gate: passed" in commit.description
    assert commit.files == _files(passed_run)
    assert sorted(commit.lfs_paths) == sorted(p.name for p in passed_run.glob("*.safetensors"))
    assert f"{hub.endpoint}/llmprune-org/tiny-wanda/commit/{commit.oid}" in proc.stdout


def test_failed_quality_gate_blocks_push_unless_forced(failed_run, hub, tmp_path):
    env = _hub_env(hub, tmp_path)
    proc = _llmprune(["push", failed_run, "alice/failed"], env)
    assert proc.returncode == 3
    assert "refusing to push: the quality gate failed" in _one_error_line(proc.stderr)
    assert hub.requests == [] and hub.commits == []
    proc = _llmprune(["push", failed_run, "alice/failed", "--force"], env)
    assert proc.returncode == 0, proc.stderr
    assert [c.repo_id for c in hub.commits] == ["alice/failed"]
    assert hub.commits[0].files == _files(failed_run)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no token", "cannot push: no Hugging Face token (set HF_TOKEN or run `hf auth login`"),
        ("offline", "cannot push: HF_HUB_OFFLINE is set"),
        ("bad token", "the Hugging Face Hub rejected the token (401)"),
        ("someone else's repo", "no write access to someone-else/model (403)"),
        ("bad repo id", "Hub repository must be ORG/NAME"),
        ("not a folder", "is not a finished model folder"),
    ],
)
def test_push_errors_are_one_clear_line(case, message, passed_run, hub, tmp_path):
    env = _hub_env(hub, tmp_path, token=None if case == "no token" else "hf_wrong" if case == "bad token" else TOKEN)
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    repo = {"someone else's repo": "someone-else/model", "bad repo id": "a/b/c"}.get(case, "alice/model")
    folder = tmp_path / "missing" if case == "not a folder" else passed_run
    proc = _llmprune(["push", folder, repo], env)
    assert proc.returncode == 2
    assert message in _one_error_line(proc.stderr)
    assert hub.commits == []


def test_prune_with_push_to_hub_pushes_the_finished_folder(trained, corpus_file, hub, tmp_path):
    out = tmp_path / "out"
    env = _hub_env(hub, tmp_path)
    proc = _llmprune([*_prune_args(trained, corpus_file, out, "--push-to-hub", "alice/tiny-2of4")], env)
    assert proc.returncode == 0, proc.stderr
    [commit] = hub.commits
    assert commit.repo_id == "alice/tiny-2of4" and commit.revision == "main"
    assert commit.summary.startswith("Upload wanda 2:4 pruned model")
    assert commit.files == _files(out)
    assert json.loads(commit.files["llmprune.json"])["quality_gate"]["passed"] is True

    missing_token = _llmprune(
        [*_prune_args(trained, corpus_file, tmp_path / "x", "--push-to-hub", "alice/x")], _hub_env(hub, tmp_path, None)
    )
    assert missing_token.returncode == 2 and "no Hugging Face token" in _one_error_line(missing_token.stderr)
    assert not (tmp_path / "x").exists()

    forbidden = _llmprune(
        [*_prune_args(trained, corpus_file, tmp_path / "y", "--push-to-hub", "someone-else/model")], env
    )
    line = _one_error_line(forbidden.stderr)
    assert forbidden.returncode == 2 and "no write access to someone-else/model (403)" in line
    assert f"is complete: retry with `llmprune push {tmp_path / 'y'} someone-else/model`" in line
    assert (tmp_path / "y" / "model.safetensors").is_file() and len(hub.commits) == 1


def test_not_evaluated_gate_needs_force_to_push(trained, corpus_file, hub, tmp_path, capsys):
    out = tmp_path / "noeval"
    code, _, _ = _run([*_prune_args(trained, corpus_file, out), "--no-eval"], capsys)
    assert code == 0
    proc = _llmprune(["push", out, "alice/noeval"], _hub_env(hub, tmp_path))
    assert proc.returncode == 3 and "quality gate was not evaluated" in _one_error_line(proc.stderr)
    assert hub.requests == []
    card = read_front_matter((out / "README.md").read_text())
    assert yaml.safe_dump(card) and card["base_model"] == BASE_MODEL
