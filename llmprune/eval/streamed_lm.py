"""lm-evaluation-harness scoring through the layer stream, for a model that does not fit in memory.

lm-eval's own Hugging Face model (HFLM) holds the whole model. `StreamedLM` scores the same requests:
lm-eval's `TemplateLM` encodes each context/continuation pair, and the truncation to the context window is
HFLM's. It then runs them through the model one decoder layer at a time, as perplexity does: every request
of a pass goes through layer 0, then layer 1, and so on, so memory holds one layer plus the pass's
activations. Loglikelihood and rolling-loglikelihood tasks work (the Wanda paper's seven, wikitext).
Generation tasks need the whole model for every new token; they are refused with a pointer to `--base-url`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import stream_folder
from llmprune.models.skeleton import build_skeleton
from llmprune.models.text import context_length, load_tokenizer

PASS_BYTES = 1 << 31  # the activations one pass holds (float32 hidden states of its requests)


class StreamedLM(TemplateLM):
    """lm-eval's model interface over llmprune's layer stream (loglikelihood tasks)."""

    def __init__(self, folder: Path, device: torch.device, batch_size: int = 8, progress: bool = False) -> None:
        super().__init__()
        self.folder, self.target, self.chunk, self.progress = folder, device, max(1, batch_size), progress
        self.tokenizer = load_tokenizer(folder)
        skeleton = build_skeleton(folder)
        self.max_length = context_length(skeleton) or 2048
        self.pass_tokens = max(1, PASS_BYTES // (4 * skeleton.config.get_text_config().hidden_size))
        # Any id pads a row on the right: a causal model never attends forward and padded scores are not read.
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As HFLM encodes: the tokenizer's own special tokens, unless the text already starts with BOS."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether it is the greedy continuation) for each request."""
        rows = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests]
        scored = [min(len(continuation), len(row) - 1) for (_, _, continuation), row in zip(requests, rows)]
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
        passes = self._passes(order, rows)
        for members in tqdm(passes, desc="lm-eval passes", unit="pass", disable=disable_tqdm or len(passes) == 1):
            width = len(rows[members[0]]) - 1
            ids = torch.full((len(members), width), self.pad, dtype=torch.long)
            targets = ids.clone()
            for position, index in enumerate(members):
                row = torch.tensor(rows[index], dtype=torch.long)
                ids[position, : len(row) - 1], targets[position, : len(row) - 1] = row[:-1], row[1:]
            stream, hidden = stream_folder(self.folder, ids, self.target, self.chunk, self.progress, "lm-eval")
            logprobs, greedy = stream.target_logprobs(hidden, targets, self.chunk)
            stream.close()
            for position, index in enumerate(members):
                end = len(rows[index]) - 1
                start = end - scored[index]
                results[index] = (float(logprobs[position, start:end].sum()), bool(greedy[position, start:end].all()))
        return results

    def _passes(self, order: list[int], rows: list[list[int]]) -> list[list[int]]:
        """Requests (longest first) grouped so that each pass, padded to its longest row, fits PASS_BYTES."""
        passes: list[list[int]] = []
        for index in order:
            if passes and (len(passes[-1]) + 1) * (len(rows[passes[-1][0]]) - 1) <= self.pass_tokens:
                passes[-1].append(index)
            else:
                passes.append([index])
        return passes

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log likelihood, over lm-eval's own disjoint rolling windows (as HFLM)."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(text)
            rolling = lm_utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append(((None, None), context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise LLMPruneError(
            "generation tasks need the whole model for every new token, which the streamed scorer does not hold: "
            "score them through a server (`llmprune serve DIR` then --base-url) or without --stream"
        )
