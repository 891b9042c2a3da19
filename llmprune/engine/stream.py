"""Stream token windows through a model one decoder layer at a time.

The stream owns the non-layer modules (embeddings, final norm, head) on the compute device, the
arguments each layer needs (caught from the model's own forward), and chunked forwards of a
layer over the activations of all windows, written back in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.engine.activations import Activations
from llmprune.engine.capture import LayerCall, catch_first_inputs, catch_layer_calls, run_tail, unwrap
from llmprune.models.skeleton import Skeleton

LOGIT_ELEMENTS = 1 << 23  # the most logits one slice of the evaluation's head computes (32 MiB in float32)


def logit_positions(windows: int, vocab: int) -> int:
    """Positions per slice of the evaluation's head, so that a slice holds at most LOGIT_ELEMENTS logits."""
    return max(1, LOGIT_ELEMENTS // max(1, windows * vocab))


REST_LEVELS = ("rows", "embeddings", "all")  # what of the non-layer modules is loaded, each covering the last


class LayerStream:
    """One model, one set of token windows, streamed layer by layer."""

    def __init__(
        self,
        skeleton: Skeleton,
        device: torch.device,
        compute_dtype: torch.dtype,
        batch_size: int,
        act_device: torch.device | None = None,
        act_dtype: torch.dtype | None = None,
        forward_dtype: torch.dtype | None = None,
    ) -> None:
        self.sk = skeleton
        self.device = device
        self.dtype = compute_dtype
        self.forward_dtype = forward_dtype or compute_dtype  # lower: layer calls run under autocast
        self.batch_size = max(1, batch_size)
        self.act_device = act_device or device
        self.act_dtype = act_dtype or compute_dtype
        self.ids: torch.Tensor | None = None
        self._first_calls: dict[int, LayerCall] = {}
        self._calls: dict[int, list[LayerCall]] = {}
        self._example: Any = None  # output structure of a real layer (tensor or tuple)
        self._rest_loaded: str | None = None  # None, "rows" (the ids' rows, no head), "embeddings" or "all"

    def _ensure_rest(self, head: bool = False) -> None:
        """The non-layer modules on the device; the head only when a loss or logits need it (an untied head
        is as large as the embeddings and the forward through the layers never uses it)."""
        want = "all" if head else "rows" if self._rows_only() else "embeddings"
        if self._rest_loaded is not None and REST_LEVELS.index(self._rest_loaded) >= REST_LEVELS.index(want):
            return  # what is loaded covers what is wanted
        if self._rest_loaded is not None:
            self.sk.unload_rest()
        rows = torch.unique(self.ids) if want == "rows" else None
        self.sk.load_rest(self.device, self.dtype, head=head, rows=rows)
        self._rest_loaded = want

    def _rows_only(self) -> bool:
        """On a CPU, the forward through the layers reads only the embedding rows of the windows' ids (the
        table's other pages are never touched, so never resident): a 151936-row table costs the rows used."""
        return self.device.type == "cpu" and self.ids is not None

    def begin(self, ids: torch.Tensor, spill_to: Path | None = None) -> Activations:
        """Hidden states entering layer 0 for every window, in chunks of batch_size windows on act_device
        (or written to `spill_to` as they are computed)."""
        self.ids = ids
        self._ensure_rest()
        acts = Activations([], spill_to)
        with torch.no_grad():
            for start in range(0, ids.shape[0], self.batch_size):
                chunk = ids[start : start + self.batch_size].to(self.device)
                hidden, call = catch_first_inputs(self.sk.model, self.sk.layers, chunk)
                self._first_calls.setdefault(chunk.shape[0], call)
                acts.chunks.append(None)
                acts.put(len(acts.chunks) - 1, hidden.to(self.act_device, self.act_dtype))
        return acts

    def attach(self, ids: torch.Tensor) -> None:
        """Use `ids` for argument capture without computing layer-0 inputs (a resumed run has them)."""
        self.ids = ids
        self._ensure_rest()

    def prepare(self, sizes: set[int]) -> None:
        """Catch every layer's arguments for these chunk sizes now, then free the non-layer modules.

        (Embeddings and head are only needed again for the loss at the end.)
        """
        if self._example is None:
            self._probe_output_format()
        for size in sorted(sizes):
            self.call(1 if len(self.sk.layers) > 1 else 0, size)
        self.close()

    def call(self, index: int, size: int) -> LayerCall:
        """Non-hidden arguments of layer `index` for a chunk of `size` windows."""
        assert self.ids is not None, "begin() or attach() first"
        if self._example is None:
            if index == 0:
                if size not in self._first_calls:
                    self._ensure_rest()
                    _, self._first_calls[size] = catch_first_inputs(
                        self.sk.model, self.sk.layers, self.ids[:size].to(self.device)
                    )
                return self._first_calls[size]
            self._probe_output_format()
        if size not in self._calls:
            self._ensure_rest()
            with torch.no_grad():
                self._calls[size] = catch_layer_calls(
                    self.sk.model, self.sk.layers, self.ids[:size].to(self.device), self._example
                )
        return self._calls[size][index]

    def _probe_output_format(self) -> None:
        """Learn whether layers return a tensor or a tuple by running layer 0 on one window."""
        self._ensure_rest()
        was_meta = any(p.is_meta for p in self.sk.layers[0].parameters())
        layer = self.sk.load_layer(0, self.device, self.dtype) if was_meta else self.sk.layers[0]
        with torch.no_grad():
            hidden, (rest, kwargs) = catch_first_inputs(self.sk.model, self.sk.layers, self.ids[:1].to(self.device))
            self._note_output(layer(hidden, *rest, **kwargs))
        if was_meta:
            self.sk.unload_layer(0)

    def _note_output(self, output: Any) -> None:
        if self._example is None:
            self._example = tuple([None] * len(output)) if isinstance(output, (tuple, list)) else torch.empty(0)

    def run(self, index: int, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer `index` on one chunk of hidden states (moved to the compute device).

        With a forward dtype below the compute dtype, the layer runs under autocast: its matmuls and
        attention in that dtype, its weights untouched (the solves and the saved tensors keep them)."""
        rest, kwargs = self.call(index, x.shape[0])
        lower = self.forward_dtype != self.dtype
        with torch.autocast(self.device.type, dtype=self.forward_dtype, enabled=lower):
            output = layer(x.to(self.device, self.dtype), *rest, **kwargs)
        self._note_output(output)
        return unwrap(output)

    def forward(self, index: int, layer: nn.Module, acts: Activations) -> Activations:
        """Layer `index` over every chunk; each chunk is replaced by its output (inputs freed as we go)."""
        with torch.no_grad():
            for position in range(len(acts)):
                chunk = acts.take(position)
                output = self.run(index, layer, chunk).to(self.act_device, self.act_dtype)
                del chunk
                acts.put(position, output)
        return acts

    def nll(self, acts: Activations, batch: int = 1) -> tuple[float, int]:
        """Summed next-token negative log-likelihood and token count, through the model's own head.

        The head and the loss run over slices of each window's positions (the model's own tail, with
        `logits_to_keep` naming the slice), so the logits held at once are at most LOGIT_ELEMENTS, not a
        window's seqlen x vocab."""
        assert self.ids is not None
        self._ensure_rest(head=True)
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, acts.count, batch):
                ids = self.ids[start : start + batch].to(self.device)
                last = acts.windows(start, start + batch).to(self.device, self.dtype)
                positions = ids.shape[1] - 1
                step = logit_positions(ids.shape[0], self.vocab)
                for first in range(0, positions, step):
                    keep = torch.arange(first, min(first + step, positions), device=self.device)
                    logits = run_tail(
                        self.sk.model, self.sk.layers, ids, last, self._example, logits_to_keep=keep
                    ).logits
                    labels = ids[:, keep + 1]
                    loss = torch.nn.functional.cross_entropy(
                        logits.float().flatten(0, 1), labels.flatten(), reduction="sum"
                    )
                    total += float(loss.double())
                    del logits
                tokens += ids.shape[0] * positions
        return total, tokens

    def target_logprobs(self, acts: Activations, targets: torch.Tensor, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """For each window and position p, log P(targets[:, p] | ids[:, :p + 1]) (float64) and whether that token
        is the argmax (bool): a scorer's view of the head, sliced like `nll` so few logits are held at once."""
        assert self.ids is not None
        self._ensure_rest(head=True)
        logprobs = torch.zeros(targets.shape, dtype=torch.float64)
        greedy = torch.zeros(targets.shape, dtype=torch.bool)
        with torch.no_grad():
            for start in range(0, acts.count, batch):
                ids = self.ids[start : start + batch].to(self.device)
                wanted = targets[start : start + batch].to(self.device)
                last = acts.windows(start, start + batch).to(self.device, self.dtype)
                step = logit_positions(ids.shape[0], self.vocab)
                for first in range(0, ids.shape[1], step):
                    keep = torch.arange(first, min(first + step, ids.shape[1]), device=self.device)
                    logits = run_tail(
                        self.sk.model, self.sk.layers, ids, last, self._example, logits_to_keep=keep
                    ).logits.float()
                    token = wanted[:, keep]
                    chosen = logits.log_softmax(-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
                    logprobs[start : start + batch, first : first + len(keep)] = chosen.double().cpu()
                    greedy[start : start + batch, first : first + len(keep)] = (logits.argmax(-1) == token).cpu()
                    del logits
        return logprobs, greedy

    @property
    def vocab(self) -> int:
        return int(self.sk.config.get_text_config().vocab_size)

    def loss(self, ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's mean next-token loss for `ids` given the last layer's outputs (differentiable)."""
        self._ensure_rest(head=True)
        return run_tail(self.sk.model, self.sk.layers, ids, last_hidden, self._example, labels=ids).loss

    def logits(self, acts: Activations) -> torch.Tensor:
        """Logits for all windows (small inputs only: tests and spot checks)."""
        assert self.ids is not None
        self._ensure_rest(head=True)
        last = acts.to_tensor().to(self.device, self.dtype)
        with torch.no_grad():
            output = run_tail(self.sk.model, self.sk.layers, self.ids.to(self.device), last, self._example)
        return output.logits.float().cpu()

    def close(self) -> None:
        """Free the non-layer modules."""
        if self._rest_loaded is not None:
            self.sk.unload_rest()
            self._rest_loaded = None


def open_stream(
    skeleton: Skeleton,
    ids: torch.Tensor,
    device: torch.device,
    chunk: int,
    act_device: torch.device | None = None,
    spill_to: Path | None = None,
    dtype: torch.dtype | None = None,
    act_dtype: torch.dtype | None = None,
    forward_dtype: torch.dtype | None = None,
) -> tuple[LayerStream, Activations]:
    """A stream over `ids` in `dtype` (default: the compute dtype for `device`), with the layer-0 inputs and every
    layer's arguments caught (then the embeddings and head are freed until a loss needs them)."""
    from llmprune.engine.devices import compute_dtype

    dtype = dtype or compute_dtype(device, skeleton.dtype)
    stream = LayerStream(skeleton, device, dtype, chunk, act_device, act_dtype, forward_dtype)
    acts = stream.begin(ids, spill_to=spill_to)
    stream.prepare({int(c.shape[0]) for c in acts.chunks} | {1})
    return stream, acts
