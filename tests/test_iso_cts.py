"""Iso-CTS (knots_ext.methods.iso.iso_cts) against a float64 dense reference written here: dense
SVDs of the materialised Task Arithmetic sum and of each task's update projected off the common
subspace, several shapes, mixed ranks; plus one task, common_fraction 1.0 (= Iso-C), 0.0, the
split rule, and the engine's iso-cts method."""
from __future__ import annotations

import math

import pytest
import torch

from knots_ext.methods.iso import ISO_CTS_COMMON_FRACTION, iso_c, iso_cts
from knots_ext.methods.spaces import ModuleTasks

F64 = torch.float64
TOL = 1e-5


def make_module(shape, ranks, seed=0, scales=None):
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    factors = [(torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen) / math.sqrt(d_in))
               for r in ranks]
    scales = scales or [0.5 + 0.25 * i for i in range(len(ranks))]
    return ModuleTasks("m", list(range(len(ranks))), factors, scales, shape)


def dense_updates(m):
    return [s * B.to(F64) @ A.to(F64) for (B, A), s in zip(m.factors, m.scales)]


def polar64(M):
    P, _, Qt = torch.linalg.svd(M, full_matrices=False)
    return P @ Qt


def ref_split(R, n, f):
    """The authors' split with R (numerical rank) for min(d): k = int(R f); the task-specific
    total rounded to a multiple of n; k takes the rest."""
    k = int(R * f)
    ts = round((R - k) / n) * n
    if ts > R:
        ts = (R // n) * n
    return R - ts, ts // n


def ref_iso_cts(updates, lam, f, tol=TOL):
    total = sum(updates)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    R = int((S > tol).sum())
    k, per_task = ref_split(R, len(updates), f)
    Uc, Sc, Vhc = U[:, :k], S[:k], Vh[:k]
    Us, Ss, Vs = [], [], []
    for dW in updates:
        w_ts = dW - Uc @ (Uc.T @ dW)
        u, s, vh = torch.linalg.svd(w_ts, full_matrices=False)
        keep = min(per_task, int((s > tol).sum()))
        Us.append(u[:, :keep]), Ss.append(s[:keep]), Vs.append(vh[:keep])
    U_all, S_all, Vh_all = torch.cat(Us + [Uc], 1), torch.cat(Ss + [Sc]), torch.cat(Vs + [Vhc], 0)
    want = lam * S_all.mean() * polar64(U_all) @ polar64(Vh_all.T).T
    return want, U_all.shape[1], (k, per_task)


def close(got, want, rtol):
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < rtol, f"max relative error {err:.3g} > {rtol}"


def test_default_is_paper():
    assert ISO_CTS_COMMON_FRACTION == 0.8


@pytest.mark.parametrize("shape", [(24, 16), (12, 16), (16, 40), (96, 64)])
@pytest.mark.parametrize("ranks", [[2, 4, 3], [1, 5, 2, 3], [6, 6]])
@pytest.mark.parametrize("f", [0.8, 0.5])
def test_against_dense_reference(shape, ranks, f):
    m = make_module(shape, ranks, seed=sum(shape) + len(ranks))
    lam = 0.7
    want, K, (k, per_task) = ref_iso_cts(dense_updates(m), lam, f)
    got = iso_cts(m, lam, TOL, common_fraction=f)
    assert got.B.shape == (shape[0], K) and got.A.shape == (K, shape[1])
    assert got.B.dtype == torch.float32
    close(got.dense(), want, 2e-5)
    # isotropic: the merged update's non-zero singular values are all equal
    S = torch.linalg.svdvals(got.dense().double())
    assert torch.allclose(S[:K], S[0].expand(K), rtol=1e-4)


def test_task_specific_part_is_used():
    # sum r_i = 12 < min(d): the common part covers 80% of R, the rest is task-specific and the
    # result differs from Iso-C
    m = make_module((64, 48), [4, 4, 4], seed=3)
    got = iso_cts(m, 1.0, TOL).dense()
    c = iso_c(m, 1.0, TOL).dense()
    assert float((got - c).abs().max() / c.abs().max()) > 1e-2


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_common_fraction_one_is_iso_c(shape):
    m = make_module(shape, [2, 5, 3], seed=7)
    got, want = iso_cts(m, 0.6, TOL, common_fraction=1.0), iso_c(m, 0.6, TOL)
    assert got.B.shape == want.B.shape
    torch.testing.assert_close(got.dense(), want.dense(), rtol=1e-6, atol=1e-7)


def test_common_fraction_zero():
    m = make_module((40, 32), [3, 2, 4], seed=11)
    want, K, (k, per_task) = ref_iso_cts(dense_updates(m), 1.0, 0.0)
    assert k == 0 and per_task == 3
    close(iso_cts(m, 1.0, TOL, common_fraction=0.0).dense(), want, 2e-5)


@pytest.mark.parametrize("f", [0.8, 0.3, 1.0])
def test_one_task(f):
    # one task: the TA sum is the task itself; the projected update lies in the discarded
    # directions, so the result is Iso-C of that single update whatever the split
    m = make_module((24, 16), [5], seed=2, scales=[1.5])
    want, _, _ = ref_iso_cts(dense_updates(m), 0.9, f)
    got = iso_cts(m, 0.9, TOL, common_fraction=f)
    close(got.dense(), want, 2e-5)
    close(got.dense(), iso_c(m, 0.9, TOL).dense().double(), 2e-5)


def test_zero_update_and_bad_fraction():
    m = make_module((12, 16), [2, 3], seed=1, scales=[0.0, 0.0])
    out = iso_cts(m, 1.0, TOL)
    assert out.B.shape == (12, 0) and out.A.shape == (0, 16)
    with pytest.raises(ValueError):
        iso_cts(make_module((12, 16), [2]), 1.0, TOL, common_fraction=1.5)


@pytest.mark.parametrize("R,n,f", [(12, 3, 0.8), (10, 4, 0.8), (7, 2, 0.0), (3, 2, 0.0), (1, 3, 0.8), (16, 8, 0.8)])
def test_split(R, n, f):
    from knots_ext.methods.iso import iso_cts_split
    k, per_task = iso_cts_split(R, n, f)
    assert (k, per_task) == ref_split(R, n, f)
    assert 0 <= k <= R and k + n * per_task == R


def test_engine_method(tmp_path):
    import knots_ext
    from knots_ext.methods import METHODS
    if "iso-cts" not in METHODS:
        pytest.skip("iso-cts not registered in knots_ext.methods")
    from test_merge import read_updates, write_adapter
    paths = [write_adapter(tmp_path / f"a{i}", r, 2 * r, seed=i) for i, r in enumerate([2, 4, 3])]
    updates = [read_updates(p) for p in paths]
    for f, kw in [(0.8, {}), (0.5, {"common_fraction": 0.5})]:
        res = knots_ext.merge(paths, method="iso-cts", lam=0.8, **kw)
        for name in updates[0]:
            want, _, _ = ref_iso_cts([u[name] for u in updates], 0.8, f)
            close(res.delta(name), want, 2e-5)
