"""out= writes the result into a caller's buffer (no allocation) and checks it."""
from __future__ import annotations

import pytest
import torch

from knots_ext import ops
from conftest import assert_ties_matches, ref_ties


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


@pytest.mark.parametrize("bad", [torch.empty(999), torch.empty(1000, dtype=torch.float16), torch.empty(2000)[::2]])
def test_bad_out(bad):
    with pytest.raises(ValueError, match="out must be"):
        ops.ties_merge(torch.randn(2, 1000), 0.5, out=bad)
