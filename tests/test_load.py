"""export/load.py: `llmprune.load` gives the same model from a dense and a packed folder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from tests.helpers.cli import run_main as _run
from tests.helpers.publish import same_bits as _same_bits


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
