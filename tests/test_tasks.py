"""Task accuracy through lm-evaluation-harness: `llmprune eval --tasks` on a folder, the layer-by-layer scorer,
and `--eval-tasks` / `--max-acc-drop` in a prune run. Offline: the task is tests/data/tasks/shakespeare_cloze
(YAML + JSONL). lm-eval's `local-completions` client against a running server (both engines) is tested in
test_serve.py, on the servers that module starts anyway."""

from __future__ import annotations

import json
import shutil

import pytest

import llmprune
from llmprune.cli import main
from llmprune.eval.tasks import task_manager
from llmprune.export.card import read_front_matter
from llmprune.export.gate import quality_gate
from tests.helpers.serving import ROOT

TASKS = ROOT / "tests" / "data" / "tasks"
TASK = "shakespeare_cloze"


def _eval_json(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--tasks", TASK, "--include-path", str(TASKS), "--quiet", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_run(tiny_models, corpus_file, tmp_path_factory):
    """Magnitude 50% on a tiny Llama with --eval-tasks (20 documents) and a generous accuracy gate."""
    model = tiny_models("llama", layers=2, hidden=128, inter=256)
    out = tmp_path_factory.mktemp("tasks") / "tiny"
    common = dict(calibration=str(corpus_file), samples=4, seqlen=64, eval_samples=4, quiet=True)
    report = llmprune.prune(
        str(model),
        method="magnitude",
        sparsity=0.5,
        output=str(out),
        eval_tasks=TASK,
        eval_tasks_path=str(TASKS),
        eval_tasks_limit=20,
        max_acc_drop=1.0,
        **common,
    )
    return model, out, report


def test_prune_scores_dense_and_pruned_tasks(tiny_run, capsys):
    """--eval-tasks records both models' accuracy, equal to `llmprune eval --tasks` on each folder; the card
    has the table and the Hub model-index (perplexity and accuracy, from huggingface_hub's EvalResult)."""
    model, out, report = tiny_run
    result = report["tasks"]["results"][TASK]
    assert result["metric"] == "acc" and result["samples"] == 20 and report["tasks"]["limit"] == 20
    for folder, which in ((model, "dense"), (out, "pruned")):
        alone = _eval_json(capsys, str(folder), "--limit", "20")["tasks"][TASK]
        assert alone["accuracy"] == pytest.approx(result[which], abs=1e-9)
    assert report["quality_gate"]["passed"] and "every task within an accuracy drop" in report["quality_gate"]["reason"]
    card = (out / "README.md").read_text()
    assert "## Task accuracy" in card and f"| {TASK} | acc |" in card
    metrics = {
        m["type"]: m["value"]
        for entry in read_front_matter(card)["model-index"][0]["results"]
        for m in entry["metrics"]
    }
    assert metrics["acc"] == pytest.approx(result["pruned"])
    assert metrics["perplexity"] == pytest.approx(report["perplexity"]["pruned"])


def test_accuracy_gate_fails_on_a_drop_above_the_limit(tiny_run):
    _, _, report = tiny_run
    tasks = {"results": {"a": {"dense": 0.60, "pruned": 0.50}, "b": {"dense": 0.4, "pruned": 0.41}}}
    ppl = report["perplexity"]
    failed = quality_gate(ppl, float("inf"), tasks, max_acc_drop=0.05)
    assert failed["passed"] is False and "accuracy drops above 0.050: a +0.100" in failed["reason"]
    passed = quality_gate(ppl, float("inf"), tasks, max_acc_drop=0.1)
    assert passed["passed"] is True and passed["max_acc_drop"] == 0.1
    assert quality_gate(ppl, float("inf"), tasks)["passed"] is True  # no --max-acc-drop: perplexity alone


def test_bad_task_flags_are_one_line(tiny_run, capsys, tmp_path):
    model, _, _ = tiny_run
    cases = {
        "unknown task": (["eval", str(model), "--tasks", "no_such_task"], "unknown lm-eval task(s): no_such_task"),
        "limit without tasks": (["eval", str(model), "--limit", "3"], "--limit is for task accuracy"),
        "perplexity flag with tasks": (
            ["eval", str(model), "--tasks", TASK, "--include-path", str(TASKS), "--seqlen", "64"],
            "--seqlen is for perplexity",
        ),
        "gate without tasks": ([str(model), "--max-acc-drop", "0.1", "--no-eval"], "--max-acc-drop needs --eval-tasks"),
        "task path missing": (
            [str(model), "--eval-tasks", TASK, "--eval-tasks-path", str(tmp_path / "nope"), "--no-eval"],
            "no such folder",
        ),
    }
    for case, (argv, message) in cases.items():
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("llmprune: error: ") and message in err and err.count("\n") == 1, (case, err)


def test_tasks_in_the_include_path_are_indexed_alone(tmp_path):
    """A plain task found in the include path is loaded from an index of that folder alone; a group there (which
    may name lm-eval's own tasks) gets lm-eval's whole index."""
    assert set(task_manager([TASK], str(TASKS)).all_tasks) == {TASK}
    shutil.copytree(TASKS / TASK, tmp_path / TASK)
    (tmp_path / "cloze_group.yaml").write_text(f"group: cloze_group\ntask:\n  - {TASK}\n")
    whole = task_manager(["cloze_group"], str(tmp_path))
    assert {"cloze_group", TASK, "arc_easy"} <= set(whole.all_tasks)


@pytest.mark.slow
def test_a_real_model_beats_chance_on_the_task(smollm2, capsys):
    """The embedded task measures something: SmolLM2-135M beats chance (4 choices) on its 60 lines."""
    local = _eval_json(capsys, str(smollm2))["tasks"][TASK]
    assert local["samples"] == 60 and local["accuracy"] > 0.25


def test_streamed_scorer_gives_hflms_loglikelihoods(tiny_run, corpus_file, capsys):
    """The layer-by-layer scorer answers lm-eval's requests as lm-eval's own HFLM on the whole model does:
    loglikelihoods (to float32 rounding) and greedy flags, with an empty context, and rolling windows over
    a text longer than the model's context; `llmprune eval --tasks --stream` scores the task as HFLM did."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llmprune.eval.streamed_lm import StreamedLM

    _, out, _ = tiny_run
    text = corpus_file.read_text()
    pairs = [(text[i : i + 200], text[i + 200 : i + 200 + n]) for i, n in ((0, 9), (700, 30), (1500, 3), (2100, 60))]
    pairs.append(("", text[:40]))
    hf = HFLM(pretrained=str(out), dtype="float32", batch_size=2, device="cpu", max_length=128)
    streamed = StreamedLM(out, torch.device("cpu"), batch_size=2)
    streamed.max_length = 128  # below the model's context, so that the rolling text spans several windows
    asks = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected, got = hf.loglikelihood(asks, disable_tqdm=True), streamed.loglikelihood(asks, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in expected], rel=1e-4, abs=1e-3)
    rolling = [Instance("loglikelihood_rolling", {}, (text[:3000],), 0)]
    assert streamed.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(rolling, disable_tqdm=True), rel=1e-4
    )
    _, _, report = tiny_run
    scored = _eval_json(capsys, str(out), "--limit", "20", "--stream")
    assert scored["backend"] == "streamed" and scored["tasks"][TASK]["samples"] == 20
    assert scored["tasks"][TASK]["accuracy"] == pytest.approx(report["tasks"]["results"][TASK]["pruned"], abs=1e-9)
