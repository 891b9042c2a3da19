"""ALPS: the refit is the exact least-squares solution on the support, the solve reconstructs no worse than SparseGPT
on the same Hessian, patterns are exact, a run is deterministic and records its convergence, and one solve stays
within the memory plan's workspace."""

from __future__ import annotations

import json

import pytest
import torch

import llmprune
from llmprune.methods import ALPS, SparseGPT
from llmprune.methods.alps import normalized_hessian, project, refit
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.pattern import Pattern
from tests.helpers.engine import peak_of_one_solve, read_output


def _stats(n: int, seed: int = 0, tokens: int = 512) -> InputStats:
    """Correlated inputs with a few loud features, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
    x[:, : max(1, n // 16)] *= 10
    stats = InputStats(n, (Hessian,), torch.device("cpu"))
    stats.add(x)
    return stats


def _least_squares_on_support(h: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row by row, argmin over w supported on keep[r] of (w − w0) H (w − w0)ᵀ: H_SS w_S = (w0 H)_S."""
    c = w0 @ h
    out = torch.zeros_like(w0)
    for r in range(w0.shape[0]):
        s = keep[r].nonzero().squeeze(1)
        out[r, s] = torch.linalg.solve(h[s][:, s], c[r, s])
    return out


def test_refit_is_the_exact_least_squares_solution_on_a_fixed_support():
    n, rows = 24, 10
    h = _stats(n)[Hessian].matrix.double() + 0.1 * torch.eye(n, dtype=torch.float64)
    w0 = torch.randn(rows, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(rows, n, generator=torch.Generator().manual_seed(2)) > 0.5
    start = w0 * keep  # the refit starts from the kept weights as they are
    fitted, steps, residual = refit(h, w0 @ h, start, keep, steps=n, tolerance=0.0)
    exact = _least_squares_on_support(h, w0, keep)
    assert torch.equal(fitted == 0, ~keep | (exact == 0))
    torch.testing.assert_close(fitted, exact, rtol=1e-5, atol=1e-8)
    assert steps <= n and residual < 1e-8


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_solve_ends_at_the_least_squares_weights_of_its_mask(dtype):
    """After the ADMM, the refit (run to convergence) leaves the kept weights at the exact least-squares solution of
    the damped, normalized problem on the mask the ADMM chose."""
    n, rows = 32, 12
    stats = _stats(n, seed=3)
    w0 = torch.randn(rows, n, generator=torch.Generator().manual_seed(4))
    alps = ALPS(alps_dtype=dtype, alps_pcg_steps=200, alps_pcg_tolerance=0.0)
    result = alps.prune(w0, stats, Pattern(0.5))
    h = stats[Hessian].matrix.double()
    h = h + 0.01 * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=torch.float64)
    exact = _least_squares_on_support(h, w0.double(), ~result.mask)
    tolerance = 1e-5 if dtype == "float64" else 2e-3
    torch.testing.assert_close(result.weight.double(), exact, rtol=tolerance, atol=tolerance * float(exact.abs().max()))


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.5, 2, 4), Pattern(0.7), Pattern(0.25, 3, 4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_alps_reconstructs_no_worse_than_sparsegpt_on_the_same_hessian(pattern, seed):
    n, rows = 64, 48
    stats = _stats(n, seed=seed)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed + 10))
    ours = ALPS().prune(w, stats, pattern)
    theirs = SparseGPT().prune(w, stats, pattern)
    assert int(ours.mask.sum()) == int(theirs.mask.sum())
    assert stats.relative_error(w, ours.weight) <= stats.relative_error(w, theirs.weight)
    assert ours.info["admm_iterations"] >= 1 and ours.info["primal_residual"] >= 0


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.6), Pattern(0.5, 2, 4)])
def test_the_admm_beats_a_refit_of_the_magnitude_support(pattern):
    """The ADMM is what finds the support: ALPS reconstructs better than the same refit (run to convergence) on the
    support that projecting the dense weight gives (the ADMM's starting point)."""
    n, rows = 64, 48
    stats = _stats(n, seed=5)
    w = torch.randn(rows, n, generator=torch.Generator().manual_seed(6))
    h, scale, _, _ = normalized_hessian(stats[Hessian].matrix, 0.01, torch.float64)
    b0 = w.double() * scale
    start = project(b0, pattern)
    b, _, _ = refit(h, b0 @ h, b0.masked_fill(start, 0.0), ~start, steps=200, tolerance=0.0)
    projected = (b / scale).float()
    ours = ALPS(alps_pcg_steps=200, alps_pcg_tolerance=0.0).prune(w, stats, pattern)
    assert stats.relative_error(w, ours.weight) < 0.9 * stats.relative_error(w, projected)


def test_alps_keeps_the_weight_with_nothing_to_prune():
    w = torch.randn(8, 16)
    result = ALPS().prune(w, _stats(16), Pattern(0.0))
    assert not result.mask.any() and torch.equal(result.weight, w)
    everything = ALPS().prune(w, _stats(16), Pattern(1.0 - 1e-9))  # rounds to every weight
    assert everything.mask.all() and not everything.weight.any()


def test_the_same_seed_gives_identical_masks_and_records_convergence(model, corpus_file, tmp_path):
    """Two runs with the same calibration seed write the same bytes; every module's report holds the ADMM steps, the
    final primal residual and the refit's steps; a second seed chooses a different mask."""
    common = dict(method="alps", calibration=str(corpus_file), samples=4, seqlen=32, no_eval=True, quiet=True)
    outputs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        llmprune.prune(str(model), output=str(tmp_path / name), seed=seed, **common)
        outputs.append(read_output(tmp_path / name))
    first, again, other = outputs
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = [k for k in first if k.endswith("proj.weight")]
    assert any(not torch.equal(first[k] == 0, other[k] == 0) for k in weights)
    report = json.loads((tmp_path / "a" / "llmprune.json").read_text())
    modules = [m for layer in report["layers"] for m in layer["modules"]]
    assert len(modules) == 14 and report["method"] == "alps"
    for m in modules:
        assert 1 <= m["admm_iterations"] <= 300 and 0 <= m["primal_residual"] < 0.1
        assert 1 <= m["pcg_steps"] <= 10 and m["sparsity"] == 0.5
    assert report["options"]["alps_dtype"] == "float32"
    assert "ALPS workspace" in json.dumps(report["memory_plan"])


PEAK_OF_ONE_SOLVE = """
import json, sys, torch
from llmprune.engine.devices import current_rss, peak_rss, return_freed_memory, trim_heap, warm_up_kernels
return_freed_memory()
from llmprune.methods import ALPS
from llmprune.methods.statistics import Hessian, InputStats
from llmprune.pattern import Pattern
n, rows, dtype, pattern = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
stats = InputStats(n, (Hessian,), torch.device("cpu"))
stats.add(torch.randn(2 * n, n, generator=g))
weight = torch.randn(rows, n, generator=g)
warm_up_kernels()
torch.linalg.eigh(torch.eye(64, dtype=getattr(torch, dtype)))  # LAPACK's code pages are not the workspace
stats[Hessian].matrix
trim_heap()
open("/proc/self/clear_refs", "w").write("5")
base = current_rss()
result = ALPS(alps_dtype=dtype, alps_iterations=9).prune(weight, stats, Pattern.parse(pattern, None))
print(json.dumps({"peak": peak_rss() - base}))
"""


@pytest.mark.parametrize("dtype,pattern", [("float32", "unstructured"), ("float64", "2:4")])
def test_one_solve_stays_within_its_workspace(dtype, pattern):
    """Measured in a fresh process (VmHWM reset before the solve): what one solve adds to the Hessian and the weight
    is at most the workspace the memory plan counts, and at least the eigenvectors it must hold."""
    n, rows = 1024, 2048
    measured = peak_of_one_solve(PEAK_OF_ONE_SOLVE, n, rows, dtype, pattern)
    solve_dtype = getattr(torch, dtype)
    bound = ALPS.workspace_bytes(rows, n, torch.float32, solve_dtype)
    assert measured <= bound, (measured / 2**20, bound / 2**20)
    assert measured >= 2 * n * n * solve_dtype.itemsize + 5 * rows * n * solve_dtype.itemsize
