"""task_arithmetic: lam * sum_r weights[r] * dare(x[r]) against float64 references."""
import math

import numpy as np
import pytest
import torch

from knots_ext import ops

from conftest import F64, assert_ta_matches, dare_ref32, rows64


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,P", [(1, 10), (3, 1001), (5, 40_000), (4, 250_000)])
@pytest.mark.parametrize("lam", [1.0, -0.35, 2.0])
def test_task_arithmetic_float32(n, P, lam):
    g = gen(n * P)
    x = torch.randn(n, P, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    out = ops.task_arithmetic(x, lam)
    assert out.dtype == torch.float32 and out.shape == (P,)
    assert_ta_matches(out, lam * x.to(F64))
    weights = torch.rand(n, generator=g, dtype=F64).mul(3).sub(1).tolist()
    out = ops.task_arithmetic(x, lam, weights=weights)
    assert_ta_matches(out, lam * torch.tensor(weights, dtype=F64)[:, None] * x.to(F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_task_arithmetic_half(dtype):
    g = gen(3)
    x = torch.randn(4, 30_000, generator=g).to(dtype)
    weights = [0.5, -1.0, 0.25, 2.0]
    out = ops.task_arithmetic(x, 0.8, weights=weights)
    assert out.dtype == dtype
    assert_ta_matches(out, 0.8 * torch.tensor(weights, dtype=F64)[:, None] * x.to(F64), dtype)


def test_task_arithmetic_exact_on_integers():
    """Small integers: every float32 operation is exact, so the result is exactly the sum."""
    g = gen(4)
    x = torch.randint(-100, 101, (6, 20_000), generator=g).to(torch.float32)
    out = ops.task_arithmetic(x, 2.0, weights=[1, 2, 3, -1, -2, 0.5])
    expected = 2.0 * (torch.tensor([1, 2, 3, -1, -2, 0.5], dtype=F64)[:, None] * x.to(F64)).sum(0)
    assert torch.equal(out.to(F64), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_task_arithmetic_non_contiguous_and_lists(dtype):
    g = gen(5)
    P = 30_000
    xt = torch.randn(P, 3, generator=g).to(dtype).T
    assert_ta_matches(ops.task_arithmetic(xt, 1.5), 1.5 * rows64(xt), dtype)
    xs = torch.randn(3, 2 * P, generator=g).to(dtype)[:, ::2]
    assert_ta_matches(ops.task_arithmetic(xs, -1.0), -1.0 * rows64(xs), dtype)
    arrays = [torch.randn(100, 300, generator=g).to(dtype), torch.randn(P, generator=g).to(dtype),
              torch.randn(300, 100, generator=g).to(dtype).T]
    assert_ta_matches(ops.task_arithmetic(arrays, 0.5), 0.5 * rows64(arrays), dtype)


def test_task_arithmetic_numpy():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5000)).astype(np.float32)
    out = ops.task_arithmetic(x, 0.7, weights=[1.0, 0.5, -2.0])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (5000,)
    assert_ta_matches(out, 0.7 * torch.tensor([1.0, 0.5, -2.0], dtype=F64)[:, None] * rows64(x))
    xh = x.astype(np.float16)
    outh = ops.task_arithmetic(xh)
    assert isinstance(outh, np.ndarray) and outh.dtype == np.float16
    assert_ta_matches(outh, rows64(xh), torch.float16)


@pytest.mark.parametrize("P", [4097, 120_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dare_task_arithmetic(P, dtype):
    """DARE-TA equals the weighted sum of ops.dare of each row with tasks=r (and of the
    independent Python mask)."""
    g = gen(P)
    x = torch.randn(3, P, generator=g).to(dtype)
    p, seed, module, offset = 0.35, 99, "layers.3.mlp", 4099
    weights, lam = [1.0, -0.5, 2.0], 0.9
    for tasks in (None, [7, 3, 11]):
        task_of = list(range(3)) if tasks is None else tasks
        out = ops.task_arithmetic(x, lam, weights=weights, dare_p=p, seed=seed, module=module, tasks=tasks,
                                  elem_offset=offset)
        assert out.dtype == dtype
        dared_ops = torch.stack([ops.dare(x[r], p, seed, task=task_of[r], module=module, elem_offset=offset)
                                 .to(F64) for r in range(3)])
        dared_py = torch.stack([dare_ref32(x[r], p, seed, task_of[r], module, offset).to(F64) for r in range(3)])
        w = lam * torch.tensor(weights, dtype=F64)[:, None]
        assert_ta_matches(out, w * dared_py, dtype)
        if dtype == torch.float32:  # (ops.dare of fp16 rows is rounded to fp16; the fused op is not)
            assert torch.equal(dared_ops, dared_py)
            assert_ta_matches(out, w * dared_ops, dtype)


def test_task_arithmetic_errors():
    x = torch.randn(3, 100)
    with pytest.raises(ValueError, match="weights"):
        ops.task_arithmetic(x, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="dare_p"):
        ops.task_arithmetic(x, dare_p=1.0)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match=r"^lam must be a finite"):
            ops.task_arithmetic(x, lam=bad)
        with pytest.raises(ValueError, match=r"^weights\[1\] must be a finite"):
            ops.task_arithmetic(x, weights=[1.0, bad, 1.0])
    with pytest.raises(ValueError, match=r"^lam \* weights\[0\] must be a finite float32"):
        ops.task_arithmetic(x, lam=1e30, weights=[1e10, 1.0, 1.0])  # overflows float32
    with pytest.raises(ValueError, match=r"dare_p must be in \[0, 1\), got nan"):
        ops.task_arithmetic(x, dare_p=math.nan)
    with pytest.raises(ValueError, match=r"^dare_p must be in \[0, 1\), got nan"):
        ops.dare(x[0], math.nan)
    with pytest.raises(TypeError, match="dtype"):
        ops.task_arithmetic(x.double())
    with pytest.raises(ValueError, match="shape"):
        ops.task_arithmetic(torch.randn(100))
    with pytest.raises(ValueError, match="elements"):
        ops.task_arithmetic([torch.randn(10), torch.randn(12)])
    for bad in (math.nan, math.inf, -math.inf):
        for P in (100, 50_000):
            y = torch.randn(3, P)
            y[2, P - 1] = bad
            with pytest.raises(ValueError, match="NaN|Inf"):
                ops.task_arithmetic(y)
