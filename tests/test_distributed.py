"""Data-parallel runs under torchrun: 2 gloo ranks on 127.0.0.1 give the very masks and weights of one process
(float64 statistics), a rank killed mid-run resumes to the same output, and bad launches fail on every rank with
one line."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llmprune
from llmprune.errors import LLMPruneError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _env() -> dict:
    """One thread per rank (so one process and two ranks multiply matrices alike), offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _args(model: Path, corpus: Path, output: Path, method: str, *extra: str) -> list[str]:
    return [
        str(model),
        "--method",
        method,
        "--sparsity",
        "0.5",
        "--calibration",
        str(corpus),
        "--samples",
        "8",
        "--seqlen",
        "64",
        "--batch-size",
        "2",
        "--eval-samples",
        "6",
        "--reduce-dtype",
        "float64",
        "--output",
        str(output),
        *extra,
    ]


def _launch(ranks: int, args: list[str], **kwargs) -> subprocess.Popen:
    command = [*TORCHRUN, f"--nproc-per-node={ranks}", "-m", "llmprune", *args]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _run(ranks: int, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = _launch(ranks, args)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def _one_process(args: list[str]) -> None:
    """The reference: one process, in this one, on one thread as each rank runs (the same kernels, the same bits)."""
    from llmprune.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _assert_same_model(one: Path, two: Path) -> None:
    first, second = _tensors(one), _tensors(two)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def _one_and_two_ranks(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """`args` run as one process into tmp_path/one and as 2 ranks into tmp_path/two (whatever its --output says):
    the same config and the same tensors, bit for bit. Returns both reports."""
    at = args.index("--output") + 1
    one, two = tmp_path / "one", tmp_path / "two"
    _one_process([*args[:at], str(one), *args[at + 1 :]])
    double = _run(2, [*args[:at], str(two), *args[at + 1 :]])
    assert double.returncode == 0, double.stdout[-3000:]
    assert json.loads((one / "config.json").read_text()) == json.loads((two / "config.json").read_text())
    _assert_same_model(one, two)
    return json.loads((one / "llmprune.json").read_text()), json.loads((two / "llmprune.json").read_text())


@pytest.fixture(scope="module")
def wide(tiny_models) -> Path:
    """A 3-layer tiny Llama wide enough for 2:4 and SparseGPT's blocks."""
    return tiny_models("llama", layers=3)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_two_ranks_equal_one_process(method, wide, corpus_file, tmp_path):
    report_one, report_two = _one_and_two_ranks(_args(wide, corpus_file, tmp_path, method), tmp_path)
    masks = [[m["zeros"] for m in layer["modules"]] for layer in report_one["layers"]]
    assert masks == [[m["zeros"] for m in layer["modules"]] for layer in report_two["layers"]]
    # SparseGPT's rows are split across the ranks, which add up the error's terms over their rows
    errors = [m["error"] for layer in report_one["layers"] for m in layer["modules"]]
    assert [m["error"] for layer in report_two["layers"] for m in layer["modules"]] == pytest.approx(errors, rel=1e-5)
    assert report_two["distributed"] == {"world_size": 2, "backend": "gloo", "reduce_dtype": "float64"}
    # one process plans one rank of the launch as the launch's ranks planned themselves (--plan-only --plan-ranks 2)
    planned = llmprune.prune(str(wide), method=method, sparsity=0.5, calibration=str(corpus_file), samples=8, seqlen=64,
                             batch_size=2, eval_samples=6, reduce_dtype="float64", plan_only=True, plan_ranks=2,
                             output=str(tmp_path / "plan"), quiet=True)["memory_plan"]  # fmt: skip
    assert planned["phases"] == report_two["memory_plan"]["phases"] != report_one["memory_plan"]["phases"]
    assert planned["choice"] == report_two["memory_plan"]["choice"]
    assert [peak["rank"] for peak in report_two["peak_memory"]["ranks"]] == [0, 1]
    assert all(peak["rss_bytes"] > 0 for peak in report_two["peak_memory"]["ranks"])
    assert "ranks" not in report_one["peak_memory"]
    # a rank plans its shard of the windows (chunks of 2): the 8 calibration ones as 4 + 4, the 6 held-out as 4 + 2
    one, two = report_one["memory_plan"]["phases"], report_two["memory_plan"]["phases"]
    assert two["begin"]["calibration activations"] * 8 == one["begin"]["calibration activations"] * 4
    assert two["eval head"]["eval activations"] * 6 == one["eval head"]["eval activations"] * 4
    # the evaluation windows were split too: the same perplexities, summed across ranks
    for which in ("dense", "pruned"):
        assert report_two["perplexity"][which] == pytest.approx(report_one["perplexity"][which], rel=1e-6)
    assert report_one["perplexity"]["pruned_detail"]["tokens"] == report_two["perplexity"]["pruned_detail"]["tokens"]
    assert not list(tmp_path.glob(".*partial"))
    if method == "sparsegpt":  # `llmprune eval` splits its windows the same way
        command = ["eval", str(tmp_path / "two"), "--dataset", str(corpus_file), "--samples", "6", "--seqlen", "64"]
        command.append("--json")
        evaluated = _run(2, command)
        assert evaluated.returncode == 0, evaluated.stdout[-2000:]
        result = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
        assert result["world_size"] == 2 and result["windows"] == 6
        assert result["perplexity"] == pytest.approx(report_two["perplexity"]["pruned"], rel=1e-6)


ROW_SPLIT = """
import sys, torch
from llmprune.engine.ranks import joined
from llmprune.methods import Hessian, InputStats, Pattern
from llmprune.methods.sparsegpt import SparseGPT

with joined(torch.device("cpu"), "float64") as ranks:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 96, generator=g)  # 37 rows: blocks of 18 and 19
    x = torch.randn(256, 96, generator=g) * torch.linspace(0.1, 3.0, 96)
    stats = InputStats(96, (Hessian,), torch.device("cpu"))
    stats.add(x)
    stats.finish()
    solved = {}
    for pattern in (Pattern(0.5), Pattern(0.73), Pattern.parse("2:4", None)):
        block = ranks.row_block(weight.shape[0])
        assert (block.start, block.stop) == ((0, 18), (18, 37))[ranks.rank]
        result = SparseGPT(blocksize=32).prune(weight[block.start : block.stop], stats, pattern, rows=block)
        whole = torch.zeros_like(weight)
        whole[block.start : block.stop] = result.weight
        one = SparseGPT(blocksize=32).prune(weight, stats, pattern)  # the whole weight in one solve, as one process
        solved[pattern.tag] = (ranks.gather_rows_(whole), one.weight, one.mask)
    torch.save(solved, f"{sys.argv[1]}/rank{ranks.rank}.pt")
"""


def test_a_linears_rows_split_across_ranks_solve_as_one(tmp_path):
    """SparseGPT solved as 2 gloo ranks' blocks of a weight's rows (unstructured masks chosen across both blocks, a
    block of columns at a time; 2:4 row by row) gathers to the very weight one solve of the whole gives (on the
    ranks' one thread each)."""
    script = tmp_path / "row_split.py"
    script.write_text(ROW_SPLIT)
    proc = subprocess.run(
        [*TORCHRUN, "--nproc-per-node=2", str(script), str(tmp_path)], env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for rank in (0, 1):
        solved = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(solved) == ["50", "73", "2of4"]
        for tag, (weight_of_ranks, one, one_mask) in solved.items():
            assert torch.equal(weight_of_ranks, one), (rank, tag)
            assert int((weight_of_ranks == 0).sum()) == int(one_mask.sum())


PEAK_OF_A_RANKS_SOLVE = """
import json, sys, torch
from llmprune.engine.devices import current_rss, peak_rss, return_freed_memory, trim_heap, warm_up_kernels
from llmprune.engine.ranks import joined
from llmprune.methods import Hessian, InputStats, Pattern
from llmprune.methods.sparsegpt import SparseGPT

n = rows = int(sys.argv[1])
with joined(torch.device("cpu")) as ranks:
    return_freed_memory()
    g = torch.Generator().manual_seed(0)
    stats = InputStats(n, (Hessian,), torch.device("cpu"))
    stats.add(torch.randn(2048, n, generator=g))
    stats.finish()
    weight = torch.randn(rows, n, generator=g)
    warm_up_kernels()
    stats[Hessian].matrix
    ranks.gather_rows_(torch.zeros(rows, 128))  # the collectives' own buffers are the process's, not the solve's
    trim_heap()
    ranks.barrier()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = current_rss()
    # what the engine's row-split solve does: its rows, their error terms, then the whole weight gathered
    block = ranks.row_block(rows)
    mine = weight[block.start : block.stop]
    result = SparseGPT(inverse_dtype=torch.float64).prune(mine, stats, Pattern(0.5), rows=block)
    stats.error_terms(mine, result.weight)
    whole = torch.empty_like(weight)
    whole[block.start : block.stop] = result.weight
    ranks.gather_rows_(whole)
    open(f"{sys.argv[2]}/peak{ranks.rank}.json", "w").write(json.dumps(peak_rss() - base))  # ranks share stdout
"""


def test_a_ranks_row_split_solve_stays_within_its_plan(tmp_path):
    """Measured on each of 2 gloo ranks, one thread each (VmHWM reset before the solve): a rank's share of a
    2048 x 2048 SparseGPT solve, rows split, with the gather of the whole weight, adds at most the plan's per-rank
    solve bytes, which are below one process's."""
    from llmprune.engine.plan import Request, solve_bytes
    from llmprune.methods.sparsegpt import SparseGPT

    n = 2048
    script = tmp_path / "peak.py"
    script.write_text(PEAK_OF_A_RANKS_SOLVE)
    command = [*TORCHRUN, "--nproc-per-node=2", str(script), str(n), str(tmp_path)]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    peaks = {rank: json.loads((tmp_path / f"peak{rank}.json").read_text()) for rank in (0, 1)}
    one = Request(windows=1, seqlen=1, eval_windows=0, chunk=1, order="parallel", park="auto", method=SparseGPT,
                  compute_dtype=torch.float32, model_dtype=torch.float32, save_dtype=torch.float32)  # fmt: skip
    bound = solve_bytes(dataclasses.replace(one, row_shards=2), n, n, torch.float64)
    for peak in peaks.values():
        assert n * n * 8 <= peak <= bound, (peaks, bound)  # it held the factor; within the plan
    assert bound < solve_bytes(one, n, n, torch.float64)


def test_a_ranks_plan_holds_the_largest_shard_at_the_chunk_it_streams():
    """The ranks' shards cover every window once, in order and in whole chunks (but the last), and a rank's plan
    counts the largest, at the chunk the run streams, not the one first asked for: 5 calibration and 10 held-out
    windows on 2 ranks are 0 + 5 and 5 + 5 in chunks of 5, but 2 + 3 and 4 + 6 in chunks of 2 (what a smaller
    chunk the plan picks to fit its budget, or chunk_for's, deals)."""
    from llmprune.engine.plan import Choice, Geometry, Request, estimate
    from llmprune.engine.ranks import Ranks, largest_shard
    from llmprune.methods.wanda import Wanda

    for world in range(1, 5):
        for count in range(1, 31):
            for chunk in range(1, 10):
                parts = [Ranks(rank=r, world=world).part(torch.arange(count), chunk) for r in range(world)]
                assert torch.equal(torch.cat(parts), torch.arange(count))
                assert all(len(p) % chunk == 0 for p in parts if len(p) and p[-1] != count - 1)
                assert largest_shard(count, chunk, world) == max(len(p) for p in parts)
    d = 16
    geo = Geometry(layers=2, hidden=d, intermediate=32, heads=2, kv_heads=2, head_dim=8, vocab=64, layer_params=3000,
                   rest_params=1024, head_params=0, table_rows=64, table_width=d, max_in=32, shapes=((32, 16),),
                   group_inputs=(16,), eager_attention=False)  # fmt: skip
    f32 = torch.float32
    request = Request(windows=5, seqlen=8, eval_windows=10, chunk=5, order="parallel", park="auto", method=Wanda,
                      compute_dtype=f32, model_dtype=f32, save_dtype=f32, world=2)  # fmt: skip
    for chunk, calibration, held_out in ((5, 5, 5), (2, 3, 6)):
        choice = Choice(chunk, "device", f32, "parallel", "memory", torch.float64)
        phases, _ = estimate(geo, request, choice, torch.device("cpu"))
        assert phases["begin"]["calibration activations"] == calibration * 8 * d * 4
        assert phases["eval head"]["eval activations"] == held_out * 8 * d * 4


def test_a_ranks_plan_counts_the_embedding_rows_of_its_own_shard():
    """On a CPU a rank's forward reads only the table rows of its shard's ids: the plan counts the most distinct ids
    any rank's shard holds at the chunk it streams (a page-backed row each), not the whole calibration's."""
    from llmprune.engine.plan import PAGE, Choice, Geometry, Request, estimate
    from llmprune.engine.ranks import Ranks, largest_shard_rows
    from llmprune.methods.wanda import Wanda

    ids = torch.tensor([[0, 1], [0, 2], [3, 4], [5, 6], [7, 8], [9, 10]])  # 11 distinct; 3 in windows 0-1
    for world in (1, 2, 3):
        for chunk in (1, 2, 3):
            parts = [Ranks(rank=r, world=world).part(ids, chunk) for r in range(world)]
            assert largest_shard_rows(ids, chunk, world) == max(len(set(p.flatten().tolist())) for p in parts)
    assert largest_shard_rows(ids, 2, 1) == 11 and largest_shard_rows(ids, 2, 3) == 4
    # 2 ranks: windows 0-2 and 3-5 (5 and 6 distinct ids) in chunks of 3; 0-1 and 2-5 (3 and 8) in chunks of 2
    d = 16
    geo = Geometry(layers=2, hidden=d, intermediate=32, heads=2, kv_heads=2, head_dim=8, vocab=4096, layer_params=3000,
                   rest_params=4096 * d, head_params=0, table_rows=4096, table_width=d, max_in=32, shapes=((32, 16),),
                   group_inputs=(16,), eager_attention=False)  # fmt: skip
    f32 = torch.float32
    request = Request(windows=6, seqlen=2, eval_windows=0, chunk=3, order="parallel", park="auto", method=Wanda,
                      compute_dtype=f32, model_dtype=f32, save_dtype=f32, world=2,
                      embedding_rows=lambda chunk: largest_shard_rows(ids, chunk, 2))  # fmt: skip
    for chunk, rows in ((3, 6), (2, 8)):
        choice = Choice(chunk, "device", f32, "parallel", "memory", torch.float64)
        phases, _ = estimate(geo, request, choice, torch.device("cpu"))
        assert phases["begin"]["embeddings"] == rows * 2 * PAGE  # a 64-byte row backs at most 2 pages


def _structured_args(model: Path, corpus: Path, output: Path) -> list[str]:
    args = _args(model, corpus, output, "fisher")
    at = args.index("--sparsity")
    return [*args[:at], "--remove", "0.3", "--fisher-combine", "flap", *args[at + 2 :]]


def test_structured_two_ranks_equal_one_process(wide, corpus_file, tmp_path):
    """Kwon's Fisher combined with FLAP's fluctuation (per-chunk mask gradients gathered, their squares and the
    input moments summed), then mask tuning (normal equations summed): the same heads and neurons kept, the
    same tuned weights."""
    _, report = _one_and_two_ranks(_structured_args(wide, corpus_file, tmp_path), tmp_path)
    assert report["structured"]["mask_tuning"] and report["distributed"]["world_size"] == 2


def test_depth_two_ranks_equal_one_process(tiny_models, corpus_file, tmp_path):
    """Depth removal by the perplexity search (block influence and last-token states from the scoring pass,
    every candidate's loss summed across ranks), then the least-squares repair (its sums added across ranks):
    the same layers removed, the same repaired weights."""
    model = tiny_models("llama", layers=4)
    args = [*_args(model, corpus_file, tmp_path, "depth", "--depth-criterion", "perplexity"), "--no-eval"]
    at = args.index("--sparsity")
    args[at : at + 2] = ["--remove", "0.5"]
    one, two = (report["depth"] for report in _one_and_two_ranks(args, tmp_path))
    assert one["removed_layers"] == two["removed_layers"] and one["search"] == two["search"]
    assert one["block_influence"] == two["block_influence"] and one["repairs"] == two["repairs"]
    assert one["repairs"], one  # a removed span after layer 0: its repair ran on both sides


def test_speed_search_two_ranks_equal_one_process(tiny_models, corpus_file, tmp_path, monkeypatch):
    """--target-speedup: the cost model is rank 0's (fixed here, in the cache under the one thread each run
    has, so that one process and the ranks search the same cuts), every candidate's loss, the depth scores and
    repair, FLAP's moments and the mask tuning are summed across ranks: the same cut, the same weights."""
    from tests.helpers.costs import fixed_costs, write_costs

    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_models("llama", layers=8, inter=256)
    write_costs(model, fixed_costs(layer=1.0, neuron=1 / 256), threads=1)  # 2x needs layers and neurons removed
    args = _args(model, corpus_file, tmp_path, "wanda", "--no-eval", "--no-measure-speedup")
    at = args.index("--method")
    args[at : at + 4] = ["--target-speedup", "2.0", "--search-windows", "4", "--neuron-multiple", "32"]
    args[args.index("--samples") + 1] = "12"  # 756 tokens: enough to fit the depth repair of a 256-wide FFN
    one, two = (report["speed"] for report in _one_and_two_ranks(args, tmp_path))
    assert one["removed_layers"] and one["kept"]["intermediate"] < 256
    for key in ("candidates", "removed_layers", "kept", "repair"):
        assert one[key] == two[key], key


@pytest.mark.parametrize(("arch", "method"), [("mixtral", "reap"), ("qwen2_moe", "sparsegpt")])
def test_moe_two_ranks_equal_one_process(arch, method, tiny_models, corpus_file, tmp_path):
    """REAP's saliencies (counts and gate-weighted norms summed across ranks) keep the same experts; SparseGPT's
    per-expert Hessians, fed on each rank by the tokens routed there, sum to one process's."""
    model = tiny_models(arch, layers=2)
    args = [*_args(model, corpus_file, tmp_path, method), "--no-eval"]
    if method == "reap":
        at = args.index("--sparsity")
        args[at : at + 2] = ["--remove", "0.5"]
    _one_and_two_ranks(args, tmp_path)


def _rank_env(rank: int, port: int) -> dict:
    return {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("llmprune: error:")]


def test_bad_launches_fail_on_every_rank_with_one_line(model, corpus_file, tmp_path):
    # more ranks than calibration windows
    few = _run(2, [*_args(model, corpus_file, tmp_path / "few", "wanda")[:-2], "--samples", "1", "--output",
                   str(tmp_path / "few")])  # fmt: skip
    assert few.returncode != 0
    lines = _errors(few.stdout)
    assert len(lines) == 2 and "2 ranks need at least 2 windows and the run has 1" in lines[0], few.stdout[-2000:]
    # ranks started by hand with different arguments (a multi-node launch gone wrong)
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmprune",
                *_args(model, corpus_file, tmp_path / "mixed", "wanda")[:3],
                sparsity,
                *_args(model, corpus_file, tmp_path / "mixed", "wanda")[5:],
            ],
            env=_rank_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank, sparsity in ((0, "--sparsity=0.5"), (1, "--sparsity=0.6"))
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 2, output[-2000:]
        lines = _errors(output)
        assert (
            len(lines) == 1 and "rank 1 was started with different arguments than rank 0 (sparsity differ)" in lines[0]
        )
    assert not any((tmp_path / name).exists() for name in ("few", "mixed"))
    assert not list(tmp_path.glob(".*partial"))


def _rank_pid(torchrun: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=`rank`."""
    children = Path(f"/proc/{torchrun}/task/{torchrun}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_killed_rank_resumes_to_the_same_output(tiny_models, corpus_file, tmp_path):
    """SIGKILL rank 1 once a layer is committed; torchrun stops rank 0; the same command resumes the run and
    writes what one uninterrupted process writes."""
    deep = tiny_models("llama", layers=6)
    extra = ["--samples", "16", "--seqlen", "128", "--no-eval"]
    _one_process([*_args(deep, corpus_file, tmp_path / "one", "sparsegpt"), *extra])
    out = tmp_path / "two"
    args = [*_args(deep, corpus_file, out, "sparsegpt"), *extra]
    proc = _launch(2, args)
    state = tmp_path / ".two.partial" / ".work" / "state.json"
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and killed is None:
        try:
            if json.loads(state.read_text())["next_layer"] >= 1:
                pid = _rank_pid(proc.pid, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    output, _ = proc.communicate(timeout=300)
    assert killed is not None, "the run ended before a rank could be killed"
    assert proc.returncode != 0 and not out.exists(), output[-2000:]
    resumed = _run(2, args)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming" in resumed.stdout
    _assert_same_model(tmp_path / "one", out)


def test_launches_refused_before_any_collective(model, corpus_file, monkeypatch, capsys, tmp_path):
    """What a launch cannot do is refused from the arguments alone, on every rank alike (each rank runs these
    checks before it talks to the others): lm-eval's tasks (every rank would run them in full), a method that
    does not run distributed (every built-in one does; a plugin's body may not), --eval-tasks, --plan-only; and
    WORLD_SIZE without torchrun."""
    from llmprune.engine.ranks import Ranks
    from llmprune.run import KINDS, all_methods, check_launch, make_settings
    from tests.helpers.cli import one_error_line, run_main

    two = Ranks(rank=1, world=2, backend="gloo")
    refused = {
        "does not run across torchrun ranks": dict(method="depth", remove=0.5),  # a body that says it cannot
        "--eval-tasks under torchrun": dict(method="wanda", eval_tasks="arc_easy"),
        "--plan-only under torchrun: plan one rank as one process with --plan-only --plan-ranks 2$": dict(
            method="sparsegpt", plan_only=True
        ),
    }
    for message, options in refused.items():
        settings = make_settings(str(model), **options)
        kind, method = all_methods()[settings.method]
        body = KINDS[kind][1](settings, method)
        if settings.method == "depth":
            body.distributed = False
        with pytest.raises(LLMPruneError, match=message):
            check_launch(settings, body, two)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(["eval", model, "--tasks", "arc_easy"], capsys)
    assert code == 2 and "runs as one process" in one_error_line(err)
    code, _, err = run_main(_args(model, corpus_file, tmp_path / "alone", "wanda"), capsys)
    assert code == 2 and "start the ranks with torchrun" in one_error_line(err)
    code, _, err = run_main(
        [*_args(model, corpus_file, tmp_path / "alone", "wanda"), "--solver-devices", "cpu"], capsys
    )
    assert code == 2 and "start the ranks with torchrun" in one_error_line(err)
    assert not (tmp_path / "alone").exists()
    monkeypatch.delenv("WORLD_SIZE")
    code, _, err = run_main([*_args(model, corpus_file, tmp_path / "alone", "wanda"), "--plan-ranks", "2"], capsys)
    assert code == 2 and "--plan-ranks plans one rank of a torchrun launch: it needs --plan-only" in one_error_line(err)
    planned = [*_args(model, corpus_file, tmp_path / "alone", "wanda"), "--plan-only", "--plan-ranks", "2"]
    code, _, err = run_main([*planned, "--solver-devices", "cpu"], capsys)
    assert code == 2 and "--solver-devices: under torchrun every rank solves" in one_error_line(err)
    code, _, err = run_main([*planned[:-1], "9"], capsys)  # 8 windows
    assert code == 2 and "9 ranks need at least 9 windows and the run has 8" in one_error_line(err)
    assert not (tmp_path / "alone").exists()
