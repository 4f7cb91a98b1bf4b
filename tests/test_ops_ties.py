"""ties_merge / ties_apply / ties_fix_majority against the float64 TIES reference of DESIGN.md §1
(trim to the top_k fraction per row with k = N - floor(N * top_k) and |x| >= kth kept; elect the
sign of the trimmed sum, exact zeros taking the majority sign; disjoint mean times lam)."""
import math

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import ops

from conftest import (
    F64, assert_thresholds_equal, assert_ties_matches, dare_ref32, quantized, randn_rows, ref_threshold, ref_ties,
    zero_sum_data,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_merge(x, top_k, lam=1.0, out_dtype=torch.float32, **kw):
    out, thr = ops.ties_merge(x, top_k, lam, return_thresholds=True, **kw)
    ref = ref_ties(x, top_k, lam)
    assert_thresholds_equal(thr, ref.thresholds)
    assert out.dtype == out_dtype
    assert_ties_matches(out, ref, out_dtype)
    return out, ref


# --------------------------------------------------------------------------------------------
# 1. ties_merge on random data


@pytest.mark.parametrize("top_k", [1.0, 0.5, 0.2, 0.05, 1e-9])
@pytest.mark.parametrize("n,P", [(1, 1000), (3, 777), (4, 5000), (8, 3001), (5, 40000), (3, 120000)])
@pytest.mark.parametrize("lam", [1.0, -0.7])
def test_ties_merge_random(n, P, top_k, lam):
    x = randn_rows(n, P, seed=1000 * n + P)
    out, ref = check_merge(x, top_k, lam)
    # the comparison is not vacuous: something survives the trim, and all of it at top_k = 1
    assert int((ref.out != 0).sum()) > 0
    if top_k >= 1.0:
        assert ref.thresholds == [0.0] * n
        assert bool((ref.trimmed == ref.x).all())
    if top_k == 0.0:
        assert ref.thresholds == [ref.x[r].abs().max().item() for r in range(n)]


def test_ties_merge_large_multithreaded():
    """P = 300k, several rows: the multi-threaded tile path and the sampled bracket."""
    x = randn_rows(4, 300_000, seed=7)
    for top_k in (0.2, 0.01):
        check_merge(x, top_k, lam=1.3)


def test_ties_merge_single_thread_equals_reference(restore_threads):
    x = randn_rows(3, 100_000, seed=8)
    for threads in (1, 2):
        knots_ext.set_num_threads(threads)
        check_merge(x, 0.3, lam=0.9)


def test_ties_merge_n1_is_trimmed_row_times_lam():
    x = randn_rows(1, 50_000, seed=9)
    out, thr = ops.ties_merge(x, 0.1, -2.0, return_thresholds=True)
    t = ref_threshold(x[0].double(), 0.1)
    assert thr == [t]
    expected = torch.where(x[0].double().abs() >= t, -2.0 * x[0].double(), torch.zeros((), dtype=F64))
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -23, atol=0)
    # distinct magnitudes: the kept entries are ranks k..N, i.e. floor(N * top_k) + 1 of them
    assert int((out != 0).sum()) == math.floor(50_000 * 0.1) + 1


# --------------------------------------------------------------------------------------------
# Ties in magnitude, zeros, exact-zero trimmed sums


@pytest.mark.parametrize("top_k", [0.5, 0.2, 0.05, 1e-9, 1.0])
@pytest.mark.parametrize("n,P", [(3, 1000), (4, 50_000), (3, 200_000)])
def test_ties_merge_heavy_ties_integer_data(n, P, top_k):
    """Integer-valued data with few distinct magnitudes: every entry equal to the threshold is
    kept (the kept count exceeds the top_k fraction), and float32 sums are exact."""
    g = gen(P + n)
    x = torch.randint(-5, 6, (n, P), generator=g).to(torch.float32)
    out, ref = check_merge(x, top_k, lam=0.5)
    for r in range(n):
        t = ref.thresholds[r]
        kept = int((ref.x[r].abs() >= t).sum())
        if 0 < top_k < 1:
            assert int((ref.x[r].abs() == t).sum()) > 1  # the test does exercise ties at the threshold
            assert kept >= math.floor(P * top_k) + 1


@pytest.mark.parametrize("top_k", [0.3, 0.07])
@pytest.mark.parametrize("n,P", [(4, 3000), (3, 70_000)])
def test_ties_merge_quantized_exact(n, P, top_k):
    """Quantized data (k / 256): many repeated magnitudes and exact float32 sums."""
    x = quantized((n, P), gen(n * P), scale_bits=8)
    check_merge(x, top_k, lam=-1.25)


@pytest.mark.parametrize("P", [500, 40_000])
@pytest.mark.parametrize("top_k", [0.5, 1e-9, 1.0])
def test_ties_merge_zero_rows(P, top_k):
    x = randn_rows(3, P, seed=P)
    x[1] = 0.0
    out, ref = check_merge(x, top_k)
    assert ref.thresholds[1] == 0.0
    zeros = torch.zeros(3, P)
    out, thr = ops.ties_merge(zeros, top_k, 2.0, return_thresholds=True)
    assert thr == [0.0, 0.0, 0.0]
    assert torch.equal(out, torch.zeros(P))


@pytest.mark.parametrize("majority", [-1, 1])
@pytest.mark.parametrize("P", [2000, 60_000])
@pytest.mark.parametrize("top_k", [1.0, 0.3])
def test_ties_merge_exact_zero_sum_takes_majority_sign(majority, P, top_k):
    x, z1, z2 = zero_sum_data(3, P, majority, seed=P + majority)
    out, ref = check_merge(x, top_k, lam=1.5)
    assert ref.majority == majority
    assert bool(ref.zero_sum[z1].all()) and bool(ref.zero_sum[z2].all())
    got = out.double()
    # (+a, -a): the one entry with the majority sign; (+a, -a/2, -a/2): a, or the mean of the halves
    a = x[0].double()
    exp1 = 1.5 * (a if majority > 0 else -a)
    exp2 = 1.5 * (a if majority > 0 else -a / 2)
    assert torch.equal(got[z1], exp1[z1])
    assert torch.equal(got[z2], exp2[z2])


# --------------------------------------------------------------------------------------------
# dtypes, layouts, libraries


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,P", [(3, 5000), (4, 70_000)])
@pytest.mark.parametrize("top_k", [0.2, 1.0, 1e-9])
def test_ties_merge_half_dtypes(dtype, n, P, top_k):
    x = randn_rows(n, P, seed=P + n, dtype=dtype)
    if dtype == torch.float16:
        x[-1] = (x[-1].float() * 1e-4).to(dtype)  # a row of fp16 subnormals and small normals
    check_merge(x, top_k, lam=-1.5, out_dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ties_merge_non_contiguous(dtype):
    g = gen(11)
    P, n = 45_000, 3
    base = torch.randn(P, n, generator=g).to(dtype)
    xt = base.T  # (n, P): each row is a run with element stride n
    assert not xt.is_contiguous()
    check_merge(xt, 0.25, lam=0.8, out_dtype=dtype)
    wide = torch.randn(n, 2 * P, generator=g).to(dtype)
    xs = wide[:, ::2]
    check_merge(xs, 0.25, lam=0.8, out_dtype=dtype)
    # a list of arrays of equal numel but different shapes and layouts
    P2 = 120
    arrays = [
        torch.randn(3, 40, generator=g).to(dtype),
        torch.randn(P2, generator=g).to(dtype),
        torch.randn(2, 120, generator=g).to(dtype)[:, ::2],  # one strided run, stride 2
        torch.randn(2, 60, generator=g).to(dtype).T,         # not one run: copied
    ]
    check_merge(arrays, 0.5, lam=1.0, out_dtype=dtype)
    check_merge(arrays, 1e-9, lam=1.0, out_dtype=dtype)


@pytest.mark.parametrize("np_dtype,t_dtype", [(np.float32, torch.float32), (np.float16, torch.float16)])
def test_ties_merge_numpy(np_dtype, t_dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 20_000)).astype(np_dtype)
    out, thr = ops.ties_merge(x, 0.2, 1.1, return_thresholds=True)
    assert isinstance(out, np.ndarray) and out.dtype == np_dtype and out.shape == (20_000,)
    ref = ref_ties(x, 0.2, 1.1)
    assert_thresholds_equal(thr, ref.thresholds)
    assert_ties_matches(out, ref, t_dtype)
    # a list of numpy arrays, one of them a transposed view
    arrays = [x[0].reshape(100, 200), x[1].reshape(200, 100).T.copy().T, x[2]]
    out2 = ops.ties_merge(arrays, 0.2, 1.1)
    assert isinstance(out2, np.ndarray)
    assert_ties_matches(out2, ref_ties(arrays, 0.2, 1.1), t_dtype)
    # numpy non-contiguous: a transposed 2-D array
    xt = np.ascontiguousarray(x.T).T
    assert not xt.flags.c_contiguous
    assert_ties_matches(ops.ties_merge(xt, 0.5), ref_ties(xt, 0.5), t_dtype)


# --------------------------------------------------------------------------------------------
# Inputs where a small sample misrepresents the data (ties_merge's exact fallback)


def test_ties_merge_sorted_rows():
    g = gen(21)
    x = torch.sort(torch.randn(3, 50_000, generator=g).abs() ** 3, dim=1).values
    x[1] = -x[1]
    for top_k in (0.5, 0.1, 0.001):
        check_merge(x, top_k)


def test_ties_merge_half_tiny_half_large():
    g = gen(22)
    P = 60_000
    x = torch.randn(3, P, generator=g)
    x[:, : P // 2] *= 1e-6
    x[1, P // 2:] *= 1e3
    for top_k in (0.49, 0.5, 0.51, 0.25):
        check_merge(x, top_k, lam=0.3)


def sampled_positions(P, tile=2048, block=64):
    """The positions ties_merge's bracket sample reads in each 2048-element tile (a 64-element
    block at offset (13 * 64 * tile) mod 2048), used to build data the sample misrepresents."""
    mask = torch.zeros(P, dtype=torch.bool)
    for t in range((P + tile - 1) // tile):
        j0 = t * tile + (t * 13 * block) % tile
        mask[j0:min(j0 + block, P)] = True
    return mask


@pytest.mark.parametrize("P", [50_000, 131_072])
def test_ties_merge_adversarial_to_sample(P):
    """Large magnitudes exactly where the sample looks, tiny ones elsewhere (and the reverse for
    another row): the sample's quantile is far from the true one, so a sampled bracket misses
    and the exact path must produce the result. Any correct TIES gives the reference anyway."""
    g = gen(P)
    s = sampled_positions(P)
    x = torch.rand(3, P, generator=g) * 1e-3 + 1e-3
    x[0, s] = torch.rand(int(s.sum()), generator=g) * 10 + 10
    x[1, ~s] = torch.rand(int((~s).sum()), generator=g) * 10 + 10
    x[2, s] = -(torch.rand(int(s.sum()), generator=g) * 10 + 10)
    x[:, ::3] *= -1
    for top_k in (0.5, 0.02, 0.9):
        check_merge(x, top_k, lam=1.0)


# --------------------------------------------------------------------------------------------
# DARE-TIES: ties_merge with dare_p equals the float64 reference on rows DARE'd by the
# independent Python mask (conftest.dare_ref32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P", [5000, 100_000])
def test_ties_merge_with_dare(dtype, P):
    x = randn_rows(3, P, seed=P + 3, dtype=dtype)
    p, seed, module, tasks, offset = 0.3, 1234, "model.layers.0.self_attn.q_proj", [4, 1, 7], 1_000_003
    dared = torch.stack([dare_ref32(x[r], p, seed, tasks[r], module, offset) for r in range(3)])
    assert 0.6 < float((dared != 0).double().mean()) < 0.8
    for top_k in (0.2, 1.0):
        out, thr = ops.ties_merge(x, top_k, 0.7, dare_p=p, seed=seed, module=module, tasks=tasks,
                                  elem_offset=offset, return_thresholds=True)
        ref = ref_ties(dared, top_k, 0.7)
        assert_thresholds_equal(thr, ref.thresholds)
        assert out.dtype == dtype
        assert_ties_matches(out, ref, dtype)


def test_ties_merge_dare_default_tasks_and_module_id():
    x = randn_rows(2, 9999, seed=31)
    p, seed = 0.5, 2 ** 63 + 5
    dared = torch.stack([dare_ref32(x[r], p, seed, r, 0xDEADBEEF) for r in range(2)])
    out = ops.ties_merge(x, 0.4, dare_p=p, seed=seed, module=0xDEADBEEF)
    assert_ties_matches(out, ref_ties(dared, 0.4))


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("P", [100, 50_000])
@pytest.mark.parametrize("top_k", [0.5, 1.0])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_ties_merge_nonfinite_raises(P, top_k, bad):
    x = randn_rows(3, P, seed=P)
    x[1, P // 3] = bad
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.ties_merge(x, top_k)


def test_ties_merge_nonfinite_half_raises():
    x = randn_rows(2, 3000, seed=1, dtype=torch.float16)
    x[0, 7] = math.inf
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.ties_merge(x, 0.2)
    x = randn_rows(2, 3000, seed=1, dtype=torch.bfloat16)
    x[1, 2999] = math.nan
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.ties_merge(x, 0.2)


def test_ties_merge_bad_arguments():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError, match="top_k"):
        ops.ties_merge(x, -0.1)
    with pytest.raises(ValueError, match="dare_p"):
        ops.ties_merge(x, 0.5, dare_p=1.0)
    with pytest.raises(ValueError, match="dare_p"):
        ops.ties_merge(x, 0.5, dare_p=-0.1)
    with pytest.raises(ValueError, match="shape"):
        ops.ties_merge(torch.randn(100), 0.5)
    with pytest.raises(ValueError, match="shape"):
        ops.ties_merge(torch.randn(2, 3, 4), 0.5)
    with pytest.raises(ValueError, match="elements"):
        ops.ties_merge([torch.randn(10), torch.randn(11)], 0.5)
    with pytest.raises(TypeError, match="float64"):
        ops.ties_merge(torch.randn(3, 100, dtype=torch.float64), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.ties_merge(torch.randint(0, 5, (3, 100)), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.ties_merge(np.ones((3, 100), dtype=np.int32), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.ties_merge([torch.randn(10), torch.randn(10).half()], 0.5)
    with pytest.raises(TypeError):
        ops.ties_merge([[1.0, 2.0], [3.0, 4.0]], 0.5)
    with pytest.raises(ValueError):
        ops.ties_merge([], 0.5)
    with pytest.raises(ValueError, match="tasks"):
        ops.ties_merge(x, 0.5, tasks=[0, 1])
    with pytest.raises(ValueError, match="tasks|task"):
        ops.ties_merge(x, 0.5, dare_p=0.1, tasks=[0, -1, 2])


# --------------------------------------------------------------------------------------------
# 2. ties_apply + ties_fix_majority with given thresholds


def check_apply(x, thresholds, lam, ref, out_dtype=torch.float32):
    out, sign_sum, positions = ops.ties_apply(x, thresholds, lam)
    assert out.dtype == out_dtype
    assert sign_sum == ref.sign_sum
    expected_pos = torch.nonzero(ref.zero_sum).reshape(-1).tolist()
    assert positions == expected_pos  # sorted: the same for any thread count
    # before the fix: zero-sum positions are written 0, the rest are final
    got = out.double()
    assert bool((got[ref.zero_sum] == 0).all())
    return out, sign_sum, positions


@pytest.mark.parametrize("majority", [-1, 1])
@pytest.mark.parametrize("P", [3000, 100_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_apply_and_fix_majority(majority, P, dtype):
    x, z1, z2 = zero_sum_data(3, P, majority, seed=7 * P + majority)
    x = x.to(dtype)  # bf16 rounding keeps a - a and a - a/2 - a/2 exactly zero
    ref = ref_ties(x, 0.4, -0.6)
    thresholds = ref.thresholds
    assert ref.majority == majority and int(ref.zero_sum.sum()) > P // 10
    out, sign_sum, positions = check_apply(x, thresholds, -0.6, ref, dtype)
    non_zero_sum = ~ref.zero_sum
    expected_pre = torch.where(non_zero_sum, ref.out, torch.zeros((), dtype=F64))
    partial = ref_ties(x, lam=-0.6, thresholds=thresholds)
    partial.out = expected_pre
    assert_ties_matches(out, partial, dtype, what="ties_apply before the fix")
    # majority as the raw sign sum: the op takes its sign
    fixed = ops.ties_fix_majority(x, out, thresholds, positions, sign_sum, -0.6)
    assert_ties_matches(fixed, ref, dtype, what="ties_apply + ties_fix_majority")


def test_ties_apply_given_thresholds_keep_equal_magnitudes():
    """Thresholds that are not kth values (set by the caller): entries with |x| >= t are kept,
    including those exactly equal to t; t = 0 keeps everything."""
    g = gen(41)
    x = torch.randint(-8, 9, (3, 10_000), generator=g).to(torch.float32) / 4
    thresholds = [0.5, 1.25, 0.0]
    ref = ref_ties(x, lam=2.0, thresholds=thresholds)
    assert int((x[0].abs() == 0.5).sum()) > 0 and int((x[1].abs() == 1.25).sum()) > 0
    out, sign_sum, positions = check_apply(x, thresholds, 2.0, ref)
    fixed = ops.ties_fix_majority(x, out, thresholds, positions, ref.majority, 2.0)
    assert_ties_matches(fixed, ref)


def test_ties_apply_global_thresholds_over_modules():
    """The streaming use: thresholds global per task over three modules (from MagnitudeThreshold,
    checked against the float64 kthvalue over the concatenation); ties_apply per module; the
    majority from the summed sign sums; ties_fix_majority per module. Equals TIES on the
    concatenated task vectors."""
    n = 3
    x_all, _, _ = zero_sum_data(n, 3000 + 7 * 40 + 60_000, majority=-1, seed=99)
    m1 = x_all[:, :3000]
    m2 = [x_all[r, 3000:3280].reshape(7, 40) for r in range(n)]
    m3 = x_all[:, 3280:].reshape(n, 60_000)
    top_k, lam = 0.3, 1.0
    ref = ref_ties(x_all, top_k, lam)
    sel = ops.MagnitudeThreshold(n, top_k)
    while not sel.done:
        for r in range(n):
            sel.update(r, m2[r])
        sel.update_rows(m3)
        sel.update_rows(m1)
        sel.finish_round()
    thresholds = sel.thresholds()
    assert_thresholds_equal(thresholds, ref.thresholds)
    results = [ops.ties_apply(m, thresholds, lam) for m in (m1, m2, m3)]
    total = sum(s for _, s, _ in results)
    assert total == ref.sign_sum
    offsets = [0, 3000, 3280]
    all_pos = sorted(p + o for (_, _, pos), o in zip(results, offsets) for p in pos)
    assert all_pos == torch.nonzero(ref.zero_sum).reshape(-1).tolist()
    majority = (total > 0) - (total < 0)
    outs = [ops.ties_fix_majority(m, out, thresholds, pos, majority, lam)
            for m, (out, _, pos) in zip((m1, m2, m3), results)]
    assert_ties_matches(torch.cat([o.reshape(-1) for o in outs]), ref)


def test_ties_apply_errors():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError):
        ops.ties_apply(x, [0.1, 0.2])
    x[2, 5] = math.nan
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.ties_apply(x, [0.1, 0.2, 0.3])
    out = torch.zeros(99)
    with pytest.raises(ValueError, match="out"):
        ops.ties_fix_majority(torch.randn(3, 100), out, [0.1, 0.2, 0.3], [], 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39])
def test_nonfinite_lam_or_dare_p_refused(bad):
    """lam must be finite (in float32 too); dare_p NaN is refused: one-line errors, nothing run."""
    x = torch.randn(3, 100)
    out = torch.zeros(100)
    for call in (lambda: ops.ties_merge(x, 0.5, lam=bad), lambda: ops.ties_apply(x, [0.1] * 3, lam=bad),
                 lambda: ops.ties_fix_majority(x, out, [0.1] * 3, [1], 1, lam=bad)):
        with pytest.raises(ValueError, match="lam must be a finite") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"dare_p must be in \[0, 1\), got nan"):
        ops.ties_merge(x, 0.5, dare_p=math.nan)
