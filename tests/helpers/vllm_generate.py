"""Greedy continuations from vLLM: `greedy()` runs this file by its path, `python tests/helpers/vllm_generate.py
FOLDER DTYPE MAX_TOKENS PROMPTS_JSON` (the tests call it; as a script it imports nothing of tests/).

One engine in its own process (vLLM changes process-wide torch settings); it prints one line
`RESULT [[token ids], ...]`. enforce_eager skips compilation; the CPU backend's memory check wants a
small utilisation fraction on a shared 24 GiB machine, and the KV cache is capped at 1 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def transformers_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The same greedy continuations from a stock transformers model, the reference vLLM's must equal."""
    import torch

    return [
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)[0, len(ids) :].tolist()
        for ids in prompts
    ]


def greedy(folder: Path, prompts: list[list[int]], dtype: str, new_tokens: int) -> list[list[int]]:
    """Greedy token ids from one vLLM engine started in a subprocess running this file."""
    proc = subprocess.run(
        [sys.executable, __file__, str(folder), dtype, str(new_tokens), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    return json.loads(results[0].removeprefix("RESULT "))


def main() -> None:
    folder, dtype, max_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=folder, dtype=dtype, enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.2, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps([list(out.outputs[0].token_ids) for out in outputs]), flush=True)


if __name__ == "__main__":
    main()
