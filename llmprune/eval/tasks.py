"""Task accuracy through lm-evaluation-harness (the `lm_eval` package, `pip install 'llmprune[eval]'`).

A folder is scored in process by lm-eval's own Hugging Face model (float32 on a CPU, as llmprune's
perplexity), which holds the whole model, or, when the model does not fit the device's free memory (or with
`stream=True`), by `StreamedLM`, which runs the requests through one decoder layer at a time. A running
`llmprune serve` (or `vllm serve`, tensor-parallel across GPUs if need be) is scored through lm-eval's
`local-completions` client, which sends `echo` and `logprobs` as any OpenAI-compatible server takes them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from llmprune.errors import LLMPruneError
from llmprune.models import remote_code
from llmprune.settings import require_lm_eval

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)
METRICS = ("acc", "acc_norm", "exact_match")  # the first a task reports is its accuracy


def task_accuracy(
    folder: Path,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    model_name: str | None = None,
    stream: bool | None = None,
    manager: TaskManager | None = None,
) -> dict:
    """Accuracy of each task on the model in `folder` (or served at `base_url`, tokenized with the folder's
    tokenizer), with lm-eval's standard error: {"tasks": {name: {"metric", "accuracy", "stderr", "samples"}}}.
    `stream`: score layer by layer (None: only when the whole model does not fit the device's free memory).
    `manager`: a `task_manager` already built for these tasks (a prune run scores two models)."""
    require_lm_eval()
    import lm_eval

    if manager is None:
        manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {include_path})" if include_path else " (a local task needs --include-path DIR)"
        raise LLMPruneError(f"unknown lm-eval task(s): {', '.join(unknown)}{where}")
    if base_url:
        if stream:
            raise LLMPruneError("--stream scores a folder layer by layer; a server (--base-url) scores on its own")
        lm, backend = _server_model(folder, base_url, api_key, model_name, batch_size), "server"
    else:
        lm, backend = _local_model(folder, device, batch_size, stream)
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except Exception as exc:  # a dataset that cannot be fetched offline, a server that refuses...
        raise LLMPruneError(f"lm-evaluation-harness failed on {', '.join(tasks)}: {exc}") from exc
    results = {}
    for task in tasks:
        scores = output["results"].get(task, {})
        metric = next((m for m in METRICS if f"{m},none" in scores), None)
        if metric is None:
            raise LLMPruneError(f"lm-eval task {task} reports none of {', '.join(METRICS)}: {sorted(scores)}")
        results[task] = {
            "metric": metric,
            "accuracy": float(scores[f"{metric},none"]),
            "stderr": _number(scores.get(f"{metric}_stderr,none")),
            "samples": int(output.get("n-samples", {}).get(task, {}).get("effective", 0)) or None,
        }
    return {
        "tasks": results,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "backend": backend,
        "lm_eval_version": lm_eval.__version__,
    }


def task_manager(tasks: list[str], include_path: str | None = None) -> TaskManager:
    """lm-eval's index of the tasks it can load. Indexing lm-eval's own task configs (about 15,000) takes 20-40 s
    on a small machine, so when every task asked for is a plain task in `include_path` (which takes precedence
    over lm-eval's own anyway) only that folder is indexed; a group or tag there, which may name lm-eval's own
    tasks, and any task not there get the whole index. Built per call, never cached in the process: a service
    worker runs many jobs, and a task's YAML may change between them."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        entries = [local.task_index.get(task) for task in tasks]
        if all(entry is not None and entry.kind.name == "TASK" for entry in entries):
            return local
    return TaskManager(include_path=include_path)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return None


def _local_model(folder: Path, device: str, batch_size: int | None, stream: bool | None) -> tuple[object, str]:
    """lm-eval's HFLM on the whole model, or the streamed scorer when asked or when the model does not fit."""
    from lm_eval.models.huggingface import HFLM

    from llmprune.engine.devices import available_memory, compute_dtype, resolve_device
    from llmprune.models.skeleton import build_skeleton

    dev = resolve_device(device)
    skeleton = build_skeleton(folder)
    weights = compute_dtype(dev, skeleton.dtype)
    if stream is None:
        need = sum(p.numel() for p in skeleton.model.parameters()) * weights.itemsize
        stream = need > 0.8 * available_memory(dev)
        if stream:
            log.info(
                "the model needs %.1f GiB, over 80%% of %s's free memory: scoring it layer by layer", need / 2**30, dev
            )
    if stream:
        from llmprune.eval.streamed_lm import StreamedLM

        return StreamedLM(folder, dev, batch_size or 8), "streamed"
    dtype = str(weights).removeprefix("torch.")
    trust = remote_code.allowed(folder)
    lm = HFLM(pretrained=str(folder), dtype=dtype, batch_size=batch_size or 8, device=str(dev), trust_remote_code=trust)
    return lm, "transformers"


def _server_model(folder: Path, base_url: str, api_key: str | None, model_name: str | None, batch_size: int | None):
    """lm-eval's local-completions client: `batch_size` prompts per request (default 8), which the server
    batches (continuous batching on vLLM)."""
    import httpx
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    root = base_url.rstrip("/").removesuffix("/v1/completions").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model_name is None:
        try:
            model_name = httpx.get(f"{root}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise LLMPruneError(f"no model listed at {root}/v1/models: {exc}") from exc
    return LocalCompletionsAPI(
        header=headers or None,
        base_url=f"{root}/v1/completions",
        model=model_name,
        tokenizer=str(folder),
        tokenizer_backend="huggingface",
        trust_remote_code=remote_code.allowed(folder),
        batch_size=batch_size or 8,
        num_concurrent=1,
        max_retries=2,
    )
