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
