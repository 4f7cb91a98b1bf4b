"""out= writes the result into a caller's buffer (no allocation) and checks that buffer itself:
P elements laid out contiguously in row-major order, the input's dtype and device, writable.
Anything else is refused with a one-line ValueError, never copied (the kernels would write the
copy's layout at the caller's pointer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from knots_ext import ops
from conftest import F64, assert_ta_matches, assert_ties_matches, ref_ties


def test_ties_merge_into_out():
    x = torch.randn(4, 50_000, generator=torch.Generator().manual_seed(3))
    out = torch.full((50_000,), float("nan"))
    got = ops.ties_merge(x, 0.3, lam=0.8, out=out)
    assert got is out
    assert_ties_matches(out, ref_ties(x, 0.3, 0.8))


def test_task_arithmetic_into_out():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(4))
    out = torch.full((1000,), float("nan"))
    ops.task_arithmetic(x, lam=2.0, out=out)
    torch.testing.assert_close(out.double(), 2.0 * x.double().sum(0), rtol=1e-6, atol=1e-6)


def test_contiguous_out_of_any_shape_and_offset():
    """A row-major 2-D out and a contiguous slice of a larger buffer are written in place."""
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5))
    out2d = torch.full((100, 10), float("nan"))
    assert ops.ties_merge(x, 0.3, out=out2d) is out2d
    assert_ties_matches(out2d.reshape(-1), ref_ties(x, 0.3))
    big = torch.full((1010,), -7.0)
    ops.task_arithmetic(x, out=big[5:1005])
    assert_ta_matches(big[5:1005], x.to(F64))
    assert bool((big[:5] == -7).all()) and bool((big[1005:] == -7).all())
    xn = x.numpy()
    outn = np.full((10, 100), np.nan, dtype=np.float32)
    assert ops.task_arithmetic(xn, out=outn) is outn
    assert_ta_matches(outn.reshape(-1), x.to(F64))


def bad_outs():
    """(name, out) pairs that a (3, 1000) float32 CPU input must refuse."""
    ro = np.zeros(1000, dtype=np.float32)
    ro.flags.writeable = False
    return [
        ("transposed 2-D view", torch.zeros(100, 10).T),
        ("strided 1-D view", torch.empty(2000)[::2]),
        ("too short", torch.empty(999)),
        ("too long", torch.empty(1001)),
        ("float16", torch.empty(1000, dtype=torch.float16)),
        ("other device", torch.empty(1000, device="meta")),
        ("numpy transposed", np.zeros((100, 10), dtype=np.float32).T),
        ("numpy Fortran order", np.zeros((10, 100), dtype=np.float32, order="F")),
        ("numpy strided", np.zeros(2000, dtype=np.float32)[::2]),
        ("numpy read-only", ro),
    ]


@pytest.mark.parametrize("name,bad", bad_outs(), ids=[name for name, _ in bad_outs()])
def test_bad_out_refused_by_every_op(name, bad):
    x = torch.randn(3, 1000)
    before = torch.from_numpy(np.array(bad)).clone() if isinstance(bad, np.ndarray) else None
    calls = {
        "ties_merge": lambda: ops.ties_merge(x, 0.5, out=bad),
        "ties_apply": lambda: ops.ties_apply(x, [0.1, 0.2, 0.3], out=bad),
        "ties_fix_majority": lambda: ops.ties_fix_majority(x, bad, [0.1, 0.2, 0.3], [0, 5], 1),
        "task_arithmetic": lambda: ops.task_arithmetic(x, out=bad),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match="^out must be a contiguous") as err:
            call()
        assert "\n" not in str(err.value), op
    if before is not None:  # nothing was written
        assert torch.equal(torch.from_numpy(np.array(bad)), before)
