"""Kernel benchmarks (pytest-benchmark), each group measured in one run so ratios are fair:

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-group-by=group

Group "ties": fused TIES (knots_ext.ops.ties_merge) on 8 tasks x 16M float32, top_k 0.2,
against the same math in plain torch ops, and against one read pass over the input
(torch.sum: the memory-bound floor). Group "dare-ta": DARE + task arithmetic, fused vs torch.
The fused kernels run once on each CPU path of the build ([baseline] and [avx2]: the portable
x86-64-v2 code and the AVX2 code chosen at run time), so the paths compare in one run.
KNOTS_BENCH_P overrides the per-task size."""
from __future__ import annotations

import os

import pytest
import torch

import knots_ext
from knots_ext import _C, ops

N_TASKS = 8
P = int(os.environ.get("KNOTS_BENCH_P", 16 * 1024 * 1024))
TOP_K = 0.2


@pytest.fixture(scope="module")
def x():
    return torch.randn(N_TASKS, P, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=knots_ext.build_info()["cpu_paths"])
def cpu_path(request):
    """Runs the test's kernels on one CPU path (results are bit-identical on every path)."""
    before = knots_ext.build_info()["cpu_path"]
    _C.set_cpu_path(request.param)
    yield request.param
    _C.set_cpu_path(before)


def torch_ties(x: torch.Tensor, top_k: float, lam: float = 1.0) -> torch.Tensor:
    """TIES in plain torch ops, float32, as the TIES / KnOTS reference code does it."""
    n, p = x.shape
    k = p - int(p * top_k)
    kth = x.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = x * (x.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (trimmed != 0) & (torch.sign(trimmed) == sign)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def torch_dare_ta(x: torch.Tensor, p: float) -> torch.Tensor:
    keep = torch.rand(x.shape) >= p
    return (x * keep / (1 - p)).sum(0)


@pytest.mark.benchmark(group="ties")
def test_read_pass(benchmark, x):
    benchmark(torch.sum, x)


@pytest.mark.benchmark(group="ties")
def test_ties_fused(benchmark, x, cpu_path):
    benchmark(ops.ties_merge, x, TOP_K)


@pytest.mark.benchmark(group="ties")
def test_ties_fused_into_out(benchmark, x, cpu_path):
    """The same, writing into a preallocated output: on this VM a fresh 64 MB buffer costs
    ~30 ms of first-touch page faults, as much as a read pass."""
    out = torch.empty(P)
    benchmark(ops.ties_merge, x, TOP_K, out=out)


@pytest.mark.benchmark(group="ties")
def test_ties_torch_ops(benchmark, x):
    benchmark.pedantic(torch_ties, args=(x, TOP_K), rounds=2, iterations=1)


@pytest.mark.benchmark(group="ties")
def test_dare_ties_fused(benchmark, x, cpu_path):
    benchmark(ops.ties_merge, x, TOP_K, dare_p=0.5, seed=1)


@pytest.mark.benchmark(group="ties")
def test_thresholds_fused(benchmark, x, cpu_path):
    benchmark(ops.magnitude_threshold, x, TOP_K)


@pytest.mark.benchmark(group="dare-ta")
def test_ta_fused(benchmark, x, cpu_path):
    out = torch.empty(P)
    benchmark(ops.task_arithmetic, x, 0.5, out=out)


@pytest.mark.benchmark(group="dare-ta")
def test_dare_ta_fused(benchmark, x, cpu_path):
    benchmark(ops.task_arithmetic, x, dare_p=0.5, seed=1)


@pytest.mark.benchmark(group="dare-ta")
def test_dare_ta_torch_ops(benchmark, x):
    benchmark.pedantic(torch_dare_ta, args=(x, 0.5), rounds=3, iterations=1)
