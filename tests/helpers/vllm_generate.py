"""Greedy continuations from vLLM, in one long-lived engine process shared by the whole test session.

`greedy()` sends each request (a model folder, a dtype, prompts) to a worker process running this file with
`--serve`, started on first use: importing vLLM costs far more than starting one of its engines on a tiny
model, so the suite pays the import once. The worker builds one engine per request and tears it down before
the next (vLLM's own `cleanup_dist_env_and_memory`), answering one line `RESULT [[token ids], ...]` (or
`ERROR ...`, after which it exits and the next request starts a fresh worker). vLLM runs in its own process
because it changes process-wide torch settings. As a script with arguments, `python
tests/helpers/vllm_generate.py FOLDER DTYPE MAX_TOKENS PROMPTS_JSON`, it answers one request and exits.

enforce_eager skips compilation; the CPU backend's memory check wants a small utilisation fraction on a shared
24 GiB machine, and the KV cache is capped at 1 GiB.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_worker: subprocess.Popen | None = None
_worker_log = None


def transformers_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The same greedy continuations from a stock transformers model, the reference vLLM's must equal."""
    import torch

    return [
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids) :].tolist()
        for ids in prompts
    ]


def _stop_worker() -> None:
    global _worker
    if _worker is not None and _worker.poll() is None:
        _worker.stdin.close()
        try:
            _worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _worker.kill()
    _worker = None


def _start_worker() -> subprocess.Popen:
    global _worker, _worker_log
    _worker_log = tempfile.NamedTemporaryFile(prefix="vllm-worker-", suffix=".log", delete=False)
    _worker = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=_worker_log,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    atexit.register(_stop_worker)
    return _worker


def greedy(
    folder: Path, prompts: list[list[int]], dtype: str, new_tokens: int, timeout: float = 400, ignore_eos: bool = False
) -> list[list[int]]:
    """Greedy token ids from a vLLM engine on `folder`, built in the shared worker process (`ignore_eos`: always
    `new_tokens` of them, for a check of each token against a reference rather than of where the text ends)."""
    worker = _worker if _worker is not None and _worker.poll() is None else _start_worker()
    request = {
        "folder": str(folder),
        "dtype": dtype,
        "tokens": new_tokens,
        "prompts": prompts,
        "ignore_eos": ignore_eos,
    }
    worker.stdin.write(json.dumps(request))
    worker.stdin.write("\n")
    worker.stdin.flush()
    answer: list[str] = []

    def read() -> None:  # vLLM logs on stdout too: the answer is the first RESULT or ERROR line (or EOF)
        for line in worker.stdout:
            if line.startswith(("RESULT ", "ERROR ")):
                answer.append(line)
                return
        answer.append("")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    line = answer[0] if answer else ""
    if not line.startswith("RESULT "):
        _stop_worker() if answer else worker.kill()
        log = Path(_worker_log.name).read_text(errors="replace")[-3000:]
        raise AssertionError(f"vLLM worker gave {line.strip()!r} for {folder}\n{log}")
    return json.loads(line.removeprefix("RESULT "))


def _generate(
    folder: str, dtype: str, max_tokens: int, prompts: list[list[int]], ignore_eos: bool = False
) -> list[list[int]]:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.2, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    generated = [list(out.outputs[0].token_ids) for out in outputs]
    del llm, outputs
    gc.collect()
    cleanup_dist_env_and_memory()
    return generated


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if sys.argv[1:] != ["--serve"]:
        folder, dtype, max_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
        print("RESULT " + json.dumps(_generate(folder, dtype, max_tokens, prompts)), flush=True)
        return
    for line in sys.stdin:
        request = json.loads(line)
        try:
            generated = _generate(
                request["folder"],
                request["dtype"],
                request["tokens"],
                request["prompts"],
                request.get("ignore_eos", False),
            )
        except Exception as exc:
            print(f"ERROR {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}", flush=True)
            raise
        print("RESULT " + json.dumps(generated), flush=True)


if __name__ == "__main__":
    main()
