"""Kernel benchmarks (pytest-benchmark), each group measured in one run so ratios are fair:

    python -m pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-group-by=group

Group "ties": fused TIES (knots_ext.ops.ties_merge) on 8 tasks x 16M float32, top_k 0.2,
against the same math in plain torch ops, and against one read pass over the input
(torch.sum: the memory-bound floor). Group "dare-ta": DARE + task arithmetic, fused vs torch.
The fused kernels run once on each CPU path of the build and CPU ([baseline], [avx2], [avx512]:
the portable x86-64-v2 code and the AVX2 and AVX-512 code chosen at run time), so the paths
compare in one run.
KNOTS_BENCH_P overrides the per-task size.

Group "factored": the factor-fused kernels (knots_ext.factor_ops: the thresholds' exact and
sampled passes, TIES, DARE-TIES, TA) on n = 8 tasks of rank 16 whose rows are 4096 x 4096
(s_i P_i @ Q_i, never stored), on the best CPU path only (the baseline path computes each fused
multiply-add with a libm call), against torch.matmul on the same factors
((4096 x 16) @ (16 x 4096)) and on a large square product, and against the row kernel reading the
materialised rows. Run with -s: at the end the module prints the achieved GFLOP/s (2 r flops per
entry and task) and the ratios. KNOTS_BENCH_FACTORED=m,c,n,r overrides the shape."""
from __future__ import annotations

import os

import pytest
import torch

import knots_ext
from knots_ext import _C, factor_ops, ops

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


# --------------------------------------------------------------------------------------------
# Factor-fused kernels vs torch.matmul on the same factors and the row kernel

F_M, F_C, F_N, F_R = (int(v) for v in os.environ.get("KNOTS_BENCH_FACTORED", "4096,4096,8,16").split(","))
SQUARE = 2048
FLOPS: dict = {}  # test name -> (flop count, benchmark fixture)


@pytest.fixture(scope="module")
def factors():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(F_M, F_R, generator=g), torch.randn(F_R, F_C, generator=g) / F_R**0.5, 0.5 + i)
            for i in range(F_N)]


@pytest.fixture(scope="module")
def factored_thresholds(factors):
    sel = ops.MagnitudeThreshold(F_N, TOP_K)
    while not sel.done:
        factor_ops.histogram(sel, factors, 0.0, 0, "m", list(range(F_N)))
        sel.finish_round()
    return sel.thresholds()


@pytest.fixture
def best_path():
    before = knots_ext.build_info()["cpu_path"]
    _C.set_cpu_path(knots_ext.build_info()["cpu_paths"][-1])
    yield
    _C.set_cpu_path(before)


@pytest.fixture(scope="module", autouse=True)
def report_gflops():
    """After the module: GFLOP/s of every benchmark that registered its flop count, and the
    fused kernels' ratios to torch.matmul's."""
    yield
    rates = {}
    for name, (flops, bench) in FLOPS.items():
        stats = getattr(bench, "stats", None)
        if stats is not None and stats.stats.rounds:
            rates[name] = flops / stats.stats.min / 1e9
    if not rates:
        return
    print(f"\nfactored kernels, n={F_N} r={F_R} rows {F_M}x{F_C}: GFLOP/s (best round)")
    for name, rate in rates.items():
        line = f"  {name:40s} {rate:8.1f}"
        for base in ("test_matmul_same_factors", "test_matmul_square"):
            if base in rates and not name.startswith("test_matmul"):
                line += f"   {rate / rates[base]:6.1%} of {base[12:]}"
        print(line)


def _register(benchmark, name, flops):
    FLOPS[name] = (flops, benchmark)
    benchmark.extra_info["gflop"] = flops / 1e9


@pytest.mark.benchmark(group="factored")
def test_factored_histogram(benchmark, factors, best_path):
    """Round 0 of the exact thresholds (every entry of every task counted)."""
    _register(benchmark, "test_factored_histogram", 2 * F_R * F_M * F_C * F_N)
    tasks = list(range(F_N))
    benchmark(lambda: factor_ops.histogram(ops.MagnitudeThreshold(F_N, TOP_K), factors, 0.0, 0, "m", tasks))


@pytest.mark.benchmark(group="factored")
def test_factored_sample_pass(benchmark, factors, best_path):
    """Pass 0 of the sampled thresholds (what merges use): the 1/16 lattice of every task's
    entries, registered with 1/16 of a full pass's flops, so its GFLOP/s against the window
    pass's compares the time per entry."""
    _register(benchmark, "test_factored_sample_pass", 2 * F_R * F_M * F_C * F_N // 16)
    tasks = list(range(F_N))
    benchmark(
        lambda: factor_ops.histogram(ops.MagnitudeThreshold(F_N, TOP_K, sampled=True), factors, 0.0, 0, "m", tasks)
    )


@pytest.mark.benchmark(group="factored")
def test_factored_window_pass(benchmark, factors, best_path):
    """Pass 1 of the sampled thresholds: every entry, counted below or inside the sample's window
    (each round adds to the same open pass: the counts grow, the work per round does not)."""
    _register(benchmark, "test_factored_window_pass", 2 * F_R * F_M * F_C * F_N)
    tasks = list(range(F_N))
    sel = ops.MagnitudeThreshold(F_N, TOP_K, sampled=True)
    factor_ops.histogram(sel, factors, 0.0, 0, "m", tasks)
    sel.finish_round()
    benchmark(factor_ops.histogram, sel, factors, 0.0, 0, "m", tasks)


@pytest.mark.benchmark(group="factored")
def test_factored_ties_apply(benchmark, factors, factored_thresholds, best_path):
    _register(benchmark, "test_factored_ties_apply", 2 * F_R * F_M * F_C * F_N)
    out = torch.empty(F_M, F_C)
    tasks = list(range(F_N))
    benchmark(factor_ops.ties_apply, factors, factored_thresholds, 1.0, 0.0, 0, "m", tasks, out=out)


@pytest.mark.benchmark(group="factored")
def test_factored_dare_ties_apply(benchmark, factors, factored_thresholds, best_path):
    _register(benchmark, "test_factored_dare_ties_apply", 2 * F_R * F_M * F_C * F_N)
    out = torch.empty(F_M, F_C)
    tasks = list(range(F_N))
    benchmark(factor_ops.ties_apply, factors, factored_thresholds, 1.0, 0.5, 1, "m", tasks, out=out)


@pytest.mark.benchmark(group="factored")
def test_factored_weighted_sum(benchmark, factors, best_path):
    _register(benchmark, "test_factored_weighted_sum", 2 * F_R * F_M * F_C * F_N)
    out = torch.empty(F_M, F_C)
    benchmark(factor_ops.weighted_sum, factors, [1.0] * F_N, 0.0, 0, "m", list(range(F_N)), out=out)


@pytest.mark.benchmark(group="factored")
def test_matmul_same_factors(benchmark, factors):
    """torch.matmul on one task's factors: (m x r) @ (r x c)."""
    _register(benchmark, "test_matmul_same_factors", 2 * F_R * F_M * F_C)
    P, Q, _ = factors[0]
    out = torch.empty(F_M, F_C)
    benchmark(torch.matmul, P, Q, out=out)


@pytest.mark.benchmark(group="factored")
def test_matmul_square(benchmark):
    _register(benchmark, "test_matmul_square", 2 * SQUARE**3)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(SQUARE, SQUARE, generator=g), torch.randn(SQUARE, SQUARE, generator=g)
    out = torch.empty(SQUARE, SQUARE)
    benchmark(torch.matmul, a, b, out=out)


@pytest.mark.benchmark(group="factored")
def test_row_ties_apply_materialised(benchmark, factors, factored_thresholds, best_path):
    """The row kernel on the materialised rows (n x m*c float32, built once, outside the timing):
    registered with the fused kernels' flop count, so its 'GFLOP/s' compares time per entry-task."""
    _register(benchmark, "test_row_ties_apply_materialised", 2 * F_R * F_M * F_C * F_N)
    rows = torch.stack([(s * (P @ Q)).reshape(-1) for P, Q, s in factors])
    out = torch.empty(F_M * F_C)
    benchmark(ops.ties_apply, rows, factored_thresholds, 1.0, out=out)
