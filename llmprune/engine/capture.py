"""Catch what each decoder layer receives, for any Hugging Face decoder-only model.

The model's own forward runs with its decoder layers swapped for stand-ins, so embeddings, position
ids, rotary embeddings, masks and per-layer arguments (sliding vs full attention) are computed by
the model itself, exactly as in a normal forward. Nothing here knows an architecture by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LayerCall = tuple[tuple, dict[str, Any]]  # positional args after hidden_states, keyword args


class StopForward(Exception):
    """Raised by a stand-in to end the model's forward early."""


class StandIn(nn.Module):
    """Takes a decoder layer's place; reads through to the original for attributes the model loop uses."""

    def __init__(self, original: nn.Module, index: int, on_call: Callable) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_on_call", on_call)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        return self._on_call(self._index, hidden, rest, kwargs)


def with_stand_ins(model: nn.Module, layers: nn.ModuleList, on_call: Callable, **inputs) -> Any:
    """Run model(**inputs) with every decoder layer replaced by a StandIn calling on_call."""
    originals = list(layers)
    for index, layer in enumerate(originals):
        layers[index] = StandIn(layer, index, on_call)
    try:
        return model(**inputs)
    except StopForward:
        return None
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


def unwrap(output: Any) -> torch.Tensor:
    """A decoder layer's hidden-state output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def pass_through_like(example: Any, hidden: torch.Tensor) -> Any:
    """Format `hidden` the way the real layer formats its output (tensor, or tuple with extras)."""
    if isinstance(example, (tuple, list)):
        return (hidden,) + (None,) * (len(example) - 1)
    return hidden


def catch_first_inputs(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor
) -> tuple[torch.Tensor, LayerCall]:
    """Hidden states entering layer 0 for `input_ids`, plus layer 0's other arguments."""
    caught: dict[str, Any] = {}

    def on_call(index: int, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> None:
        caught["hidden"], caught["call"] = hidden, (rest, kwargs)
        raise StopForward

    with_stand_ins(model, layers, on_call, input_ids=input_ids, use_cache=False)
    return caught["hidden"], caught["call"]


def catch_layer_calls(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, example_output: Any
) -> list[LayerCall]:
    """Every decoder layer's non-hidden arguments (they may differ per layer, e.g. sliding windows)."""
    calls: list[LayerCall] = []
    last = len(layers) - 1

    def on_call(index: int, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        calls.append((rest, kwargs))
        if index == last:
            raise StopForward
        return pass_through_like(example_output, hidden)

    with_stand_ins(model, layers, on_call, input_ids=input_ids, use_cache=False)
    if len(calls) != len(layers):
        raise RuntimeError(f"model called {len(calls)} of its {len(layers)} decoder layers")
    return calls


def run_tail(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    last_hidden: torch.Tensor,
    example_output: Any,
    **inputs,
) -> Any:
    """Run the model's own tail (final norm, head, soft-capping, loss) on given last-layer outputs.

    Embeddings are recomputed (cheap); every layer passes its input through, and the last one
    returns `last_hidden` instead. Pass labels=input_ids for the model's shifted LM loss.
    """
    last = len(layers) - 1

    def on_call(index: int, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> Any:
        return pass_through_like(example_output, last_hidden if index == last else hidden)

    return with_stand_ins(model, layers, on_call, input_ids=input_ids, use_cache=False, **inputs)
