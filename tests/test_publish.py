"""Publishing: the packed 2:4 format, the model card, the quality gate and the Hub push (against a local server)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import FakeHub, serve
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import llmprune
from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.export.card import read_front_matter
from llmprune.export.packed import POSITIONS_SUFFIX, VALUES_SUFFIX, pack_tensor, unpack_tensor

BASE_MODEL = "llmprune-tests/tiny-llama"
TOKEN = "hf_test_write_token"
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def trained(tiny_models, tokenizer, corpus_file, tmp_path_factory) -> Path:
    """A tiny Llama trained for 100 steps on the corpus, so that 2:4 pruning measurably costs perplexity.

    Its README names a base model, as a Hub model's card would.
    """
    folder = tmp_path_factory.mktemp("trained") / "llama"
    shutil.copytree(tiny_models("llama", layers=2), folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor(tokenizer(corpus_file.read_text()[:200_000])["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s : s + 64] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    (folder / "README.md").write_text(f"---\nbase_model: {BASE_MODEL}\nlicense: apache-2.0\n---\n\n# tiny\n")
    return folder


def _prune_args(model: Path, corpus: Path, out: Path, *extra) -> list[str]:
    common = ["--calibration", corpus, "--samples", 4, "--seqlen", 32, "--eval-samples", 4, "--quiet"]
    return [str(a) for a in [model, "--method", "wanda", "--pattern", "2:4", *common, "--output", out, *extra]]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def passed_run(trained, corpus_file, tmp_path_factory) -> Path:
    """A bfloat16 Wanda 2:4 run that passes the default gate, written in several shards."""
    out = tmp_path_factory.mktemp("runs") / "passed"
    code = main(_prune_args(trained, corpus_file, out, "--dtype", "bfloat16", "--max-shard-size", "150KB"))
    assert code == 0
    return out


@pytest.fixture(scope="module")
def failed_run(trained, corpus_file, tmp_path_factory) -> Path:
    """The same run with a 5% limit: written, but its quality gate failed."""
    out = tmp_path_factory.mktemp("runs") / "failed"
    assert main(_prune_args(trained, corpus_file, out, "--max-ppl-increase", "0.05")) == 3
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))
    )


# ---------------------------------------------------------------- packed 2:4 tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cols", [16, 12, 44])
def test_pack_tensor_is_bit_exact_with_awkward_groups(dtype, cols):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(32, cols, generator=generator).to(dtype)
    groups = weight.view(32, cols // 4, 4)
    keep = torch.rand(32, cols // 4, 4, generator=generator).argsort(-1)[..., :2]
    groups.masked_fill_(~torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True), 0.0)
    nan_payload = torch.tensor([0x7FC1 if dtype != torch.float32 else 0x7FC00123], dtype=INT_VIEW[dtype])
    awkward = {
        0: [0.0, 0.0, 0.0, 0.0],  # no nonzero: two zeros are stored
        1: [0.0, 0.0, 0.0, 5.0],  # one nonzero, last slot
        2: [-0.0, 0.0, 0.0, 0.0],  # -0.0 is a bit pattern to keep
        (3, 0): [0.0, -0.0, -0.0, 0.0],
        (3, 1): [1e-40 if dtype == torch.float32 else 1e-7, 0.0, 0.0, 0.0],  # subnormal
    }
    for key, values in awkward.items():
        row, group = key if isinstance(key, tuple) else (key, 0)
        groups[row, group] = torch.tensor(values).to(dtype)
    groups[4, 0] = 0.0
    groups[4, 0, 2] = nan_payload.view(dtype)[0]  # a NaN with a payload keeps its bits
    values, positions = pack_tensor(weight)
    assert values.dtype == dtype and values.shape == (32, cols // 2)
    assert positions.dtype == torch.uint8 and positions.shape == (32, -(-cols // 8))
    assert _same_bits(unpack_tensor(values, positions), weight)
    packed_bytes = values.numel() * values.element_size() + positions.numel()
    ratio = packed_bytes / (weight.numel() * weight.element_size())
    assert ratio == (cols // 2 * weight.element_size() + -(-cols // 8)) / (cols * weight.element_size())
    if cols >= 36:  # below that, a row's half-byte of padding weighs more than 0.0075 of it
        assert ratio <= 0.57


def test_pack_tensor_refuses_what_is_not_2_of_4():
    dense = torch.tensor([[1.0, 2.0, 0.0, 3.0]])
    negative_zero = torch.tensor([[1.0, 2.0, -0.0, 0.0]])
    assert pack_tensor(dense) is None
    assert pack_tensor(negative_zero) is None  # three set bit patterns: not losslessly packable
    assert pack_tensor(torch.zeros(8)) is None  # not a matrix
    assert pack_tensor(torch.zeros(2, 6)) is None  # width not a multiple of 4
    assert pack_tensor(torch.zeros(2, 8, dtype=torch.int32)) is None


def test_unpack_rejects_corrupt_positions():
    values, positions = pack_tensor(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    with pytest.raises(LLMPruneError, match="invalid position codes"):
        unpack_tensor(values, torch.zeros_like(positions))
    with pytest.raises(LLMPruneError, match="corrupt packed tensor"):
        unpack_tensor(values, positions.repeat(1, 2))


# ---------------------------------------------------------------- packed folders


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _tensors(folder: Path, pattern: str) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob(pattern)):
        with safe_open(str(shard), "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def test_pack_unpack_folder_is_byte_identical(passed_run, tmp_path, capsys):
    packed, back = tmp_path / "packed", tmp_path / "back"
    code, out, _ = _run(["pack", str(passed_run), str(packed)], capsys)
    assert code == 0 and "packed" in out
    assert len(list(passed_run.glob("model-*.safetensors"))) > 1  # several shards and an index
    assert not list(packed.glob("model*")) and (packed / "packed.safetensors.index.json").is_file()
    info = json.loads((packed / "llmprune.json").read_text())["packed"]
    assert info["format"] == "packed-2:4" and info["format_version"] == 1
    assert info["packed_tensors"] == 14 and info["ratio"] == 0.5625

    dense = _tensors(passed_run, "model*.safetensors")
    stored = _tensors(packed, "packed*.safetensors")
    as_packed = {n.removesuffix(VALUES_SUFFIX) for n in stored if n.endswith(VALUES_SUFFIX)}
    as_is = {n for n in stored if not n.endswith((VALUES_SUFFIX, POSITIONS_SUFFIX))}
    assert as_packed | as_is == set(dense) and not as_packed & as_is
    report = json.loads((passed_run / "llmprune.json").read_text())
    assert as_packed == {m["name"] + ".weight" for layer in report["layers"] for m in layer["modules"]}
    for name in as_packed:
        size = stored[name + VALUES_SUFFIX].numel() * 2 + stored[name + POSITIONS_SUFFIX].numel()
        assert dense[name].dtype == torch.bfloat16 and size / (dense[name].numel() * 2) <= 0.57
    assert all(_same_bits(stored[n], dense[n]) for n in as_is)
    assert "packed 2:4" in (packed / "README.md").read_text()

    code, _, _ = _run(["unpack", str(packed), str(back)], capsys)
    assert code == 0
    assert _files(back) == _files(passed_run)


def test_load_returns_the_same_model_from_either_format(passed_run, tmp_path, capsys):
    packed = tmp_path / "packed"
    assert _run(["pack", str(passed_run), str(packed)], capsys)[0] == 0
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(packed)  # stock loaders refuse it rather than load garbage
    from_dense, from_packed = llmprune.load(passed_run), llmprune.load(packed)
    assert type(from_dense) is type(from_packed)
    dense_state, packed_state = from_dense.state_dict(), from_packed.state_dict()
    assert dense_state.keys() == packed_state.keys()
    assert all(_same_bits(dense_state[k], packed_state[k]) for k in dense_state)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    assert torch.equal(from_dense(ids).logits, from_packed(ids).logits)


def test_save_format_packed_run_unpacks_to_the_dense_run(trained, corpus_file, tmp_path, capsys):
    dense, packed, back = tmp_path / "dense", tmp_path / "packed", tmp_path / "back"
    assert main(_prune_args(trained, corpus_file, dense, "--dtype", "float16")) == 0
    assert main(_prune_args(trained, corpus_file, packed, "--dtype", "float16", "--save-format", "packed-2:4")) == 0
    assert [p.name for p in packed.glob("*.safetensors")] == ["packed.safetensors"]
    report = json.loads((packed / "llmprune.json").read_text())
    assert report["save_format"] == "packed-2:4" and report["packed"]["ratio"] == 0.5625
    assert "packed-2:4" in read_front_matter((packed / "README.md").read_text())["tags"]
    assert _run(["unpack", str(packed), str(back)], capsys)[0] == 0
    assert (back / "model.safetensors").read_bytes() == (dense / "model.safetensors").read_bytes()
    assert "llmprune.load" not in (back / "README.md").read_text()


def test_pack_errors_leave_nothing(tiny_models, corpus_file, passed_run, tmp_path, capsys):
    unstructured = tmp_path / "unstructured"
    assert main([str(tiny_models("llama")), "--calibration", str(corpus_file), "--samples", "2", "--seqlen", "16",
                 "--no-eval", "--quiet", "--output", str(unstructured)]) == 0  # fmt: skip
    cases = [
        (["pack", str(unstructured), str(tmp_path / "a")], "no 2:4-sparse matrix"),
        (["unpack", str(passed_run), str(tmp_path / "a")], "is not a packed folder"),
        (["pack", str(passed_run), str(passed_run)], "OUT must differ from DIR"),
        (["pack", str(tmp_path / "missing"), str(tmp_path / "a")], "is not a model folder"),
        (["pack", str(passed_run), str(unstructured)], "--overwrite"),
        (
            [str(tiny_models("llama")), "--save-format", "packed-2:4", "--output", str(tmp_path / "a")],
            "--save-format packed-2:4 needs --pattern 2:4",
        ),
    ]
    for argv, message in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2 and message in _one_error_line(err)
        assert not (tmp_path / "a").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (unstructured / "model.safetensors").is_file()


# ---------------------------------------------------------------- model card and quality gate


def _module_table(card: str) -> dict[str, float]:
    rows = re.findall(r"^\| `([\w.]+)` \| (\d+) \| [\d,]+ \| ([\d.]+)% \|$", card, re.MULTILINE)
    return {name: float(sparsity) / 100 for name, _, sparsity in rows}


def test_model_card_yaml_command_sparsity_and_perplexity(trained, corpus_file, passed_run):
    card = (passed_run / "README.md").read_text()
    report = json.loads((passed_run / "llmprune.json").read_text())
    meta = read_front_matter(card)
    assert meta["base_model"] == BASE_MODEL
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "2:4", "llmprune", "wanda"} <= set(meta["tags"])
    argv = _prune_args(trained, corpus_file, passed_run, "--dtype", "bfloat16", "--max-shard-size", "150KB")
    assert report["command"] == shlex.join(["llmprune", *argv])
    assert f"```bash\n{report['command']}\n```" in card
    kinds: dict[str, list[float]] = {}
    for layer in report["layers"]:
        for module in layer["modules"]:
            kinds.setdefault(module["name"].split(".", 3)[3], []).append(module["sparsity"])
    assert set(_module_table(card)) == set(kinds) and "self_attn.q_proj" in kinds
    assert _module_table(card) == {k: pytest.approx(sum(v) / len(v), abs=5e-5) for k, v in kinds.items()}
    ppl = report["perplexity"]
    assert f"| {ppl['dense']:.3f} |" in card and f"| {ppl['pruned']:.3f} |" in card
    assert f"{ppl['eval']['count']} windows of {ppl['eval']['seqlen']} tokens from `{corpus_file}`" in card
    assert 'AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")' in card and 'dtype="bfloat16"' in card
    assert report["quality_gate"]["status"] == "passed" and "Quality gate: **passed**" in card


def test_python_api_records_an_equivalent_call(trained, corpus_file, tmp_path):
    out = tmp_path / "api"
    report = llmprune.prune(str(trained), method="magnitude", pattern="2:4", calibration=str(corpus_file),
                            samples=2, seqlen=16, no_eval=True, quiet=True, output=str(out))  # fmt: skip
    assert report["command"] == (
        f"llmprune.prune({str(trained)!r}, method='magnitude', pattern='2:4', calibration={str(corpus_file)!r}, "
        f"samples=2, seqlen=16, output={str(out)!r}, no_eval=True, quiet=True)"
    )
    assert report["quality_gate"] == {
        "status": "not_evaluated",
        "passed": None,
        "max_ppl_increase": 0.5,
        "reason": "perplexity was not evaluated (--no-eval)",
    }
    card = (out / "README.md").read_text()
    assert report["command"] in card and "Quality gate not evaluated" in card
    assert read_front_matter(card)["base_model"] == BASE_MODEL


def test_failed_quality_gate_writes_a_marked_folder_and_exits_3(trained, corpus_file, tmp_path):
    out = tmp_path / "failed"
    proc = subprocess.run(
        [sys.executable, "-m", "llmprune", *_prune_args(trained, corpus_file, out, "--max-ppl-increase", "0.05")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3
    line = _one_error_line(proc.stderr)
    assert line.startswith("llmprune: error: quality gate failed: pruned perplexity") and "limit of +5%" in line
    gate = json.loads((out / "llmprune.json").read_text())["quality_gate"]
    assert gate["status"] == "failed" and gate["passed"] is False and gate["max_ppl_increase"] == 0.05
    assert gate["increase"] > 0.05
    assert "Quality gate failed" in (out / "README.md").read_text()
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # still a complete folder


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-ppl-increase", "-0.1"], "--max-ppl-increase must be >= 0"),
        (["--push-to-hub", "no-slash"], "Hub repository must be ORG/NAME"),
        (["--push-to-hub", "org/name", "--no-eval"], "--push-to-hub needs the quality gate"),
        (["--save-format", "zip"], "invalid choice"),
    ],
)
def test_bad_publish_options_fail_before_any_work(argv, message, trained, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(_prune_args(trained, corpus_file, out, *argv), capsys)
    assert code == 2 and message in _one_error_line(err)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- Hub push (against a local server)


@pytest.fixture
def hub():
    state = FakeHub(tokens={TOKEN: ("alice", ["llmprune-org"])}, foreign={"someone-else/model"})
    server = serve(state)
    yield state
    server.shutdown()
    server.server_close()


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
