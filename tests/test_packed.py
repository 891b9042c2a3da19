"""export/packed.py: the packed 2:4 format, tensor by tensor and folder by folder (pack, unpack,
--save-format packed-2:4), bit-exact both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.export.card import read_front_matter
from llmprune.export.packed import POSITIONS_SUFFIX, VALUES_SUFFIX, pack_tensor, unpack_tensor
from tests.helpers.cli import one_error_line as _one_error_line
from tests.helpers.cli import run_main as _run
from tests.helpers.publish import files as _files
from tests.helpers.publish import prune_args as _prune_args
from tests.helpers.publish import same_bits as _same_bits

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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
