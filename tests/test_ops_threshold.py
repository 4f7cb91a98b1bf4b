"""magnitude_threshold and streaming MagnitudeThreshold: per task, the k-th smallest |x| over
everything the task sent (k = N - floor(N * top_k)), checked against float64 torch.kthvalue
over the concatenation of the task's chunks."""
import math
import random

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import ops

from conftest import F64, assert_thresholds_equal, dare_ref32, ref_threshold


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_chunks(n_tasks, dtype, seed):
    """Per task, chunks of different sizes, shapes and layouts (total sizes differ by task)."""
    g = gen(seed)
    shapes = [(37, 11), (5000,), (3, 4, 5), (20_000,), (1,), (129, 64), (70_000,)]
    chunks = []
    for task in range(n_tasks):
        scale = 10.0 ** (task - 1)
        for i, shape in enumerate(shapes):
            if (task + i) % 4 == 3:
                continue  # not every task sends every chunk
            a = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
            if i == 5:
                a = a.T  # non-contiguous
            chunks.append((task, a))
    return chunks


def run_stream(sel, chunks, rows=None, rows_tasks=None, seed=0, **kw):
    rng = random.Random(seed)
    rounds = 0
    progression = [(sel.round, sel.done)]
    while not sel.done:
        order = list(chunks)
        rng.shuffle(order)  # any order each round
        half = len(order) // 2
        for task, a in order[:half]:
            sel.update(task, a, **kw)
        if rows is not None:
            sel.update_rows(rows, tasks=rows_tasks, **kw)
        for task, a in order[half:]:
            sel.update(task, a, **kw)
        sel.finish_round()
        rounds += 1
        progression.append((sel.round, sel.done))
        assert rounds <= 2, "more than two rounds"
    return progression


def reference(chunks, n_tasks, top_k, rows=None, rows_tasks=None):
    per_task = [[] for _ in range(n_tasks)]
    for task, a in chunks:
        per_task[task].append(a.to(F64).reshape(-1))
    if rows is not None:
        for r, task in enumerate(rows_tasks):
            per_task[task].append(rows[r].to(F64).reshape(-1))
    cat = [torch.cat(v) if v else torch.zeros(0, dtype=F64) for v in per_task]
    return [ref_threshold(c, top_k) for c in cat], [c.numel() for c in cat]


@pytest.mark.parametrize("top_k", [0.5, 0.2, 0.01, 1e-9, 0.999])
def test_streaming_thresholds_fp32(top_k):
    n = 4
    chunks = make_chunks(n, torch.float32, seed=1)
    rows = torch.randn(2, 3000, generator=gen(2))
    rows_tasks = [3, 0]
    sel = ops.MagnitudeThreshold(n, top_k)
    run_stream(sel, chunks, rows, rows_tasks, seed=3)
    expected, totals = reference(chunks, n, top_k, rows, rows_tasks)
    assert_thresholds_equal(sel.thresholds(), expected)
    assert [sel.total(t) for t in range(n)] == totals


@pytest.mark.parametrize("top_k", [0.3, 0.05])
def test_streaming_thresholds_fp16_two_rounds(top_k):
    n = 3
    chunks = make_chunks(n, torch.float16, seed=4)
    # fp16 subnormals in one task
    chunks.append((2, (torch.randn(4000, generator=gen(5)) * 1e-6).to(torch.float16)))
    sel = ops.MagnitudeThreshold(n, top_k)
    progression = run_stream(sel, chunks, seed=6)
    assert progression == [(0, False), (1, False), (2, True)]
    expected, totals = reference(chunks, n, top_k)
    assert_thresholds_equal(sel.thresholds(), expected)
    assert [sel.total(t) for t in range(n)] == totals


@pytest.mark.parametrize("top_k", [0.3, 0.05, 1e-9])
def test_streaming_thresholds_bf16_one_round(top_k):
    n = 3
    chunks = make_chunks(n, torch.bfloat16, seed=7)
    sel = ops.MagnitudeThreshold(n, top_k)
    assert (sel.round, sel.done) == (0, False)
    with pytest.raises(RuntimeError, match="final|round"):
        sel.thresholds()
    progression = run_stream(sel, chunks, seed=8)
    assert progression == [(0, False), (2, True)]
    expected, _ = reference(chunks, n, top_k)
    assert_thresholds_equal(sel.thresholds(), expected)


def test_streaming_top_k_1_gives_zero():
    chunks = make_chunks(2, torch.float32, seed=9)
    sel = ops.MagnitudeThreshold(2, 1.0)
    progression = run_stream(sel, chunks, seed=10)
    assert progression == [(0, False), (2, True)]
    assert sel.thresholds() == [0.0, 0.0]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 20, math.nan, math.inf])
def test_top_k_outside_0_1_refused(bad):
    """top_k is a fraction in (0, 1]: a percent (20), 0 or NaN is refused with a one-line hint."""
    x = torch.randn(2, 100)
    for call in (lambda: ops.ties_merge(x, bad), lambda: ops.MagnitudeThreshold(2, bad),
                 lambda: ops.magnitude_threshold(x, bad)):
        with pytest.raises(ValueError, match=r"top_k is a fraction: 20% is 0\.2") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="top_k is a fraction"):
        knots_ext._C.MagnitudeSelect(2, bad)  # the extension refuses it too


def test_streaming_thresholds_before_done_raise():
    sel = ops.MagnitudeThreshold(2, 0.3)
    with pytest.raises(RuntimeError, match="final|round"):
        sel.thresholds()
    sel.update(0, torch.randn(1000))
    sel.update(1, torch.randn(1000))
    sel.finish_round()
    assert not sel.done and sel.round == 1
    with pytest.raises(RuntimeError, match="final|round"):
        sel.thresholds()


def test_streaming_update_after_done_and_bad_task():
    sel = ops.MagnitudeThreshold(2, 1.0)
    with pytest.raises(ValueError, match="task"):
        sel.update(2, torch.randn(10))
    with pytest.raises(ValueError, match="task"):
        sel.update(-1, torch.randn(10))
    sel.update(0, torch.randn(10))
    sel.finish_round()
    assert sel.done
    with pytest.raises(RuntimeError):
        sel.update(0, torch.randn(10))
    with pytest.raises(ValueError):
        ops.MagnitudeThreshold(0, 0.5)
    with pytest.raises(ValueError, match="top_k"):
        ops.MagnitudeThreshold(2, -0.5)
    with pytest.raises(TypeError):
        ops.MagnitudeThreshold(2, 0.5).update(0, torch.randn(10, dtype=torch.float64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("size", [100, 50_000])
def test_streaming_nonfinite_raises_at_finish_round(bad, size):
    sel = ops.MagnitudeThreshold(2, 0.5)
    a = torch.randn(size)
    a[size // 2] = bad
    sel.update(0, torch.randn(700))
    sel.update(1, a)  # accepted here...
    with pytest.raises(ValueError, match="NaN|Inf"):
        sel.finish_round()  # ...reported when the round closes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,P", [(1, 100), (3, 4097), (4, 150_000)])
@pytest.mark.parametrize("top_k", [0.5, 0.1, 1e-9, 1.0])
def test_magnitude_threshold_rows(dtype, n, P, top_k):
    g = gen(n * P)
    x = (torch.randn(n, P, generator=g, dtype=F64) * torch.exp(torch.randn(n, 1, generator=g, dtype=F64))).to(dtype)
    got = ops.magnitude_threshold(x, top_k)
    assert_thresholds_equal(got, [ref_threshold(x[r].to(F64), top_k) for r in range(n)])


def test_magnitude_threshold_heavy_ties_and_zeros():
    g = gen(12)
    x = torch.randint(-3, 4, (3, 60_000), generator=g).to(torch.float32)
    x[1] = 0.0
    x[2, :59_000] = 0.0
    for top_k in (0.5, 0.2, 0.01, 1e-9):
        got = ops.magnitude_threshold(x, top_k)
        assert_thresholds_equal(got, [ref_threshold(x[r].to(F64), top_k) for r in range(3)])


def test_magnitude_threshold_numpy_and_noncontiguous():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((50_000, 3)).astype(np.float32).T
    got = ops.magnitude_threshold(x, 0.25)
    assert_thresholds_equal(got, [ref_threshold(torch.from_numpy(x[r].copy()).to(F64), 0.25) for r in range(3)])


@pytest.mark.parametrize("P", [5000, 80_000])
def test_magnitude_threshold_after_dare(P):
    """With DARE settings the thresholds are those of the DARE'd values (independent mask)."""
    g = gen(P)
    x = torch.randn(3, P, generator=g)
    p, seed, module, offset = 0.4, 77, "mlp.down_proj", 6
    got = ops.magnitude_threshold(x, 0.2, dare_p=p, seed=seed, module=module, elem_offset=offset)
    expected = [ref_threshold(dare_ref32(x[r], p, seed, r, module, offset).to(F64), 0.2) for r in range(3)]
    assert_thresholds_equal(got, expected)


@pytest.mark.parametrize("P", [5000, 80_000])
def test_magnitude_threshold_after_dare_with_tasks(P):
    """Row r's DARE mask is that of task tasks[r] (ops module docstring), as in ties_merge."""
    g = gen(P)
    x = torch.randn(3, P, generator=g)
    p, seed, module, tasks, offset = 0.4, 77, "mlp.down_proj", [2, 0, 5], 6
    got = ops.magnitude_threshold(x, 0.2, dare_p=p, seed=seed, module=module, tasks=tasks, elem_offset=offset)
    expected = [ref_threshold(dare_ref32(x[r], p, seed, tasks[r], module, offset).to(F64), 0.2) for r in range(3)]
    assert_thresholds_equal(got, expected)
    # the same thresholds as the ones ties_merge uses for these settings
    _, thr = ops.ties_merge(x, 0.2, dare_p=p, seed=seed, module=module, tasks=tasks, elem_offset=offset,
                            return_thresholds=True)
    assert_thresholds_equal(thr, expected, "ties_merge thresholds")


def test_streaming_with_dare_chunks():
    """A module sent in chunks with elem_offset: the threshold is that of the DARE'd module."""
    g = gen(14)
    full = [torch.randn(30_001, generator=g) for _ in range(2)]
    p, seed, module = 0.25, 5, "o_proj"
    cuts = [0, 4097, 4098, 20_003, 30_001]
    sel = ops.MagnitudeThreshold(2, 0.1)
    while not sel.done:
        for task in (1, 0):
            for a, b in zip(cuts[:-1], cuts[1:]):
                sel.update(task, full[task][a:b], dare_p=p, seed=seed, module=module, elem_offset=a)
        sel.finish_round()
    expected = [ref_threshold(dare_ref32(full[t], p, seed, t, module, 0).to(F64), 0.1) for t in range(2)]
    assert_thresholds_equal(sel.thresholds(), expected)
