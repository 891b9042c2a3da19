"""Calibration and evaluation sources, and deterministic token windows."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.data.sources import resolve_source
from llmprune.data.windows import TokenizedCorpus, calibration_windows, evaluation_windows
from llmprune.errors import LLMPruneError
from tests.helpers.engine import read_output as _read_output


class WordIds:
    """A stand-in tokenizer: the text 'w0 w1 w2 ...' becomes the ids 0 1 2 ..."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        return {"input_ids": torch.tensor([[int(w[1:]) for w in text.split()]])}


def _numbered(tmp_path, n=1000):
    path = tmp_path / "numbers.txt"
    path.write_text(" ".join(f"w{i}" for i in range(n)))
    return path


def test_calibration_never_touches_the_held_out_tenth(tmp_path):
    corpus = TokenizedCorpus(resolve_source(str(_numbered(tmp_path))), WordIds())
    windows = calibration_windows(corpus, samples=200, seqlen=20, seed=0)
    assert windows.ids.shape == (200, 20)
    assert int(windows.ids.max()) < 900  # the last 10% (ids 900..999) are held out
    assert torch.all(windows.ids[:, 1:] - windows.ids[:, :-1] == 1)  # contiguous windows
    evals = evaluation_windows(corpus, seqlen=20)
    assert evals.ids.shape == (5, 20) and int(evals.ids.min()) == 900


def test_windows_are_deterministic_per_seed(tmp_path):
    corpus = TokenizedCorpus(resolve_source(str(_numbered(tmp_path))), WordIds())
    a = calibration_windows(corpus, 8, 10, seed=5)
    b = calibration_windows(corpus, 8, 10, seed=5)
    c = calibration_windows(corpus, 8, 10, seed=6)
    assert torch.equal(a.ids, b.ids) and a.fingerprint() == b.fingerprint()
    assert not torch.equal(a.ids, c.ids)


def test_eval_sample_cap(tmp_path):
    corpus = TokenizedCorpus(resolve_source(str(_numbered(tmp_path, 10_000))), WordIds())
    assert evaluation_windows(corpus, 10, max_windows=7).count == 7


def test_text_markdown_folder_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("To be, or not to be: that is the question.")
    (tmp_path / "b.md").write_text("# Act I\n\nNow is the winter of our discontent.")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "All the world's a stage."})
        + "\n\n"
        + json.dumps({"text": "Brevity is the soul of wit."})
        + "\n"
    )
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    assert resolve_source(str(tmp_path / "a.txt")).documents == ["To be, or not to be: that is the question."]
    assert resolve_source(str(tmp_path / "b.md")).documents[0].startswith("# Act I")
    assert resolve_source(str(tmp_path / "c.jsonl")).documents == [
        "All the world's a stage.",
        "Brevity is the soul of wit.",
    ]
    folder = resolve_source(str(tmp_path))
    assert len(folder.documents) == 4 and folder.local


def test_jsonl_without_text_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(LLMPruneError, match=r"bad.jsonl:1: each JSONL line needs a string field \"text\""):
        resolve_source(str(path))


def test_shakespeare_alias(plays):
    corpus = resolve_source("shakespeare")
    assert corpus.local and len(corpus.documents) == 38


@pytest.mark.parametrize("name", ["c4", "wikitext2", "allenai/c4"])
def test_hub_source_offline_suggests_a_local_path(name):
    with pytest.raises(LLMPruneError, match="use a local .txt/.md/.jsonl file or folder"):
        resolve_source(name)


def test_corpus_shorter_than_a_window(tmp_path):
    corpus = TokenizedCorpus(resolve_source(str(_numbered(tmp_path, 30))), WordIds())
    with pytest.raises(LLMPruneError, match="fewer than --seqlen 64"):
        calibration_windows(corpus, 4, 64, 0)


def test_eval_windows_rebuild_from_their_description(tmp_path):
    from llmprune.data.windows import rebuild_eval_windows

    path = _numbered(tmp_path, 2000)
    corpus = TokenizedCorpus(resolve_source(str(path)), WordIds())
    original = evaluation_windows(corpus, 16, max_windows=5, spec=str(path))
    rebuilt = rebuild_eval_windows(original.describe(), WordIds())
    assert torch.equal(rebuilt.ids, original.ids)
    path.write_text(" ".join(f"w{i + 1}" for i in range(2000)))
    with pytest.raises(LLMPruneError, match="sha256 differs"):
        rebuild_eval_windows(original.describe(), WordIds())


def test_token_file_calibration_uses_exactly_those_windows(tiny_models, corpus_file, tokenizer, tmp_path):
    from safetensors.torch import save_file

    folder = tiny_models("llama", layers=2)
    windows = calibration_windows(TokenizedCorpus(resolve_source(str(corpus_file)), tokenizer), 5, 24, 9)
    token_file = tmp_path / "windows.safetensors"
    save_file({"input_ids": windows.ids}, str(token_file))
    from_file = llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(token_file),
        no_eval=True,
        output=str(tmp_path / "a"),
        quiet=True,
    )
    from_text = llmprune.prune(
        str(folder),
        method="sparsegpt",
        calibration=str(corpus_file),
        samples=5,
        seqlen=24,
        seed=9,
        no_eval=True,
        output=str(tmp_path / "b"),
        quiet=True,
    )
    assert from_file["calibration"]["sha256"] == from_text["calibration"]["sha256"] == windows.fingerprint()
    a, b = _read_output(tmp_path / "a"), _read_output(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_token_file(tiny_models, tmp_path):
    from safetensors.torch import save_file

    from llmprune.errors import LLMPruneError

    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.full((2, 8), 10_000)}, str(bad))
    with pytest.raises(LLMPruneError, match="outside the vocabulary"):
        llmprune.prune(str(tiny_models("llama")), calibration=str(bad), no_eval=True, output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _metaspace_tokenizer(text: str):
    """A SentencePiece-style tokenizer (Metaspace, BOS and EOS added) trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_long_texts_tokenize_in_pieces_to_the_same_ids(plays, tokenizer, smollm2):
    """A corpus is tokenized in overlapping pieces (bounded memory) with exactly the ids of one call."""
    from transformers import AutoTokenizer

    from llmprune.data.windows import encode_pieces

    text = "\n\n".join(resolve_source(str(plays)).documents)[:120_000] + " naïve café — ✓ 東京\n\n  end"
    for tok in (tokenizer, AutoTokenizer.from_pretrained(smollm2), _metaspace_tokenizer(text[:50_000])):
        whole = tok(text, return_tensors="pt")["input_ids"][0]
        for piece_chars in (4_000, 9_973):
            pieces = encode_pieces(tok, text, piece_chars)
            assert pieces is not None and torch.equal(pieces, whole)
    assert whole[0] == tok.bos_token_id and whole[-1] == tok.eos_token_id  # the special tokens are stitched on
