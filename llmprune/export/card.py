"""The model card (README.md of an output folder): Hub YAML metadata, the command, sparsity per module type,
dense vs pruned perplexity and how to load the model. Rendered from llmprune.json alone."""

from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from llmprune.export.gate import gate_of
from llmprune.export.writer import fsync_write
from llmprune.models import assets
from llmprune.models.resolve import ALIASES

CARD_NAME = "README.md"
# Embedded assets -> the Hub model they were converted from.
EMBEDDED_BASES = {"smollm2-135m-gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
EMBEDDED_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": {"license": "apache-2.0"}}
LICENSE_KEYS = ("license", "license_name", "license_link")
# calibration sources -> the Hub dataset they are
HUB_DATASETS = {"c4": "allenai/c4", "wikitext2": "Salesforce/wikitext"}
METHOD_NAMES = {
    "magnitude": "magnitude",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "fisher": "Fisher head/neuron removal (Kwon et al. 2022)",
    "flap": "FLAP-style fluctuation head/neuron removal",
    "l2-structured": "weight-norm head/neuron removal",
    "depth": "depth removal (whole decoder layers)",
    "reap": "REAP expert removal (router-weighted expert activation, Lasby et al. 2026)",
    "speed": "speed-aware search (layers, heads and neurons for a target decode speedup)",
}
PROJECT_URL = "https://pypi.org/project/llmprune/"


def base_model_of(spec: str, source_folder: Path) -> str | None:
    """The Hub id MODEL came from: an alias's or embedded model's id, a Hub id, or a local folder's own card."""
    if spec.lower() in ALIASES:
        return ALIASES[spec.lower()]
    for name, repo_id in EMBEDDED_BASES.items():
        embedded = assets.embedded_model(name)
        if spec.lower() == name or (embedded is not None and Path(spec).expanduser().resolve() == embedded.resolve()):
            return repo_id
    if Path(spec).expanduser().exists():
        return _card_base_model(Path(source_folder) / CARD_NAME)
    return spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) else None


def _card_base_model(card: Path) -> str | None:
    value = _card_meta(card).get("base_model")
    return value if isinstance(value, str) else None


def _card_meta(card: Path) -> dict:
    return read_front_matter(card.read_text()) if card.is_file() else {}


def read_front_matter(text: str) -> dict:
    """The YAML block between the leading '---' lines of a card ({} when there is none)."""
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    data = yaml.safe_load(match.group(1)) if match else None
    return data if isinstance(data, dict) else {}


def is_prune_report(report: dict) -> bool:
    return "method" in report and "layers" in report


def module_sparsity(report: dict) -> list[dict]:
    """Sparsity per module type (the name inside a decoder layer, e.g. self_attn.q_proj), over all layers."""
    rows: dict[str, dict] = {}
    for layer in report.get("layers", []):
        for module in layer.get("modules", []):
            kind = re.sub(r"^.*?\.\d+\.", "", module["name"])
            numel = module["shape"][0] * module["shape"][1]
            row = rows.setdefault(kind, {"module": kind, "matrices": 0, "weights": 0, "pruned": 0.0})
            row["matrices"] += 1
            row["weights"] += numel
            row["pruned"] += module["sparsity"] * numel
    return [{**row, "sparsity": row["pruned"] / row["weights"] if row["weights"] else 0.0} for row in rows.values()]


def license_of(base_model: str | None, source_folder: Path) -> dict | None:
    """The source model's licence (license, license_name, license_link) from its own card, carried over."""
    meta = _card_meta(Path(source_folder) / CARD_NAME)
    found = {key: meta[key] for key in LICENSE_KEYS if isinstance(meta.get(key), str)}
    return found or EMBEDDED_LICENSES.get(base_model or "")


def calibration_dataset(calibration: dict) -> str | None:
    """The Hub dataset id of the calibration source (none for local files and the embedded corpus)."""
    source = str(calibration.get("source", ""))
    name = source.split(":")[0]
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(source).exists() else None


def front_matter(report: dict) -> dict:
    """The Hub metadata of the card, through huggingface_hub's ModelCardData (model-index included)."""
    from huggingface_hub import ModelCardData

    pattern = report["pattern"]
    if report.get("structured") or report.get("depth") or report.get("speed") or report.get("experts"):
        tags = ["pruned", "structured-pruning", "llmprune"]
    else:
        tags = ["pruned", "sparse", pattern if pattern != "unstructured" else "unstructured-sparsity", "llmprune"]
    tags.append(report["method"])
    if report.get("packed"):
        tags.append("packed-2:4")
    if report.get("quantization"):
        tags += ["quantized", report["quantization"]["scheme"], "compressed-tensors"]
    dataset = calibration_dataset(report.get("calibration") or {})
    results = _eval_results(report)
    data = ModelCardData(
        base_model=report.get("base_model"),
        **(report.get("license") or {}),
        datasets=[dataset] if dataset else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=(report.get("base_model") or report["model"]).split("/")[-1] + f"-{report['method']}",
        eval_results=results or None,
    )
    meta = data.to_dict()
    if not results:
        meta.pop("model_name", None)
    return meta


def _eval_results(report: dict) -> list:
    """The pruned model's perplexity and --eval-tasks accuracies as huggingface_hub EvalResults."""
    from huggingface_hub import EvalResult

    results = []
    ppl = report.get("perplexity") or {}
    if ppl.get("pruned") is not None:
        source = ppl["eval"]["source"]
        name = f"{Path(source).name} ({ppl['eval']['count']} x {ppl['eval']['seqlen']} tokens)"
        results.append(EvalResult("text-generation", Path(source).name, name, "perplexity", ppl["pruned"]))
    for task, r in ((report.get("tasks") or {}).get("results") or {}).items():
        results.append(EvalResult("text-generation", task, task, r["metric"], r["pruned"]))
    return results


def render_card(report: dict) -> str:
    """The full README.md of a pruned model folder, from its llmprune.json report."""
    base = report.get("base_model")
    name = base.split("/")[-1] if base else Path(report.get("source_folder") or report["model"]).name
    method = METHOD_NAMES.get(report["method"], report["method"])
    pattern = report["pattern"]
    source = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{report['model']}`"
    pattern_text = (
        f"**{pattern}** ({pattern.split(':')[0]} kept of every {pattern.split(':')[1]} consecutive input weights)"
        if ":" in pattern
        else "**unstructured**"
    )
    if report.get("structured"):
        return _render_structured(report, name, method, source)
    if report.get("depth"):
        return _render_depth(report, name, method, source)
    if report.get("speed"):
        return _render_speed(report, name, method, source)
    if report.get("experts"):
        return _render_experts(report, name, method, source)
    quant = report.get("quantization")
    quantized_title = f" and quantized to {quant['scheme']}" if quant else ""
    parts = [
        "---\n" + yaml.safe_dump(front_matter(report), sort_keys=False, allow_unicode=True) + "---\n",
        f"# {name}, pruned with {method} ({pattern}){quantized_title}\n",
        f"Pruned in one shot, without retraining, by [llmprune]({PROJECT_URL}) {report.get('llmprune_version', '')} "
        f"from {source}: method **{method}**, pattern {pattern_text}, achieved sparsity "
        f"**{report['achieved_sparsity']:.2%}** of the pruned Linear weights. Embeddings and the LM head are dense."
        f"{_profile_text(report)}{_quantization_text(report)}\n",
        _gate_section(report),
        _command_section(report),
        _sparsity_section(report),
        _perplexity_section(report),
        _tasks_section(report),
        _plots_section(report),
        _usage_section(report),
    ]
    return "\n".join(p for p in parts if p)


def _profile_text(report: dict) -> str:
    """A sentence on a non-uniform sparsity profile (OWL), empty for the uniform one."""
    profile = report.get("sparsity_profile", {})
    if profile.get("profile") != "owl":
        return ""
    layers = [layer["sparsity"] for layer in profile["layers"]]
    return (
        f" The sparsity varies per decoder layer, from {min(layers):.2%} to {max(layers):.2%}, by each layer's share "
        f"of outlier weights (OWL, Yin et al. 2024; lambda {profile['lambda']:g}, M {profile['m']:g})."
    )


def _render_structured(report: dict, name: str, method: str, source: str) -> str:
    """The card of a structurally pruned (physically smaller) model."""
    info = report["structured"]
    dense, kept, params = info["dense"], info["kept"], info["parameters"]
    structure = "\n".join(
        [
            "## Structure\n",
            "| per decoder layer | dense | pruned |",
            "|---|---:|---:|",
            f"| attention heads | {dense['heads']} | {kept['heads']} |",
            f"| KV heads | {dense['kv_heads']} | {kept['kv_heads']} |",
            f"| FFN neurons | {dense['intermediate']} | {kept['intermediate']} |",
            f"| parameters (all decoder layers) | {params['decoder_before']:,} | {params['decoder_after']:,} |",
            f"| parameters (whole model) | {params['total_before']:,} | {params['total_after']:,} |\n",
            "Every layer keeps the same counts, so the model's own architecture expresses it: `config.json` has "
            "the smaller `num_attention_heads`, `num_key_value_heads` and FFN width, and an explicit `head_dim`."
            + (
                " Kept heads and neurons were rescaled by least squares against the dense model (mask tuning)."
                if info.get("mask_tuning")
                else ""
            )
            + "\n",
        ]
    )
    title = f"{params['removed_fraction_of_decoder']:.0%} of its decoder parameters removed"
    return _render_smaller(report, name, method, source, title, "whole attention heads and FFN neurons",
                           structure, "smaller counts")  # fmt: skip


def _render_depth(report: dict, name: str, method: str, source: str) -> str:
    """The card of a model with whole decoder layers removed."""
    info = report["depth"]
    params = info["parameters"]
    removed = ", ".join(str(i) for i in info["removed_layers"])
    structure = "\n".join(
        [
            "## Structure\n",
            "| | dense | pruned |",
            "|---|---:|---:|",
            f"| decoder layers | {info['dense_layers']} | {info['kept_layers']} |",
            f"| parameters (all decoder layers) | {params['decoder_before']:,} | {params['decoder_after']:,} |\n",
            f"Removed layers (dense numbering): {removed}. The kept layers are renumbered, and `config.json` is the "
            "base model's with the smaller `num_hidden_layers` (per-layer lists such as `layer_types` follow).\n",
        ]
    )
    title = f"{len(info['removed_layers'])} of its {info['dense_layers']} decoder layers removed"
    return _render_smaller(report, name, method, source, title, "whole decoder layers", structure, "fewer layers")


def _render_experts(report: dict, name: str, method: str, source: str) -> str:
    """The card of a mixture-of-experts model with whole experts removed."""
    info = report["experts"]
    params = info["parameters"]
    structure = "\n".join(
        [
            "## Structure\n",
            "| | dense | pruned |",
            "|---|---:|---:|",
            f"| routed experts per MoE layer | {info['dense_experts']} | {info['kept_experts']} |",
            f"| experts per token | {info['experts_per_token']} | {info['experts_per_token']} |",
            f"| parameters (all decoder layers) | {params['decoder_before']:,} | {params['decoder_after']:,} |\n",
            "The kept experts of each layer (dense numbering) are in `llmprune.json` (`layers`); they are renumbered "
            "from 0, the router keeps their rows, and shared experts are untouched.\n",
        ]
    )
    removed = info["dense_experts"] - info["kept_experts"]
    title = f"{removed} of its {info['dense_experts']} experts per MoE layer removed"
    return _render_smaller(report, name, method, source, title, "whole routed experts", structure,
                           "the smaller expert count")  # fmt: skip


def _render_speed(report: dict, name: str, method: str, source: str) -> str:
    """The card of a model cut for a target decode speedup (layers, heads and neurons together)."""
    info = report["speed"]
    dense, kept, params = info["dense"], info["kept"], info["parameters"]
    measured = info.get("measured")
    speed = f"predicted **{info['predicted_speedup']:.2f}x**"
    if measured:
        speed += f", measured **{measured['speedup']:.2f}x** (random weights of both shapes, greedy generation)"
    removed = ", ".join(str(i) for i in info["removed_layers"]) or "none"
    structure = "\n".join(
        [
            "## Structure\n",
            "| | dense | pruned |",
            "|---|---:|---:|",
            f"| decoder layers | {dense['layers']} | {kept['layers']} |",
            f"| KV heads per layer | {dense['kv_groups']} | {kept['kv_heads']} |",
            f"| FFN neurons per layer | {dense['neurons']} | {kept['intermediate']} |",
            f"| parameters (all decoder layers) | {params['decoder_before']:,} | {params['decoder_after']:,} |\n",
            f"Target: {info['target_speedup']:g}x the dense decode speed in {info['engine']} on "
            f"`{info['cost_model']['device']}`; {speed}. Of {len(info['candidates'])} candidate cuts reaching it, "
            f"this one had the lowest perplexity on {info['search_windows']} calibration windows. Removed layers "
            f"(dense numbering): {removed}; the kept layers are renumbered.\n",
        ]
    )
    title = f"cut for {info['target_speedup']:g}x decode speed"
    return _render_smaller(report, name, method, source, title, "whole decoder layers, KV groups and FFN neurons",
                           structure, "fewer layers and smaller counts")  # fmt: skip


def _render_smaller(
    report: dict, name: str, method: str, source: str, title: str, removed: str, structure: str, config: str
) -> str:
    """The card of a physically smaller model: `removed` says what went, `structure` tabulates it, `config` says
    how its config.json differs from the base model's."""
    parts = [
        "---\n" + yaml.safe_dump(front_matter(report), sort_keys=False, allow_unicode=True) + "---\n",
        f"# {name}, {title}\n",
        f"Pruned in one shot, without retraining, by [llmprune]({PROJECT_URL}) {report.get('llmprune_version', '')} "
        f"from {source}: method **{method}**, removing {removed}. The result is a smaller dense model that runs "
        "faster on any hardware.\n",
        _gate_section(report),
        _command_section(report),
        structure,
        _perplexity_section(report),
        _tasks_section(report),
        _plots_section(report),
        _usage_section(report)
        .replace(
            "The weights are ordinary dense safetensors with exact zeros and `config.json` is the base model's,",
            f"The weights are ordinary dense safetensors and `config.json` is the base model's with {config},",
        )
        .replace(" Stock vLLM runs it as a dense model: the 2:4 zeros save no time there.", ""),
    ]
    return "\n".join(p for p in parts if p)


def _gate_section(report: dict) -> str:
    gate = gate_of(report)
    if gate["status"] == "passed":
        return ""
    if gate["status"] == "failed":
        return f"> **Quality gate failed**: {gate['reason']}. Check the perplexity below before using this model.\n"
    return "> **Quality gate not evaluated**: the perplexity was not measured (`--no-eval`).\n"


def _command_section(report: dict) -> str:
    calib = report.get("calibration") or {}
    lines = ["## How it was made\n", "```bash", report.get("command") or "(command not recorded)", "```\n"]
    if calib:
        lines.append(
            f"Calibration: {calib.get('count')} windows of {calib.get('seqlen')} tokens from `{calib.get('source')}` "
            f"(seed {calib.get('seed')}, token sha256 `{str(calib.get('sha256', ''))[:16]}…`). "
            f"Order: {report.get('order')}; saved as {report.get('dtype')}.\n"
        )
    options = report.get("options") or {}
    if options:
        listed = ", ".join(f"`{name}` {value}" for name, value in options.items())
        lines.append(f"Options of {report['method']}: {listed}.\n")
    return "\n".join(lines)


def _sparsity_section(report: dict) -> str:
    rows = module_sparsity(report)
    if not rows:
        return ""
    lines = ["## Sparsity by module type\n", "| module | matrices | weights | sparsity |", "|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| `{row['module']}` | {row['matrices']} | {row['weights']:,} | {row['sparsity']:.2%} |")
    total = sum(r["weights"] for r in rows)
    lines.append(f"| **all** | {sum(r['matrices'] for r in rows)} | {total:,} | {report['achieved_sparsity']:.2%} |\n")
    return "\n".join(lines)


def _perplexity_section(report: dict) -> str:
    ppl = report.get("perplexity")
    gate = gate_of(report)
    if not ppl or ppl.get("dense") is None:
        return "## Perplexity\n\nNot evaluated (the run used `--no-eval`).\n"
    ev = ppl["eval"]
    split = f", {ev['held_out']}" if ev.get("held_out") else ""
    limit = gate.get("max_ppl_increase")
    limit_text = f"+{limit:.0%}" if isinstance(limit, (int, float)) and math.isfinite(limit) else "none"
    return "\n".join(
        [
            "## Perplexity\n",
            "| model | perplexity | change |",
            "|---|---:|---:|",
            f"| dense ({report.get('base_model') or report['model']}) | {ppl['dense']:.3f} | |",
            f"| pruned (this model) | {ppl['pruned']:.3f} | {ppl['pruned'] / ppl['dense'] - 1:+.1%} |\n",
            f"Eval set: {ev['count']} windows of {ev['seqlen']} tokens from `{ev['source']}`{split} "
            f"(token sha256 `{str(ev.get('sha256', ''))[:16]}…`); perplexity = exp(mean next-token loss).",
            f"Quality gate: **{gate['status'].replace('_', ' ')}** (largest allowed increase {limit_text}).\n",
        ]
    )


def _plots_section(report: dict) -> str:
    """A link to the per-layer plots `llmprune report` drew (empty until it has)."""
    plots = report.get("plots")
    if not plots:
        return ""
    return f"## Per layer\n\n![achieved sparsity, reconstruction error and time per layer]({plots['png']})\n"


def _tasks_section(report: dict) -> str:
    """Dense and pruned accuracy on the --eval-tasks (lm-evaluation-harness); empty when none were run."""
    tasks = report.get("tasks")
    if not tasks:
        return ""
    lines = ["## Task accuracy\n", "| task | metric | dense | pruned | change |", "|---|---|---:|---:|---:|"]
    for name, r in tasks["results"].items():
        change = r["pruned"] - r["dense"]
        lines.append(f"| {name} | {r['metric']} | {r['dense']:.4f} | {r['pruned']:.4f} | {change:+.4f} |")
    limit = f"at most {tasks['limit']} documents per task" if tasks.get("limit") else "every document"
    version = tasks["lm_eval_version"]
    lines.append(f"\nlm-evaluation-harness {version}, the tasks' own few-shot settings, {limit}.\n")
    return "\n".join(lines)


def _quantization_text(report: dict) -> str:
    """The card's sentence on the quantization of the kept weights (empty when there is none)."""
    quant = report.get("quantization")
    if not quant:
        return ""
    grain = f"groups of {quant['group_size']} inputs" if quant["group_size"] else "one scale per output channel"
    return (
        f" The kept weights are quantized to **{quant['scheme']}** ({quant['bits']}-bit symmetric integers, {grain}; "
        f"activations {quant['activations']}; solved by {quant['solve']}), stored in the {quant['format']} format "
        "that vLLM and transformers (with `compressed-tensors` installed) load natively."
    )


def _usage_section(report: dict) -> str:
    if report.get("packed"):
        return "\n".join(
            [
                "## How to load it\n",
                "This folder holds the **packed 2:4** format (see `llmprune.json`, key `packed`): each 2:4-sparse",
                "matrix is stored as its kept values plus 2-bit positions, for about 0.56x the bytes. Stock",
                "`transformers` and vLLM cannot read it; load it with llmprune, or unpack it first:\n",
                "```python",
                "import llmprune",
                "",
                'model = llmprune.load("path/to/this/folder")  # a transformers model',
                "```\n",
                "```bash",
                "llmprune unpack path/to/this/folder dense-copy   # the dense checkpoint, bit for bit",
                "```\n",
            ]
        )
    dtype = "bfloat16" if report.get("quantization") else report.get("dtype", "auto")
    return "\n".join(
        [
            "## How to load it\n",
            "The weights are ordinary dense safetensors with exact zeros and `config.json` is the base model's,",
            "so any loader reads them. `MODEL` is this repository's id or the local folder.\n",
            "transformers:\n",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'MODEL = "ORG/NAME"',
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            'model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto")',
            'inputs = tokenizer("The quick brown fox", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32, do_sample=False)[0]))",
            "```\n",
            "vLLM:\n",
            "```python",
            "from vllm import LLM, SamplingParams",
            "",
            'MODEL = "ORG/NAME"',
            f'llm = LLM(model=MODEL, dtype="{dtype}")',
            'outputs = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=32))',
            "print(outputs[0].outputs[0].text)",
            "```\n",
            (
                "The quantized weights are compressed-tensors integer codes and scales: vLLM runs them with its "
                "integer kernels (in bfloat16: its 4-bit and weight-only kernels take no float32 activations); "
                "transformers needs `pip install compressed-tensors`. "
                "Stock engines run the zeros as weights: the sparsity saves no time there.\n"
                if report.get("quantization")
                else f"The checkpoint is saved as {dtype}"
                + ("; vLLM would downcast it to bfloat16 unless `dtype` says otherwise." if dtype == "float32" else ".")
                + " Stock vLLM runs it as a dense model: the 2:4 zeros save no time there.\n"
            ),
        ]
    )


def write_card(folder: Path, report: dict) -> None:
    """Write README.md (the model card) into `folder`."""
    fsync_write(Path(folder) / CARD_NAME, render_card(report))


def refresh_card(folder: Path, before: dict, after: dict) -> None:
    """Re-render the card after the report changed (pack/unpack), but only if it is still the card we wrote."""
    card = Path(folder) / CARD_NAME
    if not (card.is_file() and is_prune_report(before) and is_prune_report(after)):
        return
    if card.read_text() == render_card(before):
        write_card(folder, after)
