"""_arrays.all_finite, the finiteness check of merged updates, factors read and written, Grams:
a fast sum first, entry by entry only when the sum is not finite. Compared with torch.isfinite."""

from __future__ import annotations

import pytest
import torch

from knots_ext._arrays import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf"), "both infs"])
def test_agrees_with_isfinite(dtype, bad):
    t = torch.randn(257, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    if bad == "both infs":  # +inf + -inf: the sum is NaN, not finite either
        t[3, 4], t[200, 1] = float("inf"), float("-inf")
    elif bad is not None:
        t[100, 7] = bad
    assert all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_sum_that_overflows_is_checked_entry_by_entry(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((64,), big, dtype=dtype)
    assert not bool(torch.isfinite(t.sum()))  # the fast path cannot decide
    assert all_finite(t)
    t[5] = float("nan")
    assert not all_finite(t)


def test_empty_and_integer_tensors():
    assert all_finite(torch.empty(0, 4)) and all_finite(torch.arange(5))


# The host scan (_C.widen_f32): float32_checked's conversion against torch's .to(float32), bit for
# bit, and its flags and has_zero against torch's own checks, for every kernel dtype, values that
# are special in each (signed zeros, fp16 subnormals, infinities, NaN), strided and non-CPU-path
# inputs (torch's route), and an array long enough for the threaded loop (>= 4M entries).
def _specials(dtype):
    t = torch.randn(1031, generator=torch.Generator().manual_seed(1)).to(dtype)
    tiny = torch.finfo(dtype).tiny if dtype != torch.float16 else 2.0**-24  # fp16: a subnormal
    t[:4] = torch.tensor([tiny, -tiny, torch.finfo(dtype).max, -torch.finfo(dtype).max]).to(dtype)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "+0", "-0", "nan", "inf", "-inf", "long"])
def test_float32_checked_and_has_zero_agree_with_torch(dtype, case):
    from knots_ext._arrays import finite_and_zero, float32_checked, has_zero

    t = _specials(dtype) if case != "long" else torch.randn(1 << 22, generator=torch.Generator().manual_seed(2)).to(dtype)
    t[t == 0] = 1  # (no accidental zeros: the cases put their own)
    where = 517 if case != "long" else (1 << 22) - 3
    if case in ("+0", "-0", "nan", "inf", "-inf"):
        t[where] = {"+0": 0.0, "-0": -0.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[case]
    t32, finite, zero = float32_checked(t)
    assert t32.dtype == torch.float32 and t32.shape == t.shape
    reference = t.to(torch.float32)
    assert torch.equal(t32.view(torch.int32), reference.view(torch.int32))  # bit for bit, NaN included
    assert finite == bool(torch.isfinite(reference).all()) == (case not in ("nan", "inf", "-inf"))
    assert all_finite(t) == finite
    assert has_zero(t) == zero == bool((reference == 0).any()) == (case in ("+0", "-0"))
    assert finite_and_zero(t) == (finite, zero)
    if dtype == torch.float32:
        assert t32 is t  # nothing to convert: not copied


def test_strided_and_float64_inputs_take_torchs_route():
    from knots_ext._arrays import finite_and_zero, float32_checked, has_zero

    t = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t[7, 2] = 0.0
    strided = t.float().T  # not contiguous
    assert has_zero(strided) and has_zero(t) and all_finite(strided)
    t32, finite, zero = float32_checked(t)
    assert finite and zero and torch.equal(t32, t.float())
    assert finite_and_zero(strided) == (True, True) and finite_and_zero(torch.ones(3, 2).T) == (True, False)
    t[1, 1] = 1e300  # overflows float32
    assert not float32_checked(t)[1]
    assert not has_zero(torch.ones(5, 5).T) and not has_zero(torch.empty(0))
