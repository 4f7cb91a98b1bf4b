"""The factor-fused kernels (knots_ext.factor_ops; csrc/cpu/factored.cpp) against float64 references
on the materialised rows: task i's row is the m x c matrix s_i * P_i @ Q_i (flattened row-major,
element a * c + b), never stored by the kernels.

Integer-valued factors with power-of-two scales make every float32 product and sum exact, so
thresholds, sign sums and zero-sum positions are compared exactly with the float64 references.
With continuous factors each entry is checked bit for bit against an independent float32 model
of the kernels' rounding (a chain of correctly rounded fused multiply-adds in k order from +0,
then one rounded product by s; csrc/common/factor_math.h), and against float64 P @ Q within the
float32 error bound; the merges are then compared with the float64 references of those float32
rows (the row kernels' contract) and with the row kernels bit for bit."""
import math

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import _C, factor_ops, ops

from conftest import (
    F64, U32, assert_ta_matches, assert_thresholds_equal, assert_ties_matches, dare_keep_mask, dare_ref32, gen,
    ref_threshold, ref_ties,
)

MODULE = "model.layers.3.self_attn.q_proj"


# --------------------------------------------------------------------------------------------
# Test data and references


def int_factors(m, c, ranks, seed, scales=None):
    """Integer factors in [-8, 8] and power-of-two scales: every float32 entry, product and sum
    of the kernels is exact (|entries| <= 64 r * 2 < 2^24)."""
    g = gen(seed)
    scales = scales or [2.0 ** (1 - (i % 4)) * (-1) ** i for i in range(len(ranks))]
    return [(torch.randint(-8, 9, (m, r), generator=g).float(), torch.randint(-8, 9, (r, c), generator=g).float(), s)
            for r, s in zip(ranks, scales)]


def rand_factors(m, c, ranks, seed):
    """Continuous factors of different magnitudes per task, scales of both signs."""
    g = gen(seed)
    out = []
    for i, r in enumerate(ranks):
        P = torch.randn(m, r, generator=g) * math.exp(torch.randn(1, generator=g).item())
        Q = torch.randn(r, c, generator=g) / math.sqrt(r)
        out.append((P, Q, (0.3 + i) * (-1) ** i))
    return out


def rows64(factors) -> torch.Tensor:
    """(n, m * c) float64 rows s * P @ Q (exact for integer factors)."""
    return torch.stack([(float(s) * (P.to(F64) @ Q.to(F64))).reshape(-1) for P, Q, s in factors])


def fma32(a, b, c):
    """float32 fma(a, b, c) rounded once, elementwise (numpy float32 arrays): the product is exact
    in float64; the float64 sum and its exact error (TwoSum) decide the float32 rounding, with the
    one case float64 rounding could hide (a float64 sum exactly halfway between two float32
    values) resolved by the error's sign."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    r = s.astype(np.float32)
    d = s - r.astype(np.float64)
    toward = np.nextafter(r, np.where(d > 0, np.float32(np.inf), np.float32(-np.inf))).astype(np.float32)
    halfway = (d != 0) & (s == (r.astype(np.float64) + toward.astype(np.float64)) / 2)
    fix = halfway & (err != 0) & ((err > 0) == (d > 0))
    return np.where(fix, toward, r)


def entries32(P, Q, s) -> np.ndarray:
    """The kernels' float32 entries, modelled independently: fma chain over k from +0, times s."""
    P = P.float().numpy()
    Q = Q.float().numpy()
    acc = np.zeros((P.shape[0], Q.shape[1]), dtype=np.float32)
    for k in range(P.shape[1]):
        acc = fma32(np.broadcast_to(P[:, k : k + 1], acc.shape), np.broadcast_to(Q[k : k + 1, :], acc.shape), acc)
    return (np.float32(s) * acc).astype(np.float32).reshape(-1)


def rows32(factors) -> torch.Tensor:
    """(n, m * c) float32 rows as the kernels compute them."""
    return torch.stack([torch.from_numpy(entries32(P, Q, s)) for P, Q, s in factors])


def thresholds_of(factors, top_k, dare_p=0.0, seed=0, tasks=None):
    tasks = list(range(len(factors))) if tasks is None else tasks
    sel = ops.MagnitudeThreshold(len(factors), top_k)
    rounds = 0
    while not sel.done:
        factor_ops.histogram(sel, factors, dare_p, seed, MODULE, tasks, slots=range(len(factors)))
        sel.finish_round()
        rounds += 1
    assert rounds <= 2
    return sel.thresholds()


def dared(rows, p, seed, tasks):
    """float32 rows after DARE with the contract's masks (element index a * c + b)."""
    return torch.stack([dare_ref32(rows[i], p, seed, t, MODULE) for i, t in enumerate(tasks)])


def ties_all(factors, thresholds, lam, dare_p=0.0, seed=0, tasks=None):
    """factor_ops.ties_apply + ties_fix_majority: (merged, sign_sum, positions, applied copy)."""
    tasks = list(range(len(factors))) if tasks is None else tasks
    out, sign_sum, positions = factor_ops.ties_apply(factors, thresholds, lam, dare_p, seed, MODULE, tasks)
    applied = out.clone()
    majority = (sign_sum > 0) - (sign_sum < 0)
    if positions:
        factor_ops.ties_fix_majority(factors, out, thresholds, positions, majority, lam, dare_p, seed, MODULE, tasks)
    return out, sign_sum, positions, applied


def check_against_rows(factors, x, top_k, lam, dare_p=0.0, seed=0, tasks=None, exact_thresholds=None):
    """Every factored op against the references on x, the (n, m*c) float32 rows after DARE, and
    against the row kernels (knots_ext.ops) on x bit for bit."""
    n = len(factors)
    tasks = list(range(n)) if tasks is None else tasks
    m, c = factor_ops.shape_of(factors)
    thr = thresholds_of(factors, top_k, dare_p, seed, tasks)
    assert_thresholds_equal(thr, [ref_threshold(x[r].to(F64), top_k) for r in range(n)])
    assert_thresholds_equal(thr, ops.magnitude_threshold(x, top_k), "factored vs row-kernel thresholds")
    if exact_thresholds is not None:
        assert_thresholds_equal(thr, exact_thresholds, "thresholds of the float64 rows")

    out, sign_sum, positions, applied = ties_all(factors, thr, lam, dare_p, seed, tasks)
    assert out.shape == (m, c) and out.dtype == torch.float32
    ref = ref_ties(x, lam=lam, thresholds=thr)
    assert sign_sum == ref.sign_sum
    assert positions == torch.nonzero(ref.zero_sum).reshape(-1).tolist()  # sorted
    assert bool((applied.reshape(-1)[ref.zero_sum] == 0).all())
    assert_ties_matches(out.reshape(-1), ref, torch.float32, "factored TIES")
    row_out, row_signs, row_positions = ops.ties_apply(x, thr, lam)
    assert row_signs == sign_sum and row_positions == positions
    assert torch.equal(applied.reshape(-1), row_out), "factored ties_apply differs from the row kernel"
    ops.ties_fix_majority(x, row_out, thr, row_positions, row_signs, lam)
    assert torch.equal(out.reshape(-1), row_out), "factored majority fix differs from the row kernel"

    weights = [0.5 + 0.25 * i * (-1) ** i for i in range(n)]
    ta = factor_ops.weighted_sum(factors, weights, dare_p, seed, MODULE, tasks)
    assert ta.shape == (m, c) and ta.dtype == torch.float32
    w32 = torch.tensor(weights, dtype=torch.float32).to(F64)[:, None]
    assert_ta_matches(ta.reshape(-1), w32 * x.to(F64))
    assert torch.equal(ta.reshape(-1), ops.task_arithmetic(x, 1.0, weights=weights))
    return thr, ref


# --------------------------------------------------------------------------------------------
# 1. The entries: the fma chain, bit for bit, and close to float64


@pytest.mark.parametrize("m,c,ranks", [(37, 131, [1, 3, 16, 64]), (1, 131, [5, 2]), (37, 1, [16, 1]),
                                        (130, 97, [64, 7]), (4, 48, [0, 2])])
def test_entries_are_the_fma_chain(m, c, ranks):
    factors = rand_factors(m, c, ranks, seed=m * c + len(ranks))
    for i, (P, Q, s) in enumerate(factors):
        got = factor_ops.weighted_sum([(P, Q, s)], [1.0], 0.0, 0, MODULE, [i]).reshape(-1)
        # weight 1 and one task: the sum is the entry itself (0 + 1 * v)
        np.testing.assert_array_equal(got.numpy(), entries32(P, Q, s) + np.float32(0))
        exact = rows64([(P, Q, s)])[0]
        bound = (P.shape[1] + 2) * U32 * abs(float(s)) * (P.abs().to(F64) @ Q.abs().to(F64)).reshape(-1)
        assert bool(((got.to(F64) - exact).abs() <= bound + 1e-45).all())


def test_fma_model_is_the_fused_rounding():
    """The test's fma model where rounding the float64 sum to float32 would round twice: a * b + c
    = (1 + 2^-23) + 2^-24 (1 - 2^-46) lies just below the float32 midpoint 1 + 2^-23 + 2^-24, but
    its float64 rounding is that midpoint, which ties to the even 1 + 2^-22."""
    a = np.array([1 + 2.0 ** -23], dtype=np.float32)
    b = np.array([2.0 ** -24 * (1 - 2.0 ** -23)], dtype=np.float32)
    c = np.array([1 + 2.0 ** -23], dtype=np.float32)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert naive[0] == np.float32(1 + 2.0 ** -22)
    assert fma32(a, b, c)[0] == np.float32(1 + 2.0 ** -23)
    # and where the float64 sum is exact, the plain rounding
    assert fma32(np.float32([3.0]), np.float32([0.5]), np.float32([-1.0]))[0] == np.float32(0.5)


# --------------------------------------------------------------------------------------------
# 2. Exact data: thresholds, zero sums and the majority fix equal the float64 references


@pytest.mark.parametrize("m,c,ranks", [(37, 131, [1, 3, 16, 64]), (1, 131, [3, 16]), (37, 1, [64, 1, 2]),
                                        (61, 257, [16] * 7), (5, 7, [3])])
@pytest.mark.parametrize("top_k", [0.2, 0.5, 1.0])
def test_integer_factors_exact(m, c, ranks, top_k):
    factors = int_factors(m, c, ranks, seed=7 * m + c)
    x64 = rows64(factors)
    x = x64.to(torch.float32)
    assert torch.equal(x.to(F64), x64)  # exact data
    assert torch.equal(rows32(factors), x)
    check_against_rows(factors, x, top_k, lam=-0.75,
                       exact_thresholds=[ref_threshold(x64[r], top_k) for r in range(len(ranks))])


def cancelling_factors(m, c, seed):
    """Tasks whose trimmed sums are exactly 0 at many positions: task 1 = -task 0 on some rows
    (its P rows negated), task 2 small; and signs leaning to -1 elsewhere."""
    g = gen(seed)
    P0 = torch.randint(1, 9, (m, 4), generator=g).float()
    Q0 = -torch.randint(1, 9, (4, c), generator=g).float()
    P1 = torch.randint(-8, 9, (m, 4), generator=g).float()
    P1[::3] = -P0[::3]
    P2 = torch.randint(-2, 3, (m, 2), generator=g).float()
    Q2 = torch.randint(-2, 3, (2, c), generator=g).float()
    P2[::3] = 0.0
    return [(P0, Q0, 1.0), (P1, Q0, 1.0), (P2, Q2, 0.5)]


@pytest.mark.parametrize("c", [131, 128])  # (128: every tile's rows whole, 64-byte aligned: the avx512 finish)
def test_zero_sum_positions_and_majority_fix(c):
    factors = cancelling_factors(37, c, seed=3)
    x = rows64(factors).to(torch.float32)
    thr, ref = check_against_rows(factors, x, top_k=0.6, lam=1.5)
    assert int(ref.zero_sum.sum()) > 100 and ref.majority == -1
    # the fix uses the majority it is given (e.g. that of several modules): +1 and 0 too
    out, _, positions = factor_ops.ties_apply(factors, thr, 1.5, 0.0, 0, MODULE, [0, 1, 2])
    for majority in (1, 0):
        fixed = out.clone()
        factor_ops.ties_fix_majority(factors, fixed, thr, positions, majority, 1.5, 0.0, 0, MODULE, [0, 1, 2])
        row_out, _, row_positions = ops.ties_apply(x, thr, 1.5)
        ops.ties_fix_majority(x, row_out, thr, row_positions, majority, 1.5)
        assert torch.equal(fixed.reshape(-1), row_out)
        expected = ref.merged_with_sign(torch.where(ref.tsum == 0, float(majority), ref.elected))
        assert bool(((fixed.reshape(-1).to(F64) - expected).abs() <= 3 * U32 * expected.abs()).all())
        assert bool((fixed.reshape(-1)[ref.zero_sum] != 0).all()) == (majority != 0)


# --------------------------------------------------------------------------------------------
# 3. Continuous data, several n, DARE


@pytest.mark.parametrize("n,m,c,top_k", [(1, 37, 131, 0.2), (2, 64, 200, 0.1), (7, 37, 131, 0.3),
                                          (40, 23, 53, 0.25)])
def test_continuous_factors(n, m, c, top_k):
    ranks = [[1, 3, 16, 64][i % 4] for i in range(n)]
    factors = rand_factors(m, c, ranks, seed=n * 1000 + m)
    x = rows32(factors)
    check_against_rows(factors, x, top_k, lam=1.25)


def test_many_tasks_with_p_rows_gathered():
    """Enough tasks that the tile-major kernels gather every task's P rows under a row of tiles
    side by side (csrc/cpu/factored.cpp: TileRowsOfP, more than 256 KB: 80 tasks x 15 rows x rank
    64), in rows of tiles of 15, 15 and 1 rows: TIES, with and without DARE, and TA equal the
    references."""
    factors = rand_factors(31, 64, [64] * 80, seed=21)
    x = rows32(factors)
    check_against_rows(factors, x, 0.2, lam=1.1)
    p, seed, tasks = 0.3, 7, list(range(80))
    check_against_rows(factors, dared(x, p, seed, tasks), 0.2, lam=0.9, dare_p=p, seed=seed, tasks=tasks)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("m,c", [(37, 131), (31, 96)])  # and tiles of whole 32-column rows, an odd number
def test_dare_masks_follow_the_contract(exact, m, c):
    p, seed = 0.35, 2 ** 40 + 11
    tasks = [4, 0, 9]
    factors = (int_factors if exact else rand_factors)(m, c, [3, 16, 64], seed=5)
    x = rows32(factors)
    for i, (task, f) in enumerate(zip(tasks, factors)):
        got = factor_ops.weighted_sum([f], [1.0], p, seed, MODULE, [task]).reshape(-1)
        np.testing.assert_array_equal(got.numpy(), dare_ref32(x[i], p, seed, task, MODULE).numpy() + np.float32(0))
        keep = dare_keep_mask(m * c, p, seed, task, MODULE)
        assert bool((got.numpy()[~keep] == 0).all()) and 0.55 < keep.mean() < 0.75
    check_against_rows(factors, dared(x, p, seed, tasks), 0.3, lam=0.8, dare_p=p, seed=seed, tasks=tasks)


# --------------------------------------------------------------------------------------------
# 4. The same bits for any thread count and CPU path


def everything(factors, dare_p=0.3, seed=5):
    tasks = list(range(len(factors)))
    thr = thresholds_of(factors, 0.25, dare_p, seed)
    out, sign_sum, positions, applied = ties_all(factors, thr, 0.9, dare_p, seed)
    ta = factor_ops.weighted_sum(factors, [1.0, -0.5, 2.0, 0.25][: len(factors)], dare_p, seed, MODULE, tasks)
    return thr, out, sign_sum, positions, applied, ta


def assert_same(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u.view(torch.int32), v.view(torch.int32)), f"{what}: result {i} differs"
        else:
            assert u == v, f"{what}: result {i} differs"


def test_thread_count_does_not_change_bits(restore_threads):
    factors = rand_factors(301, 257, [1, 16, 64, 3], seed=11)
    results = []
    for threads in (1, 2):
        knots_ext.set_num_threads(threads)
        results.append(everything(factors) + everything(cancelling_factors(101, 131, seed=4), 0.0, 0))
    assert_same(results[0], results[1], "1 vs 2 threads")


def test_cpu_paths_bit_identical():
    paths = knots_ext.build_info()["cpu_paths"]
    if len(paths) < 2:
        pytest.skip(f"this build has one CPU path only ({paths})")
    before = knots_ext.build_info()["cpu_path"]
    factors = rand_factors(41, 75, [1, 16, 5], seed=12)  # small: the baseline path calls fmaf
    # the sample pass's histograms (its state's bytes), with DARE on 4-row sample blocks, and the
    # thresholds after the window pass (whose listed keys the threads append in any order)
    # (c a multiple of 4: runs of a row start on Philox block boundaries, DARE's vector paths)
    tall = rand_factors(300, 132, [16, 5, 8], seed=13)

    def sampled_states(dare_p):  # (without DARE, avx512 tests the window on the registers)
        sel = ops.MagnitudeThreshold(len(tall), 0.2, sampled=True)
        factor_ops.histogram(sel, tall, dare_p, 3, MODULE, [0, 1, 2])
        state = sel._sel.__getstate__()
        sel.finish_round()
        while not sel.done:
            factor_ops.histogram(sel, tall, dare_p, 3, MODULE, [0, 1, 2])
            sel.finish_round()
        return (state, *sel.thresholds())

    results = []
    try:
        for name in paths:
            _C.set_cpu_path(name)
            results.append(everything(factors) + everything(cancelling_factors(13, 29, seed=4), 0.0, 0)
                           + everything(tall) + sampled_states(0.4) + sampled_states(0.0))
    finally:
        _C.set_cpu_path(before)
    for name, other in zip(paths[1:], results[1:]):
        assert_same(results[0], other, f"baseline vs the {name} path")


# --------------------------------------------------------------------------------------------
# 5. Inputs: layouts and dtypes, non-finite values, refusals


def test_any_layout_and_float_dtype():
    factors = int_factors(19, 33, [3, 5], seed=9)
    ref = everything(factors)
    for convert in (lambda t: t.to(torch.bfloat16), lambda t: t.T.contiguous().T, lambda t: t.to(F64), np.asarray):
        other = [(convert(P), convert(Q), s) for P, Q, s in factors]
        assert_same(everything(other), ref, "converted factors")


def test_out_is_written_in_place():
    f = int_factors(19, 33, [3, 5], seed=9)
    thr = thresholds_of(f, 0.3)
    out = torch.full((19, 33), 7.0)
    got, sign_sum, positions = factor_ops.ties_apply(f, thr, 1.0, 0.0, 0, MODULE, [0, 1], out=out)
    assert got is out
    assert (sign_sum, positions) == factor_ops.ties_apply(f, thr, 1.0, 0.0, 0, MODULE, [0, 1])[1:]
    assert torch.equal(out, factor_ops.ties_apply(f, thr, 1.0, 0.0, 0, MODULE, [0, 1])[0])
    flat = torch.full((19 * 33,), 7.0)  # any shape with m * c elements, contiguous
    assert factor_ops.weighted_sum(f, [1.0, 2.0], 0.0, 0, MODULE, [0, 1], out=flat) is flat
    assert torch.equal(flat, factor_ops.weighted_sum(f, [1.0, 2.0], 0.0, 0, MODULE, [0, 1]).reshape(-1))
    one_line_error(lambda: factor_ops.weighted_sum(f, [1.0, 2.0], 0.0, 0, MODULE, [0, 1], out=torch.zeros(3)),
                   "^out must be a contiguous")


def test_kept_memory_across_calls():
    """The Q panels live in memory the calling thread keeps from call to call (kernels.h
    kept_floats): calls with more tasks, then fewer, then wider, then after it is released,
    each give the references' results (a panel left from an earlier call would show)."""
    cases = [rand_factors(23, 96, [16] * 9, seed=1), rand_factors(23, 64, [4, 16], seed=2),
             rand_factors(9, 320, [64] * 3, seed=3)]
    firsts = []
    for factors in cases:
        thr = thresholds_of(factors, 0.3)
        firsts.append((thr, factor_ops.ties_apply(factors, thr, 1.0, 0.0, 0, MODULE, list(range(len(factors))))[0]))
        check_against_rows(factors, rows32(factors), 0.3, lam=1.0)
    factor_ops.release_kept_memory()
    for factors, (thr, first) in zip(cases, firsts):
        again = factor_ops.ties_apply(factors, thr, 1.0, 0.0, 0, MODULE, list(range(len(factors))))[0]
        assert torch.equal(again, first)
        factor_ops.release_kept_memory()


def test_empty_rows():
    factors = [(torch.zeros(0, 3), torch.zeros(3, 5), 1.0)]
    out, sign_sum, positions = factor_ops.ties_apply(factors, [0.0], 1.0, 0.0, 0, MODULE, [0])
    assert out.shape == (0, 5) and sign_sum == 0 and positions == []
    assert factor_ops.weighted_sum(factors, [1.0], 0.0, 0, MODULE, [0]).shape == (0, 5)


def test_nonfinite_rows_are_detected():
    finite = int_factors(9, 21, [2, 3], seed=1)
    P, Q, s = finite[1]
    P = P.clone()
    P[4, 1] = math.inf
    bad = [finite[0], (P, Q, s)]
    huge = [finite[0], (finite[1][0] * 1e30, finite[1][1] * 1e30, 1.0)]  # finite factors, rows overflow
    # the dot products overflow, a tiny scale would bring them back; and a huge scale overflows
    scaled_down = [finite[0], (finite[1][0] * 1e25, finite[1][1] * 1e25, 1e-40)]
    scaled_up = [finite[0], (finite[1][0], finite[1][1], 3e38)]
    for factors in (bad, huge, scaled_down, scaled_up):
        assert factor_ops.is_finite(factors[0]) and not factor_ops.is_finite(factors[1])
        with pytest.raises(ValueError, match="NaN or Inf"):
            factor_ops.ties_apply(factors, [0.0, 0.0], 1.0, 0.0, 0, MODULE, [0, 1])
        with pytest.raises(ValueError, match="NaN or Inf"):
            factor_ops.weighted_sum(factors, [1.0, 1.0], 0.0, 0, MODULE, [0, 1])
        sel = ops.MagnitudeThreshold(2, 0.5)
        factor_ops.histogram(sel, factors, 0.0, 0, MODULE, [0, 1])
        with pytest.raises(ValueError, match="NaN or Inf"):
            sel.finish_round()


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


def test_bad_inputs_refused():
    f = int_factors(6, 10, [2, 3], seed=1)
    P, Q, s = f[0]
    thr, tasks = [0.0, 0.0], [0, 1]
    one_line_error(lambda: factor_ops.ties_apply([], [], 1.0, 0.0, 0, MODULE, []), "no task factors")
    one_line_error(lambda: factor_ops.ties_apply([(P, Q[:1], s), f[1]], thr, 1.0, 0.0, 0, MODULE, tasks),
                   r"factors\[0\]: P \(6, 2\) and Q \(1, 10\)")
    one_line_error(lambda: factor_ops.ties_apply([f[0], (f[1][0][:5], f[1][1], 1.0)], thr, 1.0, 0.0, 0, MODULE,
                                                 tasks), r"factors\[1\]: the row is 5 x 10, task 0's is 6 x 10")
    one_line_error(lambda: factor_ops.weighted_sum([f[0], (f[1][0], f[1][1][:, :9], 1.0)], [1.0, 1.0], 0.0, 0,
                                                   MODULE, tasks), r"the row is 6 x 9")
    one_line_error(lambda: factor_ops.ties_apply([(P.reshape(-1), Q, s)], [0.0], 1.0, 0.0, 0, MODULE, [0]),
                   "not .* factors")
    one_line_error(lambda: factor_ops.ties_apply([(P, Q, math.nan)], [0.0], 1.0, 0.0, 0, MODULE, [0]),
                   r"factors\[0\] scale must be a finite float32")
    one_line_error(lambda: factor_ops.ties_apply([(P, Q, 1e39)], [0.0], 1.0, 0.0, 0, MODULE, [0]), "finite float32")
    one_line_error(lambda: factor_ops.ties_apply(f, thr, math.inf, 0.0, 0, MODULE, tasks), "lam must be")
    one_line_error(lambda: factor_ops.ties_apply(f, [0.0], 1.0, 0.0, 0, MODULE, tasks), "thresholds has 1 entries")
    one_line_error(lambda: factor_ops.ties_apply(f, thr, 1.0, 0.0, 0, MODULE, [0]), "tasks has 1 entries")
    one_line_error(lambda: factor_ops.ties_apply(f, thr, 1.0, 0.0, 0, MODULE, [0, -1]), "task indices must be >= 0")
    one_line_error(lambda: factor_ops.ties_apply(f, thr, 1.0, 1.0, 0, MODULE, tasks), "dare_p must be in")
    one_line_error(lambda: factor_ops.ties_apply(f, thr, 1.0, 0.1, -1, MODULE, tasks), "seed must be in")
    one_line_error(lambda: factor_ops.weighted_sum(f, [1.0], 0.0, 0, MODULE, tasks), "weights has 1 entries")
    one_line_error(lambda: factor_ops.weighted_sum(f, [1.0, math.nan], 0.0, 0, MODULE, tasks), "weights")
    out = torch.zeros(6, 10)
    one_line_error(lambda: factor_ops.ties_fix_majority(f, out, thr, [60], 1, 1.0, 0.0, 0, MODULE, tasks),
                   "position out of range")
    one_line_error(lambda: factor_ops.ties_fix_majority(f, out, thr, [-1], 1, 1.0, 0.0, 0, MODULE, tasks),
                   "position out of range")
    for bad in (torch.zeros(6, 9), torch.zeros(6, 10, dtype=F64), torch.zeros(10, 6).T):
        one_line_error(lambda: factor_ops.ties_fix_majority(f, bad, thr, [0], 1, 1.0, 0.0, 0, MODULE, tasks),
                       "^out must be a contiguous")
    sel = ops.MagnitudeThreshold(1, 0.5)
    one_line_error(lambda: factor_ops.histogram(sel, f, 0.0, 0, MODULE, tasks), "task index out of range")
    one_line_error(lambda: factor_ops.histogram(sel, f, 0.0, 0, MODULE, tasks, slots=[0]), "one threshold slot")
