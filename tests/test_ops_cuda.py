"""The CUDA kernels on torch CUDA tensors (and CuPy arrays when cupy imports), on a non-default
stream, against the CPU kernels and the float64 references: DARE masks bit for bit, thresholds
exactly, merged values to float32 rounding. Skipped (conftest) when no CUDA device is visible."""
import math

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import factor_ops, ops

from conftest import (
    F64, assert_ta_matches, assert_thresholds_equal, assert_ties_matches, bits32, dare_ref32, gen, quantized,
    randn_rows, ref_threshold, ref_ties, zero_sum_data,
)
from test_factor_ops import cancelling_factors, int_factors, rand_factors, rows64

pytestmark = pytest.mark.cuda


def torch_cuda():
    if not torch.cuda.is_available():
        pytest.fail("knots_ext sees a CUDA device but this torch build has no CUDA support")
    return torch.device("cuda", 0)


def assert_same_bits(got, expected, what):
    """CUDA and CPU results equal bit for bit (one rounding rule: csrc/common/rounding.h)."""
    got, expected = got.cpu(), expected.cpu()
    as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    differ = int((got.view(as_int) != expected.view(as_int)).sum())
    assert differ == 0, f"{what}: CUDA and CPU differ in the bits of {differ} positions"


def test_cuda_build_info():
    info = knots_ext.build_info()
    assert info["cuda_compiled"] is True and info["cuda_devices"] >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_torch_matches_cpu(dtype):
    dev = torch_cuda()
    x_cpu = randn_rows(4, 300_000, seed=1, dtype=dtype)
    xq_cpu, _, _ = zero_sum_data(3, 200_001, majority=-1, seed=2)
    xq_cpu = xq_cpu.to(dtype)
    wide_cpu = randn_rows(3, 2 * 50_000, seed=3, dtype=dtype)
    p, seed, module, tasks, offset = 0.35, 2 ** 40 + 17, "model.layers.7.mlp.gate_proj", [3, 0, 9, 4], 2 ** 34 + 1
    weights = [1.0, -0.5, 2.0, 0.25]
    stream = torch.cuda.Stream(device=dev)
    assert stream.cuda_stream != torch.cuda.default_stream(dev).cuda_stream
    with torch.cuda.stream(stream):
        x = x_cpu.to(dev)
        xq = xq_cpu.to(dev)
        wide = wide_cpu.to(dev)
        merged, thr = ops.ties_merge(x, 0.2, -0.8, return_thresholds=True)
        merged_all, thr_all = ops.ties_merge(x, 1.0, 1.0, return_thresholds=True)
        merged_q, thr_q = ops.ties_merge(xq, 0.3, 1.5, return_thresholds=True)
        merged_strided = ops.ties_merge(wide[:, ::2], 0.1)
        merged_dare, thr_dare = ops.ties_merge(x, 0.2, 0.7, dare_p=p, seed=seed, module=module, tasks=tasks,
                                               elem_offset=offset, return_thresholds=True)
        ta = ops.task_arithmetic(x, 0.9, weights=weights)
        ta_dare = ops.task_arithmetic(x, 0.9, weights=weights, dare_p=p, seed=seed, module=module, tasks=tasks,
                                      elem_offset=offset)
        dared = [ops.dare(x[r], p, seed, task=tasks[r], module=module, elem_offset=offset) for r in range(4)]
        dared_chunk = ops.dare(x[1, 1001:], p, seed, task=tasks[1], module=module, elem_offset=offset + 1001)
        mt = ops.magnitude_threshold(x, 0.05)
        mt_dare = ops.magnitude_threshold(x, 0.05, dare_p=p, seed=seed, module=module, elem_offset=offset)
        applied, sign_sum, positions = ops.ties_apply(xq, thr_q, 1.5)
        applied = applied.clone()
        fixed = ops.ties_fix_majority(xq, applied.clone(), thr_q, positions, sign_sum, 1.5)
    stream.synchronize()

    for out in (merged, merged_all, merged_q, merged_strided, merged_dare, ta, ta_dare, *dared, fixed):
        assert out.device == dev and out.dtype == dtype

    # TIES: thresholds exactly (== CPU == float64 reference), values to float32 rounding
    ref = ref_ties(x_cpu, 0.2, -0.8)
    cpu_out, cpu_thr = ops.ties_merge(x_cpu, 0.2, -0.8, return_thresholds=True)
    assert_thresholds_equal(thr, ref.thresholds)
    assert_thresholds_equal(thr, cpu_thr, "CUDA vs CPU thresholds")
    assert_ties_matches(merged.cpu(), ref, dtype, "CUDA ties_merge")
    assert_thresholds_equal(thr_all, [0.0] * 4)
    assert_ties_matches(merged_all.cpu(), ref_ties(x_cpu, 1.0), dtype, "CUDA ties_merge top_k=1")
    ref_q = ref_ties(xq_cpu, 0.3, 1.5)
    assert ref_q.majority == -1 and int(ref_q.zero_sum.sum()) > 0
    assert_thresholds_equal(thr_q, ref_q.thresholds)
    assert_ties_matches(merged_q.cpu(), ref_q, dtype, "CUDA ties_merge zero sums")
    assert_ties_matches(merged_strided.cpu(), ref_ties(wide_cpu[:, ::2], 0.1), dtype, "CUDA strided")

    # ties_apply / ties_fix_majority
    assert sign_sum == ref_q.sign_sum
    assert sorted(positions) == torch.nonzero(ref_q.zero_sum).reshape(-1).tolist()
    assert bool((applied.cpu()[ref_q.zero_sum] == 0).all())
    assert_ties_matches(fixed.cpu(), ref_q, dtype, "CUDA ties_apply + fix")

    # DARE: masks bit for bit against the CPU op and the independent mask
    x32 = x_cpu.to(torch.float32)
    for r in range(4):
        expected = dare_ref32(x_cpu[r], p, seed, tasks[r], module, offset)
        cpu = ops.dare(x_cpu[r], p, seed, task=tasks[r], module=module, elem_offset=offset)
        if dtype == torch.float32:
            np.testing.assert_array_equal(bits32(dared[r].cpu()), bits32(expected))
        assert torch.equal(dared[r].cpu(), cpu)
        assert torch.equal(dared[r].cpu(), expected.to(dtype))
    assert torch.equal(dared_chunk.cpu(), dared[1].cpu()[1001:])
    dared_rows = torch.stack([dare_ref32(x_cpu[r], p, seed, tasks[r], module, offset) for r in range(4)])
    ref_d = ref_ties(dared_rows, 0.2, 0.7)
    assert_thresholds_equal(thr_dare, ref_d.thresholds)
    assert_ties_matches(merged_dare.cpu(), ref_d, dtype, "CUDA DARE-TIES")

    # Task Arithmetic
    w = 0.9 * torch.tensor(weights, dtype=F64)[:, None]
    assert_ta_matches(ta.cpu(), w * x32.to(F64), dtype)
    assert_ta_matches(ta_dare.cpu(), w * dared_rows.to(F64), dtype)

    # the same bits as the CPU kernels
    dare_kw = dict(dare_p=p, seed=seed, module=module, tasks=tasks, elem_offset=offset)
    assert_same_bits(ta, ops.task_arithmetic(x_cpu, 0.9, weights=weights), "task_arithmetic")
    assert_same_bits(ta_dare, ops.task_arithmetic(x_cpu, 0.9, weights=weights, **dare_kw), "DARE-TA")
    assert_same_bits(merged, cpu_out, "ties_merge")
    assert_same_bits(merged_dare, ops.ties_merge(x_cpu, 0.2, 0.7, **dare_kw), "DARE-TIES")
    assert_same_bits(merged_q, ops.ties_merge(xq_cpu, 0.3, 1.5), "ties_merge zero sums")
    assert_same_bits(merged_strided, ops.ties_merge(wide_cpu[:, ::2], 0.1), "ties_merge strided")

    # magnitude thresholds
    assert_thresholds_equal(mt, [ref_threshold(x_cpu[r].to(F64), 0.05) for r in range(4)])
    assert_thresholds_equal(mt, ops.magnitude_threshold(x_cpu, 0.05), "CUDA vs CPU magnitude_threshold")
    assert_thresholds_equal(
        mt_dare, [ref_threshold(dare_ref32(x_cpu[r], p, seed, r, module, offset).to(F64), 0.05) for r in range(4)])


def test_cuda_many_zero_sum_positions():
    """More zero-sum positions than the first list capacity of the CUDA ties_apply (2^20)."""
    dev = torch_cuda()
    P = 1_400_000
    g = gen(5)
    x = -(torch.round(torch.rand(3, P, generator=g, dtype=F64) * 1024 + 1) / 256)
    a = 64 + torch.randint(0, 512, (P,), generator=g).to(F64) / 8
    z = torch.arange(P) % 5 != 0
    x[:, z] = 0.0
    x[0, z], x[1, z] = a[z], -a[z]
    x = x.to(torch.float32)
    ref = ref_ties(x, 0.9)  # keeps every +-a
    assert int(ref.zero_sum.sum()) > 2 ** 20 and ref.majority == -1
    stream = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(stream):
        xd = x.to(dev)
        out, thr = ops.ties_merge(xd, 0.9, return_thresholds=True)
        applied, sign_sum, positions = ops.ties_apply(xd, thr, 1.0)
    stream.synchronize()
    assert_thresholds_equal(thr, ref.thresholds)
    assert_ties_matches(out.cpu(), ref, torch.float32, "CUDA ties_merge, many zero sums")
    assert sign_sum == ref.sign_sum
    assert sorted(positions) == torch.nonzero(ref.zero_sum).reshape(-1).tolist()


def test_cuda_streaming_thresholds_and_errors():
    dev = torch_cuda()
    g = gen(6)
    chunks = [(t, (torch.randn(s, generator=g) * 10.0 ** t).to(torch.float16))
              for t in range(3) for s in (1, 4097, 70_000, 333)]
    stream = torch.cuda.Stream(device=dev)
    sel = ops.MagnitudeThreshold(3, 0.15)
    rounds = 0
    with torch.cuda.stream(stream):
        dchunks = [(t, a.to(dev)) for t, a in chunks]
        while not sel.done:
            for t, a in reversed(dchunks) if rounds else dchunks:
                sel.update(t, a)
            sel.finish_round()
            rounds += 1
    stream.synchronize()
    assert rounds == 2
    cat = [torch.cat([a.to(F64) for t, a in chunks if t == task]) for task in range(3)]
    assert_thresholds_equal(sel.thresholds(), [ref_threshold(c, 0.15) for c in cat])
    y = torch.randn(3, 50_000, device=dev)
    y[1, 777] = math.nan
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.ties_merge(y, 0.2)
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.task_arithmetic(y)
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.magnitude_threshold(y, 0.2)


def test_cuda_out_on_the_rows_device():
    """out must be on the rows' device, contiguous: a CPU out for CUDA rows (or the reverse) and
    a non-contiguous CUDA view are refused, by every op that takes one."""
    dev = torch_cuda()
    x = torch.randn(3, 1000, device=dev)
    thr = [0.1, 0.2, 0.3]

    def refused_by_every_op(bad):
        for call in (lambda: ops.ties_merge(x, 0.5, out=bad), lambda: ops.task_arithmetic(x, out=bad),
                     lambda: ops.ties_apply(x, thr, out=bad), lambda: ops.ties_fix_majority(x, bad, thr, [0], 1)):
            with pytest.raises(ValueError, match="^out must be a contiguous"):
                call()

    for bad in (torch.zeros(1000), torch.zeros(100, 10, device=dev).T, torch.zeros(2000, device=dev)[::2]):
        refused_by_every_op(bad)
    with pytest.raises(ValueError, match="^out must be a contiguous"):
        ops.ties_merge(x.cpu(), 0.5, out=torch.zeros(1000, device=dev))


@pytest.mark.parametrize("np_dtype,t_dtype", [(np.float32, torch.float32), (np.float16, torch.float16)])
def test_cuda_cupy_matches_cpu(np_dtype, t_dtype):
    try:
        import cupy
    except ImportError:
        pytest.skip("cupy is not installed")
    rng = np.random.default_rng(7)
    x_np = rng.standard_normal((3, 150_001)).astype(np_dtype)
    p, seed, module = 0.5, 12, "cupy.module"
    with cupy.cuda.Device(0):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x = cupy.asarray(x_np)
            merged, thr = ops.ties_merge(x, 0.25, 1.2, return_thresholds=True)
            ta = ops.task_arithmetic(x, 0.5)
            dared = ops.dare(x[2], p, seed, task=2, module=module, elem_offset=3)
            mt = ops.magnitude_threshold(x, 0.25)
        stream.synchronize()
    assert isinstance(merged, cupy.ndarray) and merged.dtype == np_dtype
    ref = ref_ties(x_np, 0.25, 1.2)
    assert_thresholds_equal(thr, ref.thresholds)
    assert_thresholds_equal(mt, ref.thresholds)
    assert_ties_matches(cupy.asnumpy(merged), ref, t_dtype, "CuPy ties_merge")
    assert_ta_matches(cupy.asnumpy(ta), 0.5 * torch.from_numpy(x_np).to(F64), t_dtype)
    expected = dare_ref32(x_np[2], p, seed, 2, module, 3)
    assert torch.equal(torch.from_numpy(cupy.asnumpy(dared)), expected.to(t_dtype))
    with cupy.cuda.Device(0):
        x = cupy.asarray(x_np)
        out = cupy.zeros((1, 150_001), dtype=np_dtype)  # contiguous, any shape: written in place
        assert ops.task_arithmetic(x, 0.5, out=out) is out
        assert cupy.array_equal(out.reshape(-1), ta)
        for bad in (cupy.zeros(2 * 150_001, dtype=np_dtype)[::2], np.zeros(150_001, dtype=np_dtype)):
            with pytest.raises(ValueError, match="^out must be a contiguous"):
                ops.ties_merge(x, 0.25, out=bad)
    assert np.array_equal(cupy.asnumpy(dared), ops.dare(x_np[2], p, seed, task=2, module=module, elem_offset=3))


# --------------------------------------------------------------------------------------------
# The factor-fused kernels (knots_ext.factor_ops; csrc/cuda/factored.cu): the same bits as the
# CPU kernels (csrc/cpu/factored.cpp), on a non-default stream.


def _factored_all(factors, top_k, lam, dare_p, seed, module, tasks):
    """Every factored op: thresholds (all rounds), ties_apply, the majority fix, weighted_sum."""
    n = len(factors)
    sel = ops.MagnitudeThreshold(n, top_k)
    while not sel.done:
        factor_ops.histogram(sel, factors, dare_p, seed, module, tasks, slots=range(n))
        sel.finish_round()
    thr = sel.thresholds()
    out, sign_sum, positions = factor_ops.ties_apply(factors, thr, lam, dare_p, seed, module, tasks)
    applied = out.clone()
    majority = (sign_sum > 0) - (sign_sum < 0)
    if positions:
        factor_ops.ties_fix_majority(factors, out, thr, positions, majority, lam, dare_p, seed, module, tasks)
    weights = [0.5 + 0.25 * i * (-1) ** i for i in range(n)]
    ta = factor_ops.weighted_sum(factors, weights, dare_p, seed, module, tasks)
    return thr, applied, out, sign_sum, positions, ta


@pytest.mark.parametrize("m,c,ranks", [(37, 131, [1, 3, 16, 64, 33]), (1, 131, [5, 2]), (37, 1, [16, 1]),
                                        (300, 257, [16] * 7), (23, 53, [[1, 3, 16, 64][i % 4] for i in range(40)])])
def test_cuda_factored_matches_cpu(m, c, ranks):
    dev = torch_cuda()
    module, seed = "model.layers.1.mlp.up_proj", 2 ** 40 + 3
    stream = torch.cuda.Stream(device=dev)
    for make in (rand_factors, int_factors):
        factors = make(m, c, ranks, seed=m + c)
        tasks = [3 * i + 1 for i in range(len(factors))]
        for dare_p in (0.0, 0.35):
            with torch.cuda.stream(stream):
                on_gpu = [(P.to(dev), Q.to(dev), s) for P, Q, s in factors]
                got = _factored_all(on_gpu, 0.25, -0.9, dare_p, seed, module, tasks)
            stream.synchronize()
            expected = _factored_all(factors, 0.25, -0.9, dare_p, seed, module, tasks)
            what = f"{m}x{c} {make.__name__} dare_p={dare_p}"
            assert_thresholds_equal(got[0], expected[0], f"{what}: CUDA vs CPU thresholds")
            for i in (1, 2, 5):
                assert got[i].device == dev and got[i].shape == (m, c)
                assert_same_bits(got[i], expected[i], f"{what}: result {i}")
            assert got[3] == expected[3] and got[4] == expected[4], f"{what}: sign sum / zero-sum positions"
            if make is int_factors and dare_p == 0.0:
                x64 = rows64(factors)
                assert_thresholds_equal(got[0], [ref_threshold(x64[r], 0.25) for r in range(len(factors))])
    # exact zero sums: positions listed, written 0, fixed with the majority sign
    factors = cancelling_factors(301, 131, seed=3)
    with torch.cuda.stream(stream):
        got = _factored_all([(P.to(dev), Q.to(dev), s) for P, Q, s in factors], 0.6, 1.5, 0.0, 0, module, [0, 1, 2])
    stream.synchronize()
    expected = _factored_all(factors, 0.6, 1.5, 0.0, 0, module, [0, 1, 2])
    assert len(got[4]) > 100 and got[4] == expected[4] and got[3] == expected[3]
    for i in (1, 2, 5):
        assert_same_bits(got[i], expected[i], f"zero sums: result {i}")


def test_cuda_factored_nonfinite_and_finite_check():
    dev = torch_cuda()
    factors = [(P.to(dev), Q.to(dev), s) for P, Q, s in int_factors(9, 21, [2, 3], seed=1)]
    P, Q, s = factors[1]
    P = P.clone()
    P[4, 1] = math.inf
    bad = [factors[0], (P, Q, s)]
    assert factor_ops.is_finite(factors[0]) and not factor_ops.is_finite(bad[1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        factor_ops.ties_apply(bad, [0.0, 0.0], 1.0, 0.0, 0, "m", [0, 1])
    with pytest.raises(ValueError, match="NaN or Inf"):
        factor_ops.weighted_sum(bad, [1.0, 1.0], 0.0, 0, "m", [0, 1])
    with pytest.raises(ValueError, match="^out must be a contiguous"):
        factor_ops.ties_fix_majority(factors, torch.zeros(9, 21), [0.0, 0.0], [0], 1, 1.0, 0.0, 0, "m", [0, 1])


# --------------------------------------------------------------------------------------------
# Issue 12's first GPU checks: tails, 64-bit indexing, degenerate TIES inputs, hot histogram
# bins, and stream ordering, each against the CPU kernels bit for bit and a float64 reference.

SENTINEL = -1152.0  # exact in float32, float16 and bfloat16


def assert_same_bits_on(dev, got, expected_cpu, what):
    """Bit equality compared on the device (for arrays too large to copy back twice)."""
    as_int = {2: torch.int16, 4: torch.int32}[got.element_size()]
    expected = expected_cpu.to(dev)
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    differ = int((got.view(as_int) != expected.view(as_int)).sum())
    assert differ == 0, f"{what}: CUDA and CPU differ in the bits of {differ} positions"


def out_in_sentinel_buffer(P, dtype, dev, pad=37):
    """A P-element `out` inside a sentinel-filled buffer (odd offset: no alignment assumed)."""
    buf = torch.full((P + 2 * pad,), SENTINEL, dtype=dtype, device=dev)
    return buf, buf[pad:pad + P]


def assert_sentinels_kept(buf, P, pad=37, what="out"):
    host = buf.cpu()
    assert bool((host[:pad] == SENTINEL).all()) and bool((host[pad + P:] == SENTINEL).all()), \
        f"{what}: a kernel wrote outside its output"


def layout_cases(wide_of, P, dev):
    """(what, dtype, strided, dare_p, x_cpu, on_device) for every dtype, contiguous rows (the first P
    of each (n, 2P) wide_of(dtype) row) and strided ones (every other element), DARE off and on;
    on_device() copies the wide rows to dev (on the current stream) and returns the same view."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        wide_cpu = wide_of(dtype)
        for strided in (False, True):
            x_cpu = wide_cpu[:, ::2] if strided else wide_cpu[:, :P].contiguous()

            def on_device(wide_cpu=wide_cpu, strided=strided):
                wide = wide_cpu.to(dev)
                return wide[:, ::2] if strided else wide[:, :P]

            for dare_p in (0.0, 0.3):
                yield f"{dtype} strided={strided} dare_p={dare_p}", dtype, strided, dare_p, x_cpu, on_device


@pytest.mark.parametrize("n", [1, 3, 65])
@pytest.mark.parametrize("P", [1, 31, 33, 257, 270_337, 1_048_577])
def test_cuda_tails_bit_identical(P, n):
    """Every op at tail sizes (groups of 4 cut by P and by a DARE offset that is not a multiple of 4),
    every dtype, contiguous and strided rows, DARE off and on, out inside a sentinel-filled buffer."""
    dev = torch_cuda()
    stream = torch.cuda.Stream(device=dev)
    module, seed, offset = "model.layers.3.self_attn.o_proj", 2 ** 33 + 5, 2 ** 34 + 3
    tasks = [2 * r + 1 for r in range(n)]
    weights = [1.0 - 0.03 * r for r in range(n)]
    for case, dtype, strided, dare_p, x_cpu, on_device in layout_cases(
            lambda dtype: randn_rows(n, 2 * P, seed=P + n, dtype=dtype), P, dev):
        what = f"P={P} n={n} {case}"
        kw = dict(dare_p=dare_p, seed=seed, module=module, tasks=tasks, elem_offset=offset)
        with torch.cuda.stream(stream):
            x = on_device()
            buf, out = out_in_sentinel_buffer(P, dtype, dev)
            merged, thr = ops.ties_merge(x, 0.3, -0.7, out=out, return_thresholds=True, **kw)
            ta_buf, ta_out = out_in_sentinel_buffer(P, dtype, dev)
            ta = ops.task_arithmetic(x, 0.9, weights=weights, out=ta_out, **kw)
            applied, sign_sum, positions = ops.ties_apply(x, thr, -0.7, **kw)
            applied = applied.clone()
            mt = ops.magnitude_threshold(x, 0.1, **kw)
            dared = ops.dare(x[n - 1], dare_p, seed, task=tasks[-1], module=module, elem_offset=offset)
        stream.synchronize()
        assert merged is out and ta is ta_out
        assert_sentinels_kept(buf, P, what=f"{what}: ties_merge")
        assert_sentinels_kept(ta_buf, P, what=f"{what}: task_arithmetic")
        cpu_merged, cpu_thr = ops.ties_merge(x_cpu, 0.3, -0.7, return_thresholds=True, **kw)
        assert_thresholds_equal(thr, cpu_thr, f"{what}: thresholds")
        assert_same_bits(merged, cpu_merged, f"{what}: ties_merge")
        assert_same_bits(ta, ops.task_arithmetic(x_cpu, 0.9, weights=weights, **kw), f"{what}: TA")
        cpu_applied, cpu_sign_sum, cpu_positions = ops.ties_apply(x_cpu, cpu_thr, -0.7, **kw)
        assert (sign_sum, positions) == (cpu_sign_sum, cpu_positions), f"{what}: ties_apply's totals"
        assert_same_bits(applied, cpu_applied, f"{what}: ties_apply")
        assert_thresholds_equal(mt, ops.magnitude_threshold(x_cpu, 0.1, **kw), f"{what}: magnitude_threshold")
        expected = dare_ref32(x_cpu[n - 1], dare_p, seed, tasks[-1], module, offset).to(dtype)
        assert torch.equal(dared.cpu(), expected), f"{what}: DARE mask"
        if dtype == torch.float32 and dare_p == 0.0:  # the float64 reference, once per shape
            ref = ref_ties(x_cpu, 0.3, -0.7)
            assert_thresholds_equal(thr, ref.thresholds)
            assert_ties_matches(merged.cpu(), ref, dtype, what)


def test_cuda_over_2_31_elements():
    """bf16 rows of 2^31 + 4097 elements at element offset 2^34: 64-bit indexing in every kernel,
    against the CPU kernels bit for bit and, at the tail, float64 references."""
    dev = torch_cuda()
    P, offset, p, seed, module = 2 ** 31 + 4097, 2 ** 34, 0.5, 99, "big.module"
    g = torch.Generator(device=dev).manual_seed(12)
    x = torch.randn(2, P, generator=g, device=dev, dtype=torch.bfloat16)
    x_cpu = x.cpu()
    kw = dict(dare_p=p, seed=seed, module=module, tasks=[0, 1], elem_offset=offset)
    merged, thr = ops.ties_merge(x, 0.2, return_thresholds=True)
    cpu_merged, cpu_thr = ops.ties_merge(x_cpu, 0.2, return_thresholds=True)
    assert_thresholds_equal(thr, cpu_thr, "thresholds")
    assert_same_bits_on(dev, merged, cpu_merged, "ties_merge")
    tail = 8192
    ref = ref_ties(x_cpu[:, -tail:], thresholds=cpu_thr)
    assert_ties_matches(merged[-tail:].cpu(), ref, torch.bfloat16, "ties_merge tail vs float64")
    del merged, cpu_merged
    ta = ops.task_arithmetic(x, 1.0, **kw)
    assert_same_bits_on(dev, ta, ops.task_arithmetic(x_cpu, 1.0, **kw), "DARE-TA")
    dared = torch.stack([dare_ref32(x_cpu[r, -tail:], p, seed, r, module, offset + P - tail) for r in range(2)])
    assert_ta_matches(ta[-tail:].cpu(), dared.to(F64), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_rows_a_minus_a(dtype):
    """Rows [a, -a]: every kept position is zero-sum (more than the first list's 2^20 slots), the
    majority sign is 0 and the merge is 0 everywhere, in ties_merge's on-device fix too."""
    dev = torch_cuda()
    P = 1_500_003
    a = randn_rows(1, P, seed=21, dtype=dtype)[0]
    x_cpu = torch.stack([a, -a])
    ref = ref_ties(x_cpu, 0.8)
    assert ref.majority == 0 and int(ref.zero_sum.sum()) > 2 ** 20
    x = x_cpu.to(dev)
    buf, out = out_in_sentinel_buffer(P, dtype, dev)
    merged, thr = ops.ties_merge(x, 0.8, out=out, return_thresholds=True)
    assert_sentinels_kept(buf, P)
    assert_thresholds_equal(thr, ref.thresholds)
    assert bool((merged == 0).all())
    assert_same_bits(merged, ops.ties_merge(x_cpu, 0.8), "ties_merge [a, -a]")
    applied, sign_sum, positions = ops.ties_apply(x, thr)
    assert sign_sum == 0 and positions == torch.nonzero(ref.zero_sum).reshape(-1).tolist()
    assert bool((applied == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_constant_magnitudes(dtype):
    """Hot histogram bins: a row of one magnitude, a quantised row (few values), and a row whose
    keys share their top 16 bits (round 1 counts all of them into 64 bins); long enough for the
    shared-memory bins in both rounds (a block counts at least as many keys as it has bins, also
    when round 1 has one row left), and a short array for the global ones."""
    dev = torch_cuda()
    g = gen(31)
    for P in (9_000_001, 70_001):
        signs = torch.where(torch.rand(3, P, generator=g) < 0.5, -1.0, 1.0).to(F64)
        rows = torch.stack([
            torch.full((P,), 1.5, dtype=F64),
            quantized((P,), g, scale_bits=2, dtype=F64).abs() + 0.25,
            1.0 + torch.randint(0, 64, (P,), generator=g).to(F64) * 2.0 ** -23,
        ])
        x_cpu = (signs * rows).to(dtype)
        x = x_cpu.to(dev)
        for top_k in (0.05, 0.5):
            merged, thr = ops.ties_merge(x, top_k, return_thresholds=True)
            ref = ref_ties(x_cpu, top_k)
            assert_thresholds_equal(thr, ref.thresholds, f"P={P} top_k={top_k}")
            assert_thresholds_equal(ops.magnitude_threshold(x, top_k), ref.thresholds, "magnitude_threshold")
            assert_same_bits(merged, ops.ties_merge(x_cpu, top_k), f"P={P} top_k={top_k}")
            assert_ties_matches(merged.cpu(), ref, dtype, f"P={P} top_k={top_k}")


def test_cuda_side_stream_producer_without_sync():
    """The input is written on a side stream that is still busy when the kernel is called with an
    explicit stream= (no synchronisation by the caller); the result is read on the side stream
    again. The kernel stream must wait for the producer, and the reader for the kernels."""
    dev = torch_cuda()
    side, kernel_stream = torch.cuda.Stream(device=dev), torch.cuda.Stream(device=dev)
    x_cpu = randn_rows(3, 2_000_003, seed=41)
    p, seed, module = 0.25, 7, "side.stream"
    host = x_cpu.pin_memory()
    with torch.cuda.stream(side):
        x = torch.empty_like(x_cpu, device=dev)
        torch.cuda._sleep(200_000_000)  # the producer is still running when the kernels are queued
        x.copy_(host, non_blocking=True)
        merged = ops.ties_merge(x, 0.2, 0.8, dare_p=p, seed=seed, module=module, stream=kernel_stream.cuda_stream)
        ta = ops.task_arithmetic(x, 0.5, stream=kernel_stream.cuda_stream)
        mt = ops.magnitude_threshold(x, 0.2, stream=kernel_stream.cuda_stream)
        merged_copy, ta_copy = merged.clone(), ta.clone()  # read on the side stream, no sync
    side.synchronize()
    assert_same_bits(merged_copy, ops.ties_merge(x_cpu, 0.2, 0.8, dare_p=p, seed=seed, module=module), "ties_merge")
    assert_same_bits(ta_copy, ops.task_arithmetic(x_cpu, 0.5), "task_arithmetic")
    assert_thresholds_equal(mt, ops.magnitude_threshold(x_cpu, 0.2), "magnitude_threshold")


# ---- ties_merge's read-once path (csrc/cuda/ties.cu): KNOTS_EXT_CUDA_TIES_PATH=read-once makes a
# miss (or rows it does not apply to) an error instead of the exact fallback, so the tests know
# which path produced the bits they compare.

READ_ONCE_P = 2 ** 24 + 5  # a 2^20-key sample per row: brackets narrow enough for n = 3 in every dtype


def cancelling_at_aside_positions(P, seed):
    """zero_sum_data(3, ...) with row 2 nonzero where rows 0 and 1 cancel (+a, -a): those positions
    are zero-sum exactly where row 2's entry is trimmed, and some of those entries lie in row 2's
    bracket, so positions needing the majority sign come from both the pass and the finish."""
    x, z1, _ = zero_sum_data(3, P, majority=-1, seed=seed)
    g = gen(seed + 1)
    count = int(z1.sum())
    mag = torch.round(torch.rand(count, generator=g, dtype=F64) * 4 * 256 + 1) / 256
    sign = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0).to(F64)
    x[2, z1] = (mag * sign).to(torch.float32)
    return x, z1


def test_cuda_ties_read_once_hits_bit_identical(monkeypatch):
    """The read-once path, required (no fallback), in every dtype, contiguous and strided, DARE off
    and on (element offset not a multiple of 4, P not a multiple of 4), out inside a sentinel-filled
    buffer: thresholds and every output bit equal the CPU's, zero-sum positions included (some of
    them have row 2's entry inside its bracket: set aside by the pass, listed by the finish)."""
    dev = torch_cuda()
    P, module, seed, offset, tasks = READ_ONCE_P, "model.layers.5.mlp.down_proj", 2 ** 35 + 9, 2 ** 33 + 2, [4, 1, 7]
    x32, z1 = cancelling_at_aside_positions(2 * P, seed=51)
    stream = torch.cuda.Stream(device=dev)
    monkeypatch.setenv("KNOTS_EXT_CUDA_TIES_PATH", "read-once")
    for what, dtype, strided, dare_p, x_cpu, on_device in layout_cases(x32.to, P, dev):
        kw = dict(dare_p=dare_p, seed=seed, module=module, tasks=tasks, elem_offset=offset)
        with torch.cuda.stream(stream):
            x = on_device()
            buf, out = out_in_sentinel_buffer(P, dtype, dev)
            merged, thr = ops.ties_merge(x, 0.3, -0.7, out=out, return_thresholds=True, **kw)
        stream.synchronize()
        assert merged is out
        assert_sentinels_kept(buf, P, what=what)
        cpu_merged, cpu_thr = ops.ties_merge(x_cpu, 0.3, -0.7, return_thresholds=True, **kw)
        assert_thresholds_equal(thr, cpu_thr, f"{what}: thresholds")
        assert_same_bits(merged, cpu_merged, f"{what}: ties_merge")
        if dtype == torch.float32 and not strided and dare_p == 0.0:
            ref = ref_ties(x_cpu, 0.3, -0.7)
            assert ref.majority == -1
            # zero-sum positions where row 2's entry is trimmed within two levels (2/256) of
            # its threshold: inside its bracket (about that wide), so set aside by the pass
            row2 = x_cpu[2].to(F64).abs()
            near = z1[:P] & (row2 < ref.thresholds[2]) & (row2 >= ref.thresholds[2] - 2 / 256)
            assert int((ref.zero_sum & near).sum()) > 100
            assert_thresholds_equal(thr, ref.thresholds)
            assert_ties_matches(merged.cpu(), ref, dtype, what)
        del x, buf, out, merged


def sampled_positions(n, P):
    """The positions ties.cu's read-once sample reads in each row (ReadOncePlan: runs of 64 elements,
    run b at b * spacing + ((5 b) mod (spacing / 64)) * 64)."""
    runs = min(P // 1024, max(1, 2 ** 24 // (64 * n)))
    spacing = P // runs
    b = torch.arange(runs)
    starts = b * spacing + ((5 * b) % (spacing // 64)) * 64
    mask = torch.zeros(P, dtype=torch.bool)
    mask[(starts[:, None] + torch.arange(64)[None, :]).reshape(-1)] = True
    return mask


def test_cuda_ties_read_once_misses_fall_back(monkeypatch):
    """Data whose sample misleads the bracket (every sampled entry is 1000 larger in magnitude, so
    each row's entries below its bracket already outnumber the threshold's rank) and data with one
    magnitude (the bracket holds every entry: more set-aside positions than there is room for):
    the read-once path misses (an error when required) and the default falls back to the exact
    path, bit for bit the CPU's and equal to the float64 reference."""
    dev = torch_cuda()
    n, P = 2, 2 ** 22 + 7
    sampled = sampled_positions(n, P)
    assert int(sampled.sum()) * 16 == (P // 1024) * 1024
    base = randn_rows(n, P, seed=61, dtype=F64)
    misleading = torch.where(sampled, base.sign() * (1000.0 + base.abs()), base).to(torch.float32)
    signs = torch.where(torch.rand(n, P, generator=gen(62)) < 0.5, -1.0, 1.0)
    constant = (signs * 1.5).to(torch.float32)
    for name, x_cpu in (("misleading sample", misleading), ("one magnitude", constant)):
        x = x_cpu.to(dev)
        monkeypatch.setenv("KNOTS_EXT_CUDA_TIES_PATH", "read-once")
        with pytest.raises(RuntimeError, match="read-once path missed"):
            ops.ties_merge(x, 0.3)
        torch.cuda.synchronize()
        monkeypatch.delenv("KNOTS_EXT_CUDA_TIES_PATH")
        merged, thr = ops.ties_merge(x, 0.3, 0.9, return_thresholds=True)
        cpu_merged, cpu_thr = ops.ties_merge(x_cpu, 0.3, 0.9, return_thresholds=True)
        assert_thresholds_equal(thr, cpu_thr, f"{name}: thresholds")
        assert_same_bits(merged, cpu_merged, f"{name}: ties_merge")
        ref = ref_ties(x_cpu, 0.3, 0.9)
        assert_thresholds_equal(thr, ref.thresholds, name)
        assert_ties_matches(merged.cpu(), ref, torch.float32, name)
        monkeypatch.setenv("KNOTS_EXT_CUDA_TIES_PATH", "exact")
        assert_same_bits(ops.ties_merge(x, 0.3, 0.9), cpu_merged, f"{name}: exact path")


def test_cuda_ties_path_choice(monkeypatch):
    """Rows the read-once path does not take (short, top_k = 1, many rows with wide brackets) are an
    error when it is required, and merged by the exact path otherwise; a bad setting is refused."""
    dev = torch_cuda()
    cases = (("short rows", randn_rows(2, 30_000, seed=71), 0.3), ("top_k = 1", randn_rows(2, 100_000, seed=72), 1.0),
             ("many rows", randn_rows(40, 100_000, seed=73), 0.3))
    for name, x_cpu, top_k in cases:
        x = x_cpu.to(dev)
        monkeypatch.setenv("KNOTS_EXT_CUDA_TIES_PATH", "read-once")
        with pytest.raises(RuntimeError, match="does not apply"):
            ops.ties_merge(x, top_k)
        monkeypatch.delenv("KNOTS_EXT_CUDA_TIES_PATH")
        assert_same_bits(ops.ties_merge(x, top_k), ops.ties_merge(x_cpu, top_k), name)
    monkeypatch.setenv("KNOTS_EXT_CUDA_TIES_PATH", "fast")
    with pytest.raises(ValueError, match="KNOTS_EXT_CUDA_TIES_PATH"):
        ops.ties_merge(cases[0][1].to(dev), 0.3)
