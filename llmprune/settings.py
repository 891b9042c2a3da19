"""Everything a run depends on, typed and nested by concern, at the bottom of the import graph.

Each setting is declared once, with its default and help, as a field of one section (common,
unstructured, structured, publish); a method's own options are `Option`s the method declares. The CLI
flags, the Python API (`llmprune.prune(model, **options)`), validation, the resume fingerprint and
the report all come from these declarations. `validate` is the one place option values are checked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from llmprune.argparsing import fraction
from llmprune.errors import LLMPruneError
from llmprune.pattern import DEFAULT_SPARSITY, Pattern
from llmprune.scheme import SCHEMES

DTYPE_NAMES = ("float32", "float16", "bfloat16")
ORDERS = ("parallel", "sequential")
PARK_MODES = ("memory", "host", "disk")
PACKED_FORMAT = "packed-2:4"
SAVE_FORMATS = ("dense", PACKED_FORMAT)
DEFAULT_REMOVE = 0.2  # structured, when neither --remove nor --target-flops is given
DEFAULT_SPEEDUP = 1.25  # --method speed, when --target-speedup is not given
SPEED_METHOD = "speed"  # the method --target-speedup implies when no --method is given
DEFAULT_EVAL = "wikitext2"  # the eval source when neither --eval nor a local calibration corpus gives one
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Option:
    """One setting: its name (the keyword of the Python API; the flag is --name-with-dashes), default,
    help, value type and choices, and whether it changes the result (then it is part of the resume
    fingerprint and recorded among the report's options)."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    metavar: str | None = None
    affects_result: bool = True
    flag: str | None = None  # the CLI flag, when it is not --name-with-dashes (e.g. --no-mask-tuning)
    nargs: str | None = None  # "+" for a list
    minimum: float | None = None  # the smallest value allowed (None: any)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> None:
        """The option's own constraints: its type, one of its choices, at least its minimum."""
        if value is None:
            return
        number = self.type in (int, float, fraction)
        if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LLMPruneError(f"{self.cli_flag} must be a number (got {value!r})")
        if self.type is int and not isinstance(value, int):
            raise LLMPruneError(f"{self.cli_flag} must be a whole number (got {value!r})")
        if number and math.isnan(value):
            raise LLMPruneError(f"{self.cli_flag} must be a number (got nan)")
        if self.minimum is not None and value < self.minimum:
            raise LLMPruneError(f"{self.cli_flag} must be at least {self.minimum:g} (got {value})")
        if self.choices is not None and value not in self.choices:
            raise LLMPruneError(f"{self.cli_flag} must be one of {', '.join(map(str, self.choices))} (got {value!r})")


class Configurable:
    """A class that declares its own Options (a pruning method): an instance holds their values by name,
    defaults filled in, and reports them as JSON values."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - {o.name for o in self.options}
        if unknown:
            raise TypeError(f"{self.name} has no option {sorted(unknown)[0]!r}")
        self.values = {o.name: values.get(o.name, o.default) for o in self.options}

    def report_options(self) -> dict[str, Any]:
        """The options as the report and the model card record them (a dtype by its name)."""
        plain = (str, int, float, bool, type(None))
        return {k: v if isinstance(v, plain) else str(v).removeprefix("torch.") for k, v in self.values.items()}


def setting(default: Any, help: str, **details: Any) -> Any:
    """A section field with its Option details (help, type, choices, ...) as metadata."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"help": help, **details})


def options_of(section: type) -> list[Option]:
    """The Options of a settings section, in declaration order."""
    return [
        Option(f.name, f.default, f.metadata["help"], **_details(f.metadata))
        for f in dataclasses.fields(section)
        if "help" in f.metadata
    ]


def _details(metadata: Mapping) -> dict:
    return {k: v for k, v in metadata.items() if k != "help"}


@dataclass(frozen=True)
class Common:
    """What every run needs: the model, the data, the output, the device and the run's manners."""

    title: ClassVar[str] = "common"  # its --help group

    model: str = setting("", "local folder, .gguf file, Hub id, or alias such as opt-125m", flag="MODEL")
    source_revision: str | None = setting(
        None, "Hub revision of MODEL: branch, tag or commit (--revision is the push branch)", metavar="REV"
    )
    token: str | None = setting(
        None,
        "Hugging Face token for a gated or private MODEL (default HF_TOKEN or the saved login; never recorded)",
        metavar="TOKEN",
        affects_result=False,
    )
    trust_remote_code: bool = setting(
        False,
        "run the model's own Python code (auto_map in config.json): only for code you trust",
        affects_result=False,
    )
    method: str = setting("sparsegpt", "the pruning method")
    calibration: str = setting(
        "c4", "c4, wikitext2, a Hub dataset id, a .txt/.md/.jsonl file or a folder (default c4)", metavar="SRC"
    )
    samples: int = setting(128, "calibration windows (default 128)", type=int, minimum=1)
    seqlen: int = setting(2048, "tokens per window, capped at the model context", type=int, minimum=1)
    seed: int = setting(0, "seed of the calibration draw (default 0)", type=int)
    output: str | None = setting(
        None, "output folder (default ./MODEL-METHOD-SPARSITY)", metavar="DIR", affects_result=False
    )
    overwrite: bool = setting(False, "replace a non-empty --output folder", affects_result=False)
    eval: str | None = setting(
        None,
        "perplexity source (default: held-out 10%% of a local calibration corpus, else wikitext2)",
        metavar="SRC",
    )
    no_eval: bool = setting(False, "skip the dense and pruned perplexity")
    eval_samples: int | None = setting(None, "evaluate at most N windows", type=int, metavar="N", minimum=1)
    device: str = setting("auto", "auto, cpu or cuda (default auto)", affects_result=False)
    dtype: str | None = setting(None, "output dtype: float32, float16 or bfloat16 (default: as input)")
    batch_size: int | None = setting(None, "windows per forward (default auto)", type=int, metavar="N", minimum=1)
    reduce_dtype: str = setting(
        "float32",
        "dtype the calibration statistics are summed in (within a run, and across torchrun ranks in rank order): "
        "float32 (default), or float64 for a result that does not depend on how the windows are split across "
        "ranks (twice the statistics' memory)",
        choices=("float32", "float64"),
    )
    max_shard_size: str = setting("5GB", "largest output shard (default 5GB)", affects_result=False)
    resume: bool = setting(False, "continue the unfinished run at --output (refuse if none)", affects_result=False)
    quiet: bool = setting(False, "no progress bars or log lines", affects_result=False)
    command: str | None = None  # the command line that asked for this run (the CLI sets it), for the report


@dataclass(frozen=True)
class Unstructured:
    """The unstructured / N:M engine: what to prune, and how the streamed layer loop runs."""

    title: ClassVar[str] = "unstructured and N:M methods"  # its --help group
    who: ClassVar[str] = "unstructured"

    sparsity: float | None = setting(
        None,
        f"fraction of weights to remove, in [0, 1) (default {DEFAULT_SPARSITY}; N:M implies its own)",
        type=fraction,
    )
    pattern: str = setting("unstructured", "'unstructured' or N:M, e.g. 2:4 (N kept of every M)")
    sparsity_profile: str = setting(
        "uniform",
        "how --sparsity spreads over the decoder layers: uniform (default), or owl: layers with more outlier "
        "weights keep more (Yin et al. 2024), each within --owl-lambda of --sparsity, the model-wide sparsity "
        "unchanged; costs one more streamed pass",
        choices=("uniform", "owl"),
    )
    owl_lambda: float = setting(
        0.08,
        "owl: the largest change of a layer's sparsity from --sparsity (default 0.08)",
        type=float,
        minimum=0.0,
        metavar="F",
    )
    owl_m: float = setting(
        5.0,
        "owl: a score |W|x||X|| above M times its layer's mean is an outlier (default 5)",
        type=float,
        minimum=0.0,
        metavar="M",
    )
    quantize: str | None = setting(
        None,
        "also quantize the kept weights, in the same streamed pass, into a compressed-tensors checkpoint: w8a8 "
        "(int8 per channel, int8 activations per token), w4a16 (int4, groups of 128) or w8a16 (int8 per channel); "
        "SparseGPT quantizes jointly, other methods by a GPTQ pass; --sparsity 0 is plain GPTQ",
        choices=tuple(SCHEMES),
        metavar="SCHEME",
    )
    forward_dtype: str = setting(
        "auto",
        "dtype of the calibration forward's matmuls and attention: auto, float32, bfloat16 or float16 (GPU). "
        "Narrower than the layers runs under autocast, wider loads the layers in it; statistics, solves and saved "
        "weights keep full precision. auto: the model's dtype on a GPU, float32 on a CPU",
        metavar="DTYPE",
        choices=("auto", *DTYPE_NAMES),
    )
    targets: tuple[str, ...] = setting(
        ("*",),
        "Linear modules to prune, by name inside a layer (default: all, e.g. 'mlp.*')",
        nargs="+",
        metavar="GLOB",
    )
    ignore: tuple[str, ...] = setting((), "Linear modules to leave dense", nargs="+", metavar="GLOB")
    uncovered_experts: str = setting(
        "dense",
        "MoE models: an expert no calibration token was routed to has no statistics; dense: leave it dense and "
        "report it (default); magnitude: prune it by magnitude",
        choices=("dense", "magnitude"),
    )
    order: str = setting(
        "parallel",
        "parallel: every module sees the dense layer's inputs, as in the papers (default); "
        "sequential: prune each module as soon as it has seen all windows, one forward per layer",
        choices=ORDERS,
    )
    park: str = setting(
        "auto",
        "where chunks waiting for a module's statistics keep their tensors: memory, host (CPU RAM, for GPU "
        "runs) or disk; auto: memory unless the memory plan needs parking (host from a GPU, disk on a CPU)",
        choices=("auto", *PARK_MODES),
        affects_result=False,
    )
    max_memory: str | None = setting(
        None,
        "memory budget of the compute device (e.g. 8GB), or cpu=SIZE,cuda=SIZE; default: what is free. "
        "The run adapts to it or refuses before reading weights",
        metavar="SIZE",
        affects_result=False,
    )
    activations: str = setting(
        "auto",
        "where calibration activations live between layers: auto (memory, or disk when the budget needs it), "
        "memory or disk",
        choices=("auto", "memory", "disk"),
        affects_result=False,
    )
    solver_devices: str | None = setting(
        None,
        "devices that run the per-module solves concurrently (default: every visible GPU with --device cuda)",
        metavar="DEV,DEV",
        affects_result=False,
    )
    plan_only: bool = setting(False, "print the memory plan and exit (reads no weights)", affects_result=False)
    plan_ranks: int = setting(
        1,
        "with --plan-only: plan one rank of a torchrun launch of N ranks (its shard of the windows, its rows of "
        "each solve), from one process",
        type=int,
        minimum=1,
        metavar="N",
        affects_result=False,
    )


@dataclass(frozen=True)
class Removal:
    """How much of the decoder structured, depth and expert methods remove."""

    title: ClassVar[str] = "structured, depth and expert methods: how much to remove"  # its --help group
    who: ClassVar[str] = "structured, depth and expert"  # the methods it is for, in errors

    remove: float | None = setting(
        None,
        f"fraction of decoder-layer parameters to remove (default {DEFAULT_REMOVE}); for reap, of the routed "
        "experts of every MoE layer (0 writes the model unchanged)",
        type=fraction,
        metavar="F",
    )
    target_flops: float | None = setting(
        None, "instead of --remove: keep at most F of the decoder FLOPs per token", type=fraction, metavar="F"
    )

    def keep_fraction(self) -> tuple[float, bool]:
        """(fraction of decoder parameters or FLOPs to keep, measured in FLOPs?)."""
        if self.target_flops is not None:
            return self.target_flops, True
        return 1 - (DEFAULT_REMOVE if self.remove is None else self.remove), False


@dataclass(frozen=True)
class Structured:
    """Structured methods: how the kept heads and neurons are chosen and tuned."""

    title: ClassVar[str] = "structured methods (remove heads and neurons)"  # its --help group
    who: ClassVar[str] = "structured"

    heads_per_group: bool = setting(
        False, "remove the same number of query heads from every KV group (default: whole KV groups)"
    )
    keep_heads: int | None = setting(None, "explicit query heads per layer", type=int, metavar="N", minimum=1)
    keep_neurons: int | None = setting(None, "explicit FFN neurons per layer", type=int, metavar="N", minimum=1)
    mask_tuning: bool = setting(
        True, "skip the least-squares rescaling of kept heads and neurons", flag="--no-mask-tuning"
    )
    neuron_multiple: int = setting(
        64, "kept FFN width is a multiple of N (default 64)", type=int, metavar="N", minimum=1
    )
    tuning_damping: float = setting(
        0.01,
        "ridge damping of mask tuning, as a fraction of the mean diagonal (default 0.01)",
        type=fraction,
        metavar="F",
        minimum=0.0,
    )


@dataclass(frozen=True)
class Speed:
    """The speed-aware search: the decode speedup to reach."""

    title: ClassVar[str] = "speed-aware search (--method speed; --target-speedup alone implies it)"
    who: ClassVar[str] = "speed"

    target_speedup: float | None = setting(
        None,
        f"remove layers, heads and neurons until a measured cost model predicts S times the dense decode speed, at "
        f"the lowest calibration perplexity (default {DEFAULT_SPEEDUP})",
        type=fraction,
        metavar="S",
    )


@dataclass(frozen=True)
class Publish:
    """What happens to the finished folder: its format, the quality gate, the Hub."""

    title: ClassVar[str] = "publishing"  # its --help group

    save_format: str = setting(
        "dense",
        "dense: safetensors with exact zeros, loads anywhere (default); packed-2:4: kept values + 2-bit positions",
        choices=SAVE_FORMATS,
    )
    max_ppl_increase: float = setting(
        0.5,
        "quality gate: fail the run (exit 3) if pruned perplexity > dense x (1 + F) (default 0.5)",
        type=fraction,
        metavar="F",
        affects_result=False,
    )
    eval_tasks: str | None = setting(
        None,
        "lm-evaluation-harness tasks to score dense and pruned (`paper`: the Wanda paper's seven; needs "
        "llmprune[eval])",
        metavar="T1,T2",
        affects_result=False,
    )
    eval_tasks_path: str | None = setting(
        None, "folder of extra lm-eval task YAMLs for --eval-tasks", metavar="DIR", affects_result=False
    )
    eval_tasks_limit: int | None = setting(
        None, "at most N documents per --eval-tasks task", type=int, metavar="N", minimum=1, affects_result=False
    )
    max_acc_drop: float | None = setting(
        None,
        "quality gate: fail the run (exit 3) if any --eval-tasks accuracy drops more than F (absolute)",
        type=fraction,
        metavar="F",
        affects_result=False,
    )
    push_to_hub: str | None = setting(
        None, "push the folder if the gate passes", metavar="ORG/NAME", affects_result=False
    )
    private: bool = setting(False, "create the Hub repository as private", affects_result=False)
    revision: str | None = setting(None, "Hub branch to push to (default main)", metavar="BRANCH", affects_result=False)
    commit_message: str | None = setting(None, "Hub commit message", metavar="MSG", affects_result=False)


SECTIONS: dict[str, type] = {
    "common": Common,
    "unstructured": Unstructured,
    "removal": Removal,
    "structured": Structured,
    "speed": Speed,
    "publish": Publish,
}
SHARED = ("common", "publish")  # the sections every kind of run reads
DEFAULT_MAX_PPL_INCREASE: float = Publish.max_ppl_increase


@dataclass(frozen=True)
class Settings:
    """A run's settings: one section per concern, plus the chosen method's own options."""

    common: Common
    unstructured: Unstructured = Unstructured()
    removal: Removal = Removal()
    structured: Structured = Structured()
    speed: Speed = Speed()
    publish: Publish = Publish()
    method_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.common.method

    @property
    def quiet(self) -> bool:
        return self.common.quiet

    def flat(self) -> dict[str, Any]:
        """Every setting by its Python API keyword (the inverse of `from_options`): what to prune first (the
        method, the sparsity and pattern), then each section's settings in declaration order."""
        values: dict[str, Any] = {
            "method": self.common.method,
            "sparsity": self.unstructured.sparsity,
            "pattern": self.unstructured.pattern,
        }
        for name in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, name)).items():
                values.setdefault(key, value)
        values.update(self.method_options)
        return values

    def changed(self, method_defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The settings that differ from their defaults (`method_defaults`: the method's options' defaults),
        for the Python call the report records."""
        base = {**Settings(Common(model=self.common.model)).flat(), **method_defaults}
        return {k: v for k, v in self.flat().items() if k not in ("model", "command") and v != base.get(k)}

    def fingerprint_parts(self, sections: tuple[str, ...]) -> dict[str, Any]:
        """The settings a result of this kind depends on, for the resume fingerprint, without those the run
        fingerprints by what they resolve to (the model's files, the calibration and eval windows, the dtype)."""
        resolved = ("model", "calibration", "samples", "seqlen", "seed", "eval", "eval_samples", "no_eval", "dtype")
        parts = {}
        for name, section in SECTIONS.items():
            if name in (*SHARED, *sections):
                for option in options_of(section):
                    if option.affects_result and option.name not in resolved:
                        parts[option.name] = getattr(getattr(self, name), option.name)
        return {**parts, **self.method_options}

    @classmethod
    def from_options(cls, model: str, method_options: Mapping[str, tuple[Option, ...]], /, **options: Any) -> Settings:
        """Settings from the Python API's flat keywords (the CLI flags' names). `method_options` maps each
        method's name to the options it declares: the chosen method's are filled with their defaults, and
        another method's option given with a value is refused (never silently ignored)."""
        method = options.get("method") or (SPEED_METHOD if options.get("target_speedup") is not None else Common.method)
        options = {**options, "method": method}
        if method not in method_options:
            raise LLMPruneError(f"unknown --method {method!r}: choose from {', '.join(method_options)}")
        routed: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        declared = {o.name: o for o in method_options[method]}
        chosen: dict[str, Any] = {name: o.default for name, o in declared.items()}
        foreign: dict[str, tuple[str, Option]] = {}
        for owner, opts in method_options.items():
            for option in opts:
                foreign.setdefault(option.name, (owner, option))
        fields = {n: {f.name: f for f in dataclasses.fields(s)} for n, s in SECTIONS.items()}
        for key, value in options.items():
            section = next((n for n in SECTIONS if key in fields[n]), None)
            if section is not None:
                if isinstance(value, str) and fields[section][key].metadata.get("nargs"):
                    value = (value,)  # targets="mlp.*" is one pattern, not five characters
                routed[section][key] = tuple(value) if isinstance(value, list) else value
            elif key in declared:
                chosen[key] = value
            elif key in foreign:
                owner, option = foreign[key]
                if value is not None and value != option.default:
                    raise LLMPruneError(f"{option.cli_flag} is an option of --method {owner}, not of {method}")
            else:
                raise LLMPruneError(f"unknown option {key!r}")
        chosen = {k: (declared[k].default if v is None else v) for k, v in chosen.items()}
        return cls(
            Common(model=model, **routed["common"]),
            Unstructured(**routed["unstructured"]),
            Removal(**routed["removal"]),
            Structured(**routed["structured"]),
            Speed(**routed["speed"]),
            Publish(**routed["publish"]),
            chosen,
        )


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError) as exc:
        raise LLMPruneError(f"cannot read size {text!r} (use e.g. 5GB, 512MiB)") from exc


def parse_budget_text(text: str | None) -> dict[str, int]:
    """--max-memory as {device type: bytes}: one SIZE (key ''), or 'cpu=SIZE,cuda=SIZE' (cuda:N names the
    cuda budget)."""
    values: dict[str, int] = {}
    for part in (text or "").split(",") if text else ():
        key, _, size = part.rpartition("=")
        key = key.strip().partition(":")[0]
        if key not in ("", "cpu", "cuda"):
            raise LLMPruneError(f"--max-memory: {part.strip()!r} names no device; use SIZE or cpu=SIZE,cuda=SIZE")
        values[key] = parse_size(size)
    return values


# lm-evaluation-harness: the zero-shot tasks of the Wanda and SparseGPT papers
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_tasks(spec: str) -> list[str]:
    """`T1,T2` (or `paper` for the seven zero-shot tasks of the Wanda paper) as a list of task names."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if tasks == ["paper"]:
        return list(PAPER_TASKS)
    if not tasks:
        raise LLMPruneError("--tasks needs at least one task name (e.g. --tasks arc_easy,boolq, or paper)")
    return tasks


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise LLMPruneError("task accuracy needs lm-evaluation-harness: pip install 'llmprune[eval]'")


def check_eval_tasks(publish: Publish) -> None:
    """Task flags only with --eval-tasks; lm-eval installed; a drop limit in [0, 1]."""
    if publish.eval_tasks is None:
        given = [f for f in ("eval_tasks_path", "eval_tasks_limit", "max_acc_drop") if getattr(publish, f) is not None]
        if given:
            raise LLMPruneError(f"--{given[0].replace('_', '-')} needs --eval-tasks T1,T2")
        return
    parse_tasks(publish.eval_tasks)
    require_lm_eval()
    if publish.max_acc_drop is not None and not 0 <= publish.max_acc_drop <= 1:
        raise LLMPruneError(f"--max-acc-drop must be in [0, 1] (got {publish.max_acc_drop})")
    if publish.eval_tasks_path is not None and not Path(publish.eval_tasks_path).is_dir():
        raise LLMPruneError(f"--eval-tasks-path {publish.eval_tasks_path}: no such folder")


def check_max_ppl_increase(value: float) -> float:
    """--max-ppl-increase: a fraction >= 0 (inf turns the gate off)."""
    if math.isnan(value) or value < 0:
        raise LLMPruneError(f"--max-ppl-increase must be >= 0 (got {value})")
    return float(value)


def check_repo_id(repo_id: str) -> str:
    """ORG/NAME, or a one-line error."""
    if not REPO_ID.fullmatch(repo_id or ""):
        raise LLMPruneError(f"Hub repository must be ORG/NAME (got {repo_id!r})")
    return repo_id


def check_profile(unstructured: Unstructured, pattern: Pattern) -> None:
    """--sparsity-profile owl varies an unstructured sparsity, every layer's within [0, 1); its knobs are refused
    without it (never silently ignored)."""
    if unstructured.sparsity_profile != "owl":
        for name in ("owl_lambda", "owl_m"):
            if getattr(unstructured, name) != getattr(Unstructured, name):
                flag = "--" + name.replace("_", "-")
                raise LLMPruneError(f"{flag} is for --sparsity-profile owl (got {unstructured.sparsity_profile})")
        return
    lam = unstructured.owl_lambda
    if pattern.is_nm:
        raise LLMPruneError(
            f"--sparsity-profile owl varies the sparsity per layer; --pattern {pattern} fixes it at "
            f"{pattern.sparsity:g} in every group of {pattern.m} (use --pattern unstructured, or the uniform profile)"
        )
    if not (0 <= pattern.sparsity - lam and pattern.sparsity + lam < 1):
        raise LLMPruneError(
            f"--sparsity {pattern.sparsity:g} with --owl-lambda {lam:g} puts layers outside [0, 1): --owl-lambda "
            f"must be at most the sparsity and below 1 minus it"
        )


def validate(settings: Settings, kind: str, sections: tuple[str, ...], method_options: Iterable[Option] = ()) -> None:
    """Every check of option values, before any work: a run of `kind`, which reads `sections` besides the shared
    ones, refuses the other sections' settings; each value is in range, and the combinations make sense."""
    for other, section in SECTIONS.items():
        if other in (*SHARED, *sections):
            continue
        for option in options_of(section):
            if getattr(getattr(settings, other), option.name) != option.default:
                hint = ": use --remove or --target-flops" if option.name in ("sparsity", "pattern") else ""
                raise LLMPruneError(
                    f"{option.cli_flag} is for the {section.who} methods; --method {settings.method} is {kind}{hint}"
                )
    for name, section in SECTIONS.items():
        for option in options_of(section):
            option.check(getattr(getattr(settings, name), option.name))
    for option in method_options:
        option.check(settings.method_options[option.name])
    common, unstructured, removal, publish = settings.common, settings.unstructured, settings.removal, settings.publish
    if common.dtype not in (None, "auto", *DTYPE_NAMES):
        raise LLMPruneError(f"--dtype must be one of auto, {', '.join(DTYPE_NAMES)} (got {common.dtype!r})")
    parse_size(common.max_shard_size)
    parse_budget_text(unstructured.max_memory)
    if removal.remove is not None and removal.target_flops is not None:
        raise LLMPruneError("give --remove or --target-flops, not both")
    if removal.target_flops is not None and not 0 < removal.target_flops < 1:
        raise LLMPruneError(f"--target-flops must be in (0, 1) (got {removal.target_flops})")
    lowest = 0 if kind == "experts" else None  # removing no expert is a valid (identity) run
    if removal.remove is not None and not (0 < removal.remove < 1 or removal.remove == lowest):
        interval = "[0, 1)" if lowest == 0 else "(0, 1)"
        raise LLMPruneError(f"--remove must be in {interval} (got {removal.remove})")
    speedup = settings.speed.target_speedup
    if speedup is not None and not speedup > 1:
        raise LLMPruneError(f"--target-speedup must be more than 1 (got {speedup})")
    if "unstructured" in sections:
        if unstructured.plan_ranks > 1 and not unstructured.plan_only:
            raise LLMPruneError("--plan-ranks plans one rank of a torchrun launch: it needs --plan-only")
        pattern = Pattern.parse(unstructured.pattern, unstructured.sparsity)
        check_profile(unstructured, pattern)
        if publish.save_format == PACKED_FORMAT and str(pattern) != "2:4":
            raise LLMPruneError(f"--save-format {PACKED_FORMAT} needs --pattern 2:4 (got {pattern})")
        if publish.save_format == PACKED_FORMAT and unstructured.quantize:
            raise LLMPruneError(
                f"--save-format {PACKED_FORMAT} stores float values; --quantize {unstructured.quantize} writes a "
                "compressed-tensors checkpoint: choose one"
            )
    elif publish.save_format != "dense":
        raise LLMPruneError(f"--save-format {publish.save_format} is for 2:4-sparse models, not {kind} ones")
    check_max_ppl_increase(publish.max_ppl_increase)
    check_eval_tasks(publish)
    if publish.push_to_hub:
        check_repo_id(publish.push_to_hub)
        if common.no_eval:
            raise LLMPruneError(
                "--push-to-hub needs the quality gate, which --no-eval skips "
                "(push later with `llmprune push DIR ORG/NAME --force`)"
            )
