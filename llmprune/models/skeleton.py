"""A model skeleton on the meta device whose decoder layers are loaded from the shards one at a time.

Parameters start on `meta` (no memory); buffers such as rotary frequencies are real, because they
are computed at construction and are not in the checkpoint. Only the modules outside the decoder
layers (embeddings, final norm, head) and the one layer being processed are ever materialized.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from torch import nn

from llmprune.errors import LLMPruneError
from llmprune.models.checkpoint import Checkpoint
from llmprune.models.compressed import CompressedCheckpoint, open_checkpoint
from llmprune.models.fused import FusedTensor, FusedView, collect_fused, stacks_experts
from llmprune.models.remote_code import allowed
from llmprune.stop import stop_point

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass
class Skeleton:
    """A meta-device causal LM plus what the engine needs to know about its layout."""

    folder: Path
    config: PretrainedConfig
    model: PreTrainedModel
    layers: nn.ModuleList
    layers_prefix: str
    checkpoint: Checkpoint
    dtype: torch.dtype
    key_map: dict[str, str]  # model state-dict name -> checkpoint name

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_keys(self, index: int) -> list[str]:
        """State-dict names (model naming) of decoder layer `index`."""
        prefix = f"{self.layers_prefix}.{index}."
        return [k for k in self.key_map if k.startswith(prefix)]

    def layer_tensors(self, index: int, layer: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Materialized layer `index`'s tensors that the checkpoint holds (no buffer it lacks), by model name, on
        the CPU, the floating ones in `dtype`: what an output's layer unit is written from."""
        prefix = f"{self.layers_prefix}.{index}."
        return {
            prefix + k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
            for k, v in layer.state_dict().items()
            if prefix + k in self.key_map
        }

    def layer_parameters(self, index: int) -> int:
        """How many values decoder layer `index` stores, from the shard headers alone."""
        return sum(math.prod(self.checkpoint.metadata(self.key_map[key])[1]) for key in self.layer_keys(index))

    def stored(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors named as the model names them, renamed as the source checkpoint stores them where the two
        differ in kind: a model with fused experts gets each fused parameter split per expert (renumbered 0 ..
        n-1) and every name as the checkpoint spells it, which is what vLLM loads. Others keep the model's names."""
        if not isinstance(self.checkpoint, FusedView):
            return tensors
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key in self.checkpoint.fused:
                out.update(self.checkpoint.split(key, value))
            else:
                out[self.key_map.get(key, key)] = value
        return out

    def rest_keys(self) -> list[str]:
        """State-dict names outside the decoder layers (embeddings, final norm, head)."""
        prefix = f"{self.layers_prefix}."
        return [k for k in self.key_map if not k.startswith(prefix)]

    def read(self, keys: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read tensors by model name from the shards."""
        raw = self.checkpoint.read([self.key_map[k] for k in keys], device)
        return {k: raw[self.key_map[k]] for k in keys}

    def load_layer(
        self, index: int, device: torch.device | str, dtype: torch.dtype, replace: dict | None = None
    ) -> nn.Module:
        """Materialize decoder layer `index` from the shards on `device` in `dtype`; `replace` maps state-dict
        names to tensors that stand in for the shards' (a refit weight). A requested stop (llmprune.stop) is
        honoured here, at the boundary every layer loop passes."""
        stop_point(f"layer {index} of {self.num_layers}")
        layer = self.layers[index]
        prefix = f"{self.layers_prefix}.{index}."
        tensors = self.read(self.layer_keys(index), device)
        tensors.update({k: v.to(device) for k, v in (replace or {}).items() if k.startswith(prefix)})
        for name, tensor in tensors.items():
            _assign(layer, name[len(prefix) :], cast_floating(tensor, dtype))
        layer.to(device)
        return layer

    def unload_layer(self, index: int) -> None:
        """Return layer `index`'s parameters to the meta device so their memory is freed."""
        _move_except(self.layers[index], None, "meta")

    @property
    def tied(self) -> bool:
        """Whether the head shares the input embedding's matrix."""
        return bool(getattr(self.config.get_text_config(), "tie_word_embeddings", False))

    def head_key(self) -> str | None:
        """State-dict name of the output embedding (head) weight, or None if the model has no head."""
        output = self.model.get_output_embeddings()
        return next((f"{name}.weight" for name, module in self.model.named_modules() if module is output), None)

    def resident_rest_keys(self, head: bool = True) -> list[str]:
        """The rest_keys that are held in memory: a tied head's own copy in the checkpoint is never read
        (the head is the embedding matrix, held once), and an untied head only when `head`."""
        skip = self.head_key() if self.tied or not head else None
        return [k for k in self.rest_keys() if k != skip]

    def embedding_key(self) -> str | None:
        """State-dict name of the input embedding table."""
        embed = self.model.get_input_embeddings()
        return next((f"{name}.weight" for name, module in self.model.named_modules() if module is embed), None)

    def load_rest(
        self, device: torch.device | str, dtype: torch.dtype, head: bool = True, rows: torch.Tensor | None = None
    ) -> None:
        """Materialize everything outside the decoder layers (embeddings, norms and, if `head`, the head;
        a tied head is the embedding matrix, held once). With `rows` (CPU, no head) only those rows of the
        input embedding table are read: lookups of other ids would see garbage, so pass every id used."""
        keys = self.resident_rest_keys(head)
        table = self.embedding_key() if rows is not None else None
        if table is not None:
            if head or torch.device(device).type != "cpu":
                raise LLMPruneError("a partial embedding table is for CPU forwards without the head")
            raw = self.checkpoint.read_rows(self.key_map[table], rows, dtype)
            _assign(self.model, table, raw)
            keys = [k for k in keys if k != table]
        tensors = self.read(keys, device)
        for name, tensor in tensors.items():
            _assign(self.model, name, cast_floating(tensor, dtype))
        output = self.model.get_output_embeddings()
        if output is not None and output.weight.is_meta and (head or self.tied):
            embed = self.model.get_input_embeddings()
            if not self.tied or embed is None:
                raise LLMPruneError("checkpoint has no output-embedding (lm_head) weight and the model does not tie it")
            output.weight = embed.weight
        skipped = None if head or self.tied else self.head_key()
        for name, param in self.model.named_parameters():
            if param.is_meta and not name.startswith(self.layers_prefix + ".") and name != skipped:
                raise LLMPruneError(f"checkpoint {self.folder} has no tensor for {name}")
        _move_except(self.model, self.layers, device)

    def unload_rest(self) -> None:
        """Free the non-layer modules (embeddings, head)."""
        _move_except(self.model, self.layers, "meta")


def _move_except(module: nn.Module, skip: nn.Module | None, device: torch.device | str) -> None:
    """Move parameters (and, unless to meta, buffers) of `module` except those under `skip`.

    Buffers never go to meta: non-persistent ones (rotary frequencies) are not in the checkpoint. A
    parameter left on meta (an untied head not loaded) stays there.
    """
    if module is skip:
        return
    for child in module.children():
        _move_except(child, skip, device)
    for key, param in module._parameters.items():
        if param is not None and param.device != torch.device(device) and not (param.is_meta and device != "meta"):
            module._parameters[key] = nn.Parameter(param.to(device), requires_grad=False)
    for key, buf in module._buffers.items():
        if buf is not None and device != "meta":
            module._buffers[key] = buf.to(device)


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype` if it is floating point (integer buffers keep theirs)."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted) of `root` with `tensor`."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        module = getattr(module, part)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise LLMPruneError(f"model has no parameter {name}")


def find_decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers: the largest one of length num_hidden_layers."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers > 0
    ]
    if not candidates:
        raise LLMPruneError(
            f"{type(model).__name__} has no ModuleList of {num_layers} decoder layers; "
            "llmprune supports decoder-only *ForCausalLM models"
        )
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _key_map(model: PreTrainedModel, checkpoint: Checkpoint) -> tuple[dict[str, str], dict[str, FusedTensor]]:
    """Map model state-dict names to checkpoint names, and say how fused expert parameters are stored.

    Uses transformers' own checkpoint renamings (e.g. GPT-NeoX `embed_out` -> `lm_head`) and its
    base-model-prefix rule, so any checkpoint that `from_pretrained` loads maps the same way. The one
    many-to-one conversion streamed is the stacking of per-expert tensors into a fused expert parameter
    (models/fused.py); any other is refused.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    meta = model.state_dict(keep_vars=True)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    mapping: dict[str, str] = {}
    sources: dict[str, dict[str, list[str]]] = {}  # fused model name -> source pattern -> checkpoint names
    order: dict[str, list[str]] = {}
    for key in checkpoint.keys():
        renamed, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            converter = next((c for c in converters if converted in c.source_patterns), None)
            if converter is None or not stacks_experts(converter) or renamed not in meta:
                raise LLMPruneError(
                    f"checkpoint tensor {key} needs a many-to-one conversion; llmprune streams "
                    "checkpoints whose tensors map one to one onto the model (or per-expert tensors onto fused ones)"
                )
            sources.setdefault(renamed, {}).setdefault(converted, []).append(key)
            order[renamed] = list(converter.source_patterns)
            mapping[renamed] = renamed  # read through the FusedView
        elif renamed in meta:
            mapping[renamed] = key
    return mapping, collect_fused(sources, order, checkpoint)


def read_config(folder: Path) -> PretrainedConfig:
    """Load config.json, with a clear error for unknown or broken configs."""
    from transformers import AutoConfig

    trust = allowed(folder)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise LLMPruneError(f"cannot read {folder / 'config.json'}: {str(exc).splitlines()[0][:200]}") from exc


def config_dtype(config: PretrainedConfig, checkpoint: Checkpoint, probe_key: str) -> torch.dtype:
    """The checkpoint's floating dtype (read from a shard header; config is only a hint)."""
    dtype, _ = checkpoint.metadata(probe_key)
    return dtype if dtype.is_floating_point else torch.float32


def build_skeleton(folder: Path, attn_implementation: str = "sdpa") -> Skeleton:
    """Build the meta-device model for `folder` and map its tensors to the checkpoint."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_config(folder)
    checkpoint = open_checkpoint(folder, getattr(config, "quantization_config", None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(
                    config, attn_implementation=attn_implementation, trust_remote_code=allowed(folder)
                )
        except ValueError as exc:
            raise LLMPruneError(f"unsupported model in {folder}: {str(exc).splitlines()[0][:200]}") from exc
    model.eval()
    model.requires_grad_(False)
    text_config = config.get_text_config()
    prefix, layers = find_decoder_layers(model, text_config.num_hidden_layers)
    key_map, fused = _key_map(model, checkpoint)
    if fused:
        if isinstance(checkpoint, CompressedCheckpoint):
            raise LLMPruneError(f"{folder}: compressed-tensors mixture-of-experts checkpoints are not supported")
        checkpoint = FusedView(checkpoint, fused)
    layer_keys = [k for k in key_map if k.startswith(prefix + ".0.")]
    if not layer_keys:
        raise LLMPruneError(f"checkpoint {folder} has no tensors for decoder layer 0 ({prefix}.0.*)")
    for index in range(len(layers)):
        expected = {k for k, _ in layers[index].named_parameters()}
        present = {k[len(f"{prefix}.{index}.") :] for k in key_map if k.startswith(f"{prefix}.{index}.")}
        missing = expected - present
        if missing:
            raise LLMPruneError(f"checkpoint {folder} lacks {prefix}.{index}.{sorted(missing)[0]} (missing shard?)")
    dtype = config_dtype(config, checkpoint, key_map[layer_keys[0]])
    return Skeleton(folder, config, model, layers, prefix, checkpoint, dtype, key_map)
