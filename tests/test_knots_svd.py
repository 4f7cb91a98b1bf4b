"""knots_svd's three routes to the KnOTS SVD (CholeskyQR of B_cat, Householder QR where B_cat is
ill conditioned or rank-deficient, and no QR where k >= d_out) against a dense float64 SVD of the
materialised concatenation [s_1 B_1 A_1 | ... | s_n B_n A_n], signs fixed by the tests' own
convention (merge_refs.signs_fixed)."""

from __future__ import annotations

import pytest
import torch
from merge_refs import signs_fixed

from knots_ext import linalg
from knots_ext.linalg import knots_svd

F64 = torch.float64


def dense_reference(Bs, As, scales, tol=1e-5):
    cat = torch.cat([s * B.to(F64) @ A.to(F64) for B, A, s in zip(Bs, As, scales)], dim=1)
    U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
    keep = tol < S
    U, Vh = signs_fixed(U[:, keep], Vh[keep])
    return U, S[keep], S[keep, None] * Vh


def check_against_dense(Bs, As, scales, atol=1e-9):
    got = knots_svd(Bs, As, scales)
    U, S, reps = dense_reference(Bs, As, scales)
    assert got.U.shape == U.shape and got.S.shape == S.shape
    assert torch.allclose(got.S, S, atol=atol * float(S[0]), rtol=0)
    assert torch.allclose(got.U, U, atol=atol * 10, rtol=0)
    rows = torch.cat([got.representation(i) for i in range(len(As))], dim=1)
    assert torch.allclose(rows, reps, atol=atol * float(S[0]), rtol=0)
    # U is orthonormal and the representations rebuild the concatenation.
    assert torch.allclose(got.U.T @ got.U, torch.eye(U.shape[1], dtype=F64), atol=1e-10)
    return got


def random_tasks(d_out, d_in, ranks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=gen) for r in ranks]
    As = [torch.randn(r, d_in, generator=gen) / d_in**0.5 for r in ranks]
    return Bs, As, [0.5 + 0.25 * i for i in range(len(ranks))]


def routes(monkeypatch):
    """Which QR each call took, recorded by wrapping the two choices."""
    taken = []
    cholesky = linalg._cholesky_r
    householder = torch.linalg.qr

    def chol(B):
        out = cholesky(B)
        taken.append("cholesky" if out[1] is not None else "cholesky refused")
        return out

    def qr(B, *a, **k):
        taken.append("householder")
        return householder(B, *a, **k)

    monkeypatch.setattr(linalg, "_cholesky_r", chol)
    monkeypatch.setattr(linalg.torch.linalg, "qr", qr)
    return taken


def test_cholesky_route_on_well_conditioned_factors(monkeypatch):
    taken = routes(monkeypatch)
    check_against_dense(*random_tasks(96, 80, [4, 8, 4, 6]))  # mixed ranks, k = 22 < d_out
    assert taken == ["cholesky"]


def test_householder_route_on_collinear_factors(monkeypatch):
    taken = routes(monkeypatch)
    Bs, As, scales = random_tasks(64, 48, [5, 5, 3])
    Bs[1] = Bs[0] @ torch.randn(5, 5, generator=torch.Generator().manual_seed(1))  # same column space
    Bs[2] = -Bs[0][:, :3].clone()  # a partial negation of task 0
    got = check_against_dense(Bs, As, scales)
    assert taken == ["cholesky refused", "householder"]
    assert got.U.shape[1] <= 5  # rank of B_cat


def test_householder_route_on_ill_conditioned_factors(monkeypatch):
    taken = routes(monkeypatch)
    Bs, As, scales = random_tasks(64, 48, [4, 4])
    Bs[1] = Bs[0] + 1e-6 * Bs[1]  # nearly collinear: cond(B_cat) ~ 1e6, above CHOLESKY_QR_MAX_COND
    check_against_dense(Bs, As, scales, atol=1e-8)
    assert taken[-1] == "householder"


def test_no_qr_when_k_reaches_d_out(monkeypatch):
    taken = routes(monkeypatch)
    check_against_dense(*random_tasks(24, 40, [8, 8, 8, 4]))  # k = 28 >= d_out = 24
    check_against_dense(*random_tasks(16, 40, [8, 8]))  # k = d_out
    assert taken == []


@pytest.mark.parametrize("d_out,d_in,ranks", [(48, 64, [4] * 12), (200, 30, [16, 16]), (40, 40, [1, 2, 3])])
def test_shapes_and_scales(d_out, d_in, ranks):
    Bs, As, scales = random_tasks(d_out, d_in, ranks, seed=len(ranks))
    scales[0] = -2.0  # a negated task
    check_against_dense(Bs, As, scales)


def test_rank_deficient_A_and_tol():
    """A task whose A has a repeated row (rank below r) and singular values near tol: directions at
    or below tol are dropped exactly as the dense reference drops them."""
    Bs, As, scales = random_tasks(50, 60, [4, 4])
    As[1][3] = As[1][2]
    got = check_against_dense(Bs, As, scales)
    assert got.U.shape[1] == 7


def test_float32_inputs_of_mixed_layout():
    Bs, As, scales = random_tasks(80, 72, [6, 6, 6])
    Bs = [B.T.contiguous().T for B in Bs]  # column-major views
    check_against_dense(Bs, As, scales)


def test_cholesky_route_near_its_condition_bound(monkeypatch):
    """B_cat with singular values from 1 down to 5e-4 (cond 2e3): still CholeskyQR, still exact to
    the dense SVD (the basis' orthonormality loss, ~eps cond^2, is far below the tolerance)."""
    Bs, As, scales = random_tasks(128, 96, [8, 8, 8])
    gen = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(128, 24, generator=gen, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=F64))[0]
    B_cat = (Q * torch.logspace(0, -3.3, 24, dtype=F64)) @ V.T
    Bs = [B_cat[:, 8 * i : 8 * i + 8].float() for i in range(3)]
    taken = routes(monkeypatch)
    check_against_dense(Bs, As, scales, atol=1e-10)
    assert taken == ["cholesky"]


@pytest.mark.parametrize("d_out", [96, 30])  # CholeskyQR; and k >= d_out (B_cat rebuilt after eigh)
def test_core_and_representations_in_chunks(monkeypatch, d_out):
    """The core M and the representations formed over chunks of tasks (CORE_CHUNK columns, a task
    never split; mixed ranks so that chunks end unevenly) equal the dense SVD."""
    monkeypatch.setattr(linalg, "CORE_CHUNK", 7)
    Bs, As, scales = random_tasks(d_out, 50, [3, 5, 2, 6, 4, 1, 7])
    check_against_dense(Bs, As, scales)
    assert linalg._chunks([3, 5, 2, 6, 4, 1, 7]) == [
        (0, 3, [(0, 0)]),
        (3, 10, [(1, 3), (2, 8)]),
        (10, 16, [(3, 10)]),
        (16, 21, [(4, 16), (5, 20)]),
        (21, 28, [(6, 21)]),
    ]



@pytest.mark.parametrize("d_out", [96, 30])  # CholeskyQR (triangular R); and k >= d_out (R = B_cat)
def test_gram_core_and_row_grams_in_uneven_blocks(monkeypatch, d_out):
    """B_cat's Gram formed lower block rows only (GRAM_BLOCK rows of it a product), the core's lower
    triangle only and, for a triangular R, only R's rows down to each chunk's last column, and
    the A_i A_i^T batched a few tasks at a time (WORK_MAX_BYTES): blocks that end unevenly, still
    the dense SVD."""
    monkeypatch.setattr(linalg, "GRAM_BLOCK", 5)
    monkeypatch.setattr(linalg, "CORE_CHUNK", 9)
    monkeypatch.setattr(linalg, "WORK_MAX_BYTES", 3 * 6 * 50 * 8)  # 3 tasks of rank 6 a batch
    taken = routes(monkeypatch)
    Bs, As, scales = random_tasks(d_out, 50, [6, 6, 2, 6, 6, 6, 3, 6])
    check_against_dense(Bs, As, scales)
    assert taken == (["cholesky"] if d_out == 96 else [])


def test_lower_gram_is_the_lower_triangle_of_the_gram(monkeypatch):
    monkeypatch.setattr(linalg, "GRAM_BLOCK", 4)
    B = torch.randn(40, 13, generator=torch.Generator().manual_seed(3), dtype=F64)
    got = linalg._lower_gram(B)
    assert torch.allclose(torch.tril(got), torch.tril(B.T @ B), atol=1e-12, rtol=0)
    for j0 in range(0, 13, 4):  # nothing right of each block row's diagonal block
        assert not got[j0 : j0 + 4, j0 + 4 :].any()

@pytest.mark.parametrize("d_out", [96, 30])  # CholeskyQR; and k >= d_out (B_cat freed before eigh)
def test_free_heap_returned_before_a_large_eigendecomposition(monkeypatch, d_out):
    """The C heap's free memory is returned to the system just before the eigendecomposition of a
    core of TRIM_BEFORE_EIGH_BYTES or more (its 3 m^2 doubles are a large merge's peak), not
    before smaller ones, and the result is the dense SVD either way."""
    from knots_ext import factor_ops

    events = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(factor_ops, "release_free_heap", lambda: events.append("trim") or True)
    monkeypatch.setattr(linalg.torch.linalg, "eigh", lambda M: events.append(("eigh", M.shape[0])) or eigh(M))
    Bs, As, scales = random_tasks(d_out, 50, [6, 6, 6, 6, 6, 6])
    m = min(d_out, 36)
    monkeypatch.setattr(linalg, "TRIM_BEFORE_EIGH_BYTES", m * m * 8)  # this core's size: trimmed
    check_against_dense(Bs, As, scales)
    assert events == ["trim", ("eigh", m)]
    events.clear()
    monkeypatch.setattr(linalg, "TRIM_BEFORE_EIGH_BYTES", m * m * 8 + 1)  # one byte more: not
    check_against_dense(Bs, As, scales)
    assert events == [("eigh", m)]
    monkeypatch.undo()
    assert isinstance(factor_ops.release_free_heap(), bool)  # (the real one runs)


def test_float32_representations():
    Bs, As, scales = random_tasks(64, 40, [4, 4, 4])
    want = knots_svd(Bs, As, scales)
    got = knots_svd(Bs, As, scales, coef_dtype=torch.float32)
    for c32, c64 in zip(got.coef, want.coef):
        assert c32.dtype == torch.float32
        assert torch.equal(c32, c64.to(torch.float32))


def test_fix_signs_ties_between_signs_and_zero_columns():
    # Columns whose largest magnitude is held by a positive and a negative entry (the lower index
    # decides), all-zero columns (left as they are) and columns decided by a negative entry.
    U = torch.tensor(
        [
            [0.0, 2.0, -3.0, 0.5, 0.0, -1.0],
            [0.0, -2.0, 3.0, -4.0, 0.0, 1.0],
            [0.0, 1.0, 1.0, 4.0, -0.0, -1.0],
        ],
        dtype=torch.float64,
    )
    rows = torch.arange(18, dtype=torch.float64).reshape(6, 3) + 1
    want_sign = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    got_U, got_rows = linalg.fix_signs(U, rows)
    assert torch.equal(got_U, U * want_sign)
    assert torch.equal(got_rows, rows * want_sign[:, None])
    for dtype in (torch.float32, torch.float64):  # and the reference convention agrees
        ref_U, _ = signs_fixed(U.to(dtype), rows.to(dtype))
        assert torch.equal(linalg.fix_signs(U.to(dtype), rows.to(dtype))[0], ref_U)
