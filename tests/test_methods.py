"""The pruning methods on their own: exact sparsity, N:M groups, the math each paper defines."""

from __future__ import annotations

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.methods import METHODS, Hessian, InputStats, Pattern, masks
from llmprune.methods.sparsegpt import SparseGPT, inverse_factor
from tests.helpers.engine import peak_of_one_solve
from tests.helpers.reference_sparsegpt import reference_prune


def _problem(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(tokens, cols, generator=g) * torch.linspace(0.1, 3.0, cols)  # uneven feature scales
    return w, x


def _stats(kinds: tuple, x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1], kinds, x.device)
    stats.add(x[: x.shape[0] // 2])
    stats.add(x[x.shape[0] // 2 :])
    return stats


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.73])
@pytest.mark.parametrize("shape", [(48, 64), (7, 33)])
def test_exact_unstructured_sparsity(method, sparsity, shape):
    w, x = _problem(*shape)
    cls = METHODS[method]
    result = cls().prune(w, _stats(cls.statistics, x), Pattern.parse("unstructured", sparsity))
    expected = round(sparsity * w.numel())
    assert int(result.mask.sum()) == expected
    assert torch.all(result.weight[result.mask] == 0)
    assert result.weight.dtype == w.dtype and result.weight.shape == w.shape


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_n_m_holds_in_every_group(method, pattern):
    w, x = _problem(32, 64)
    cls = METHODS[method]
    pat = Pattern.parse(pattern, None)
    result = cls().prune(w, _stats(cls.statistics, x), pat)
    kept_per_group = (result.weight != 0).reshape(32, 64 // pat.m, pat.m).sum(-1)
    assert torch.all(kept_per_group == pat.n)
    assert int(result.mask.sum()) == w.numel() * (pat.m - pat.n) // pat.m


def test_wanda_scores_weight_times_input_norm_per_row():
    w, x = _problem(16, 32)
    result = METHODS["wanda"]().prune(w, _stats(METHODS["wanda"].statistics, x), Pattern.parse("unstructured", 0.5))
    score = w.abs() * x.norm(dim=0)
    for row in range(16):
        order = torch.argsort(score[row])
        assert set(torch.nonzero(result.mask[row]).flatten().tolist()) == set(order[:16].tolist())


def test_magnitude_is_layer_wise_global():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    result = METHODS["magnitude"]().prune(w, None, Pattern.parse("unstructured", 0.5))
    assert result.mask[0].all() and not result.mask[1].any()


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    w, x = _problem(64, 128, tokens=2048)
    pattern = Pattern.parse("unstructured", 0.5)

    def err(method):
        cls = METHODS[method]
        pruned = cls().prune(w, _stats(cls.statistics, x), pattern).weight
        return float(((x @ (w - pruned).T) ** 2).sum() / ((x @ w.T) ** 2).sum())

    assert err("sparsegpt") < err("wanda") < err("magnitude")


def test_sparsegpt_unstructured_mask_is_exact_per_block():
    w, x = _problem(8, 300)  # blocks of 128, 128, 44
    result = SparseGPT(blocksize=128).prune(w, _stats((Hessian,), x), Pattern.parse("unstructured", 0.37))
    assert int(result.mask.sum()) == round(0.37 * w.numel())


def test_sparsegpt_dead_inputs_are_zeroed():
    w, x = _problem(8, 16)
    x[:, 3] = 0
    result = SparseGPT().prune(w, _stats((Hessian,), x), Pattern.parse("unstructured", 0.25))
    assert torch.all(result.weight[:, 3] == 0)


def test_damping_retry_is_reported_not_silent():
    # An indefinite "Hessian" (a negative eigenvalue) that 1% damping cannot fix.
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))
    upper, info = inverse_factor(h, 0.01, torch.float64)
    assert info["damping_retries"] >= 1
    assert torch.isfinite(upper).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
def test_in_place_solve_equals_the_reference_solve(pattern, dtype, seed):
    """The in-place solve (one n x n buffer, row-chunked lazy updates, a factor shared by the group)
    gives the reference SparseGPT solve's weights and masks, on random Hessians with a dead input."""
    w, x = _problem(96, 320, tokens=400, seed=seed)  # fewer tokens than inputs: damping makes it definite
    x[:, 7] = 0
    pat = Pattern.parse(pattern, None)
    stats = _stats((Hessian,), x)
    hessian = stats[Hessian].matrix.clone()
    expected, expected_mask = reference_prune(w, hessian, pat, dtype)
    for _member in range(2):  # the second member of a group reuses the first one's factor
        result = SparseGPT(inverse_dtype=dtype).prune(w, stats, pat)
        assert torch.equal(result.mask, expected_mask)
        assert torch.allclose(result.weight, expected, rtol=0, atol=1e-5)
    assert torch.equal(stats[Hessian].matrix, hessian)  # the solve only read the Hessian


def test_the_hessian_is_mirrored_in_place():
    _, x = _problem(4, 600, tokens=64)
    stats = _stats((Hessian,), x)
    full = stats[Hessian].matrix
    assert torch.equal(full, full.T)
    assert torch.allclose(full, x.T @ x, rtol=1e-5, atol=1e-3)


def test_group_members_share_one_factor(monkeypatch):
    from llmprune.methods import sparsegpt

    calls = []
    real = sparsegpt.inverse_factor
    monkeypatch.setattr(sparsegpt, "inverse_factor", lambda *a: calls.append(1) or real(*a))
    w, x = _problem(16, 64)
    stats = _stats((Hessian,), x)
    for _ in range(3):  # q, k, v
        SparseGPT().prune(w, stats, Pattern.parse("unstructured", 0.5))
    assert len(calls) == 1


PEAK_OF_ONE_SOLVE = """
import json, sys, torch
from llmprune.engine.devices import current_rss, peak_rss, return_freed_memory, trim_heap, warm_up_kernels
from llmprune.methods import Hessian, InputStats, Pattern
from llmprune.methods.sparsegpt import SparseGPT
return_freed_memory()
n, rows, dtype, block = int(sys.argv[1]), int(sys.argv[2]), getattr(torch, sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
stats = InputStats(n, (Hessian,), torch.device("cpu"))
stats.add(torch.randn(2048, n, generator=g))
weight = torch.randn(rows, n, generator=g)
warm_up_kernels()  # LAPACK's code pages, paged in lazily, are not the solve's workspace
stats[Hessian].matrix  # mirrored (in place) before the measurement: the Hessian is the statistics, not the workspace
trim_heap()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = current_rss()
result = SparseGPT(inverse_dtype=dtype, blocksize=block).prune(weight, stats, Pattern(0.5))
print(json.dumps({"peak": peak_rss() - base, "result": result.weight.numel() * 4 + result.mask.numel()}))
"""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_solve_at_n_4096_stays_within_its_bound(dtype, threads):
    """Measured in a fresh process (VmHWM reset before the solve): the peak a solve adds to the Hessian
    and the weight is at most the plan's workspace, which is one n x n buffer of the inverse's dtype,
    the weight-sized working copy and mask, and O(n · block) elements; on one thread (a torchrun rank's
    default, where MKL's LAPACK keeps larger buffers) as on two."""
    n = rows = 4096
    measured = peak_of_one_solve(PEAK_OF_ONE_SOLVE, n, rows, dtype, 128, threads=threads)
    inverse = getattr(torch, dtype)
    bound = SparseGPT.workspace_bytes(rows, n, torch.float32, inverse)
    weight_buffers = rows * n * (4 + 1)  # the float32 working weight (returned) and the mask
    lapack = n * 1536 * 8  # MKL's panel buffers on one thread (up to 40.4 MiB measured at n = 4096)
    assert bound <= 1.25 * n * n * inverse.itemsize + weight_buffers + 64 * n * 128 + lapack
    assert measured <= bound, (measured / 2**20, bound / 2**20)
    assert measured >= n * n * inverse.itemsize  # it did hold the factor (the reading measures something)


def test_a_larger_block_is_in_the_bound():
    """With --blocksize 1024 the OBS loop's blocks are 8 times the default's: measured at n = 2048 (one thread), the
    solve holds more than the default block's bound, and at most the bound for its own block."""
    n = rows = 2048
    measured = peak_of_one_solve(PEAK_OF_ONE_SOLVE, n, rows, "float32", 1024, threads=1)
    assert SparseGPT.workspace_bytes(rows, n, torch.float32, torch.float32) < measured
    assert measured <= SparseGPT.workspace_bytes(rows, n, torch.float32, torch.float32, {"blocksize": 1024})


def test_hopeless_hessian_raises():
    h = torch.diag(torch.tensor([1.0, -1e12]))
    with pytest.raises(LLMPruneError, match="not positive definite"):
        inverse_factor(h, 0.01, torch.float64)


def test_spread_counts_sum_exactly():
    counts = masks.spread_counts(0.37 * 7 * 33, 7)
    assert int(counts.sum()) == round(0.37 * 7 * 33)
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize(
    "pattern,sparsity,message",
    [
        ("unstructured", 1.0, r"\[0, 1\)"),
        ("unstructured", -0.1, r"\[0, 1\)"),
        ("2:4", 0.3, "implies sparsity 0.5"),
        ("4:2", None, "0 < N < M"),
        ("two:four", None, "N:M"),
    ],
)
def test_pattern_validation(pattern, sparsity, message):
    with pytest.raises(LLMPruneError, match=message):
        Pattern.parse(pattern, sparsity)


def test_n_m_width_check():
    with pytest.raises(LLMPruneError, match="does not divide"):
        Pattern.parse("2:4", None).check_width(30, "mlp.down_proj")
