"""Shared pieces of the kernel-op tests: the float64 references written from DESIGN.md §1
(independently of the package), an independent numpy Philox4x32-10 / DARE mask, and the
comparison helpers with error bounds derived from float32 arithmetic.

The test modules import these helpers with `from conftest import ...` (pytest puts tests/ on
sys.path because it is not a package)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import knots_ext

F64 = torch.float64
U32 = 2.0 ** -24  # unit roundoff of float32
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# Half the smallest subnormal step of the output dtype: the absolute error floor of a rounding.
ABS_FLOOR = {torch.float32: 2.0 ** -150, torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}


def pytest_collection_modifyitems(config, items):
    if knots_ext.build_info()["cuda_devices"] == 0:
        skip = pytest.mark.skip(reason="no CUDA device visible (knots_ext.build_info()['cuda_devices'] == 0)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def restore_threads():
    """Restores the kernels' OpenMP thread count after a test that changes it."""
    before = knots_ext.build_info()["openmp_threads"]
    yield before
    knots_ext.set_num_threads(before)
    assert knots_ext.build_info()["openmp_threads"] == before


# --------------------------------------------------------------------------------------------
# Array helpers


def to_t64(a) -> torch.Tensor:
    """Any array (torch / numpy, any dtype the package accepts) as a float64 torch tensor."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(np.ascontiguousarray(a))
    return a.detach().to("cpu").to(F64)


def rows64(x) -> torch.Tensor:
    """The (n, P) float64 matrix of the task rows of x (2-D array or list of equal-numel arrays)."""
    if isinstance(x, (list, tuple)):
        return torch.stack([to_t64(a).reshape(-1) for a in x])
    return to_t64(x)


def quantized(shape, gen, scale_bits=8, dtype=torch.float32, spread=1.0):
    """Random values k / 2^scale_bits with |k| < ~2^12: float32 sums of a few of them are exact,
    and magnitudes repeat a lot (ties at the thresholds)."""
    v = torch.round(torch.randn(shape, generator=gen, dtype=F64) * spread * 2 ** scale_bits) / 2 ** scale_bits
    return v.to(dtype)


# --------------------------------------------------------------------------------------------
# TIES reference (DESIGN.md §1), float64, on materialised matrices


def threshold_rank(N: int, top_k: float) -> int:
    """1-based rank k of the TIES threshold among N magnitudes; 0 = keep everything."""
    if N == 0 or top_k >= 1.0:
        return 0
    return N - math.floor(N * top_k)


def ref_threshold(v: torch.Tensor, top_k: float) -> float:
    """The k-th smallest |v| (float64 kthvalue), k = N - floor(N * top_k); 0 when k == 0."""
    v = v.reshape(-1).to(F64)
    k = threshold_rank(v.numel(), top_k)
    if k == 0:
        return 0.0
    return torch.kthvalue(v.abs(), k).values.item()


@dataclass
class TiesRef:
    x: torch.Tensor           # (n, P) float64 input
    lam: float
    thresholds: list
    trimmed: torch.Tensor     # (n, P)
    tsum: torch.Tensor        # (P,) sum of trimmed
    elected: torch.Tensor     # (P,) sign before the majority rule
    sign_sum: int
    majority: int
    zero_sum: torch.Tensor    # (P,) bool: trimmed sum exactly 0 with some nonzero trimmed entry
    out: torch.Tensor         # (P,) float64 result

    def merged_with_sign(self, sign: torch.Tensor) -> torch.Tensor:
        """Disjoint mean of the trimmed entries agreeing with `sign` (per position), times lam."""
        agree = (self.trimmed != 0) & (torch.sign(self.trimmed) == sign)
        count = agree.sum(0).clamp(min=1).to(F64)
        return self.lam * torch.where(agree, self.trimmed, torch.zeros((), dtype=F64)).sum(0) / count


def ref_ties(x, top_k: float | None = None, lam: float = 1.0, thresholds=None) -> TiesRef:
    x = rows64(x)
    n, P = x.shape
    if thresholds is None:
        thresholds = [ref_threshold(x[r], top_k) for r in range(n)]
    t = torch.tensor([float(v) for v in thresholds], dtype=F64)[:, None]
    trimmed = torch.where(x.abs() >= t, x, torch.zeros((), dtype=F64))
    tsum = trimmed.sum(0)
    elected = torch.sign(tsum)
    sign_sum = int(elected.sum().item())
    majority = (sign_sum > 0) - (sign_sum < 0)
    zero_sum = (tsum == 0) & (trimmed != 0).any(0)
    final = torch.where(tsum == 0, torch.full_like(elected, float(majority)), elected)
    ref = TiesRef(x, float(lam), [float(v) for v in thresholds], trimmed, tsum, elected, sign_sum, majority,
                  zero_sum, None)
    ref.out = ref.merged_with_sign(final)
    return ref


def _granularity(trimmed: torch.Tensor) -> torch.Tensor:
    """Per position, the largest power of two dividing every nonzero trimmed entry (each entry
    is a float32 value: m * 2^e with a 24-bit integer mantissa); inf where all are 0."""
    a = trimmed.abs()
    m, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    mi = torch.round(m * 2.0 ** 24).to(torch.int64)
    lsb = (mi & -mi).to(F64)
    g = torch.ldexp(lsb, e - 24)
    g = torch.where(a > 0, g, torch.full_like(a, math.inf))
    return g.min(0).values


def assert_ties_matches(out, ref: TiesRef, out_dtype=torch.float32, what="ties"):
    """out (kernel result, float32 arithmetic, stored in out_dtype) equals the float64 reference
    up to float32 rounding of the sums / the final rounding to out_dtype.

    Sign election is exact where the float32 sums are provably exact (every nonzero trimmed entry
    at the position is a multiple of a power of two G and the sum of their magnitudes is below
    2^24 G, so every partial sum, in any order, is a float32). Elsewhere a position whose float64 trimmed sum is within the float32
    error bound of 0 may be elected either way: both outcomes are accepted there (such positions
    are rare for continuous data and asserted to be rare)."""
    got = to_t64(out).reshape(-1)
    n, P = ref.x.shape
    assert got.shape == (P,), f"{what}: shape {tuple(got.shape)} != ({P},)"
    S = ref.trimmed.abs().sum(0)
    exact = S < _granularity(ref.trimmed) * 2.0 ** 24
    sum_err = torch.where(exact, torch.zeros_like(S), n * U32 * S)
    ambiguous = (~exact) & (ref.tsum.abs() <= 2 * sum_err)
    u_out = UNIT_ROUNDOFF[out_dtype]
    lam = abs(ref.lam)
    # float32: sum (error sum_err), then lam * sum / count (two roundings), then store in out_dtype

    def tol_for(expected):
        t32 = lam * sum_err + expected.abs() * 3 * U32
        return t32 + u_out * (expected.abs() + t32) + ABS_FLOOR[out_dtype]

    expected = ref.out
    # positions needing the majority sign, when the majority itself may be off by the ambiguous ones
    n_amb = int(ambiguous.sum())
    assert n_amb <= 10 + P // 1000, f"{what}: {n_amb} sign-ambiguous positions: the data are unsuitable"
    ok = (got - expected).abs() <= tol_for(expected)
    if n_amb:
        for s in (1.0, -1.0):
            alt = ref.merged_with_sign(torch.full_like(expected, s))
            ok |= ambiguous & ((got - alt).abs() <= tol_for(alt))
        if abs(ref.sign_sum) <= 2 * n_amb:
            for s in (1.0, -1.0):
                alt = ref.merged_with_sign(torch.full_like(expected, s))
                ok |= ref.zero_sum & ((got - alt).abs() <= tol_for(alt))
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).reshape(-1)
        j = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {P} positions differ from the float64 reference; first at {j}: "
            f"got {got[j].item()!r}, expected {expected[j].item()!r} (tol {tol_for(expected)[j].item():.3g}); "
            f"column {ref.x[:, j].tolist()}, thresholds {ref.thresholds}, trimmed sum {ref.tsum[j].item()!r}, "
            f"majority {ref.majority}")


def assert_thresholds_equal(got, expected, what="thresholds"):
    got = [float(v) for v in got]
    expected = [float(v) for v in expected]
    assert got == expected, f"{what}: got {got}, expected (float64 kthvalue) {expected}"


# --------------------------------------------------------------------------------------------
# Test data


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn_rows(n, P, seed, dtype=torch.float32):
    g = gen(seed)
    scales = torch.exp(torch.randn(n, 1, generator=g, dtype=F64))  # rows of different magnitude
    return (torch.randn(n, P, generator=g, dtype=F64) * scales).to(dtype)


def zero_sum_data(n, P, majority, seed):
    """Quantized data whose signs lean towards `majority`, plus positions whose trimmed sum is
    exactly 0: (+a, -a, 0...) and (+a, -a/2, -a/2, ...) with a large |a| (kept by the trim)."""
    g = gen(seed)
    mag = torch.round(torch.rand(n, P, generator=g, dtype=F64) * 4 * 256 + 1) / 256
    lean = torch.where(torch.rand(n, P, generator=g) < 0.85, float(majority), float(-majority)).to(F64)
    x = mag * lean
    a = 64 + torch.randint(0, 512, (P,), generator=g).to(F64) / 8
    z1 = torch.arange(P) % 7 == 3
    z2 = (torch.arange(P) % 11 == 5) & ~z1
    x[:, z1] = 0.0
    x[0, z1], x[1, z1] = a[z1], -a[z1]
    x[:, z2] = 0.0
    x[0, z2], x[1, z2], x[2, z2] = a[z2], -a[z2] / 2, -a[z2] / 2
    return x.to(torch.float32), z1, z2


# --------------------------------------------------------------------------------------------
# Task Arithmetic comparison


def assert_ta_matches(out, terms64, out_dtype=torch.float32):
    """out vs the float64 sum of the (n, P) terms: float32 products and sums (each weight is
    rounded to float32 too) give at most (n + 2) u32 * sum|terms|, then the store in out_dtype."""
    got = to_t64(out).reshape(-1)
    n = terms64.shape[0]
    expected = terms64.sum(0)
    t32 = (n + 2) * U32 * terms64.abs().sum(0)
    tol = t32 + UNIT_ROUNDOFF[out_dtype] * (expected.abs() + t32) + ABS_FLOOR[out_dtype]
    bad = (got - expected).abs() > tol
    if bool(bad.any()):
        j = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{int(bad.sum())} positions differ; first at {j}: got {got[j].item()!r}, "
                             f"expected {expected[j].item()!r}, tol {tol[j].item():.3g}")


# --------------------------------------------------------------------------------------------
# Independent Philox4x32-10 (Salmon et al. SC'11 / Random123) and DARE mask, in numpy

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10_np(c0, c1, c2, c3, k0, k1):
    """Vectorised Philox4x32-10: counters as arrays of uint32 values, key as two ints."""
    c = [np.asarray(v, dtype=np.uint64) & _MASK32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0 & 0xFFFFFFFF), np.uint64(k1 & 0xFFFFFFFF)
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + W0) & _MASK32, (k1 + W1) & _MASK32
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return [v.astype(np.uint32) for v in c]


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def dare_keep_mask(numel: int, p: float, seed: int, task: int, module, elem_offset: int = 0) -> np.ndarray:
    """DARE's keep mask for elements elem_offset .. elem_offset+numel-1 of (seed, task, module),
    from the contract: key = dare_key(seed, task, module_id), counter = (idx/4 lo, idx/4 hi, 0, 0),
    word = idx % 4, keep iff word >= floor(p * 2^32)."""
    mid = fnv1a64(module) if isinstance(module, str) else int(module)
    k0, k1 = knots_ext._C.dare_key(int(seed), int(task), mid)
    idx = np.arange(numel, dtype=np.uint64) + np.uint64(elem_offset)
    grp = idx >> np.uint64(2)
    words = philox4x32_10_np(grp & _MASK32, grp >> np.uint64(32), np.zeros_like(grp), np.zeros_like(grp), k0, k1)
    lane = (idx & np.uint64(3)).astype(np.int64)
    word = np.choose(lane, words)
    return word >= np.uint32(math.floor(p * 2.0 ** 32))


def dare_ref32(x, p: float, seed: int, task: int = 0, module="", elem_offset: int = 0) -> torch.Tensor:
    """DARE'd float32 values of x's elements (flattened, row-major): v * float32(1/(1-p)) where
    kept, 0 where dropped; computed in float32 as the contract says (math in float32)."""
    v = to_t64(x).reshape(-1).to(torch.float32).numpy()
    if p == 0.0:
        return torch.from_numpy(v.copy())
    keep = dare_keep_mask(v.size, p, seed, task, module, elem_offset)
    scale = np.float32(1.0 / (1.0 - p))
    return torch.from_numpy(np.where(keep, v * scale, np.float32(0.0)).astype(np.float32))


def bits32(t) -> np.ndarray:
    """The bit patterns of a float32 torch tensor or numpy array."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    assert a.dtype == np.float32, a.dtype
    return np.ascontiguousarray(a).reshape(-1).view(np.uint32)
