"""One rounding rule for every kernel (so CPU, GPU and every CPU instruction-set path agree bit for
bit): each product and each sum is rounded to float32 on its own, never fused into an FMA, with
rows added in row order. Checked bit for bit against float32 references written here in numpy
with exactly that rounding."""
import numpy as np
import pytest
import torch

from knots_ext import ops

from conftest import bits32, dare_ref32, randn_rows, ref_threshold

F32 = np.float32


def ta_ref32(rows: np.ndarray, weights) -> np.ndarray:
    """sum_r w_r * rows[r] in float32, multiply then add, row by row."""
    acc = np.zeros(rows.shape[1], dtype=F32)
    for r, w in enumerate(weights):
        acc = acc + F32(w) * rows[r]
    return acc


def ties_ref32(rows: np.ndarray, thresholds, lam: float) -> np.ndarray:
    """TIES (DESIGN.md §1) in float32 with the kernels' order of operations: trimmed sums row by
    row, disjoint mean = lam * (sum / count)."""
    kept = np.abs(rows) >= np.asarray(thresholds, dtype=F32)[:, None]
    trimmed = np.where(kept, rows, F32(0))
    total, pos, neg = (np.zeros(rows.shape[1], dtype=F32) for _ in range(3))
    pos_count, neg_count = (np.zeros(rows.shape[1], dtype=np.int64) for _ in range(2))
    for t in trimmed:
        total = total + t
        pos = pos + np.where(t > 0, t, F32(0))
        neg = neg + np.where(t < 0, t, F32(0))
        pos_count += t > 0
        neg_count += t < 0
    sign = np.sign(total).astype(np.int64)
    needs_majority = (total == 0) & (pos_count + neg_count > 0)
    sign_sum = int(sign[~needs_majority].sum())
    sign = np.where(needs_majority, (sign_sum > 0) - (sign_sum < 0), sign)
    pos_mean = pos / np.maximum(pos_count, 1).astype(F32)
    neg_mean = neg / np.maximum(neg_count, 1).astype(F32)
    chosen = np.where(sign > 0, pos_mean, np.where(sign < 0, neg_mean, F32(0)))
    return (F32(lam) * chosen).astype(F32)


def assert_bits_equal(got, expected, what):
    got, expected = bits32(got), bits32(expected)
    differ = np.flatnonzero(got != expected)
    assert differ.size == 0, (f"{what}: {differ.size} of {got.size} positions differ in their bits; first at "
                              f"{differ[0]}: got {got[differ[0]:differ[0] + 1].view(F32)[0]!r}, "
                              f"expected {expected[differ[0]:differ[0] + 1].view(F32)[0]!r}")


@pytest.mark.parametrize("n,P", [(5, 100_003), (2, 7)])
def test_task_arithmetic_rounds_product_then_sum(n, P):
    x = randn_rows(n, P, seed=n)
    lam, weights = 0.37, [1.3, -0.7, 2.1, 0.55, -1.9][:n]
    got = ops.task_arithmetic(x, lam, weights=weights)
    assert_bits_equal(got, ta_ref32(x.numpy(), [lam * w for w in weights]), "task_arithmetic")


def test_dare_task_arithmetic_rounds_each_step():
    x = randn_rows(4, 50_001, seed=11)
    p, seed, module, weights = 0.3, 5, "layers.1.q", [0.9, -1.1, 1.7, 0.3]
    got = ops.task_arithmetic(x, 1.0, weights=weights, dare_p=p, seed=seed, module=module)
    dared = np.stack([dare_ref32(x[r], p, seed, r, module).numpy() for r in range(4)])
    assert_bits_equal(got, ta_ref32(dared, weights), "DARE-TA")
    assert_bits_equal(ops.dare(x[2], p, seed, task=2, module=module), dared[2], "dare")


@pytest.mark.parametrize("top_k,lam", [(0.2, -0.8), (1.0, 1.3)])
def test_ties_merge_rounds_like_float32_reference(top_k, lam):
    x = randn_rows(6, 200_001, seed=3)
    got, thresholds = ops.ties_merge(x, top_k, lam, return_thresholds=True)
    expected_thr = [ref_threshold(x[r], top_k) for r in range(6)]
    assert thresholds == expected_thr
    assert_bits_equal(got, ties_ref32(x.numpy(), expected_thr, lam), "ties_merge")


def test_dare_ties_rounds_like_float32_reference():
    x = randn_rows(4, 80_000, seed=4)
    p, seed = 0.4, 9
    got, thresholds = ops.ties_merge(x, 0.3, 0.6, dare_p=p, seed=seed, module="m", return_thresholds=True)
    dared = np.stack([dare_ref32(x[r], p, seed, r, "m").numpy() for r in range(4)])
    assert thresholds == [ref_threshold(torch.from_numpy(d), 0.3) for d in dared]
    assert_bits_equal(got, ties_ref32(dared, thresholds, 0.6), "DARE-TIES")
