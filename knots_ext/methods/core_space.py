"""Core Space merging (Panariello et al., NeurIPS 2025): every task's update is expressed in
shared bases — the left singular vectors U_B of [s_1 B_1 .. s_n B_n] and the right singular
vectors V_A of [A_1; ..; A_n], each over its numerical rank (at most k = sum r_i) — as a small
core M_i = U_B^T s_i B_i A_i V_A.
TA / TIES / DARE merge the cores; the update is U_B M V_A^T. Since every B_i lies in span(U_B)
and every A_i in span(V_A), TA in core space equals TA exactly.

From the factors: B_cat = Q_B R_B and A_cat^T = Q_A R_A (QR), R_B = U S W^T and R_A = U' S' W'^T
(small SVDs) give U_B = Q_B U and V_A = Q_A U', and U_B^T s_i B_i = (U^T R_B)[:, block i],
A_i V_A = (U'^T R_A)[:, block i]^T: the cores need no d-sized product."""

from __future__ import annotations

import torch

from ..linalg import fix_signs
from . import rows_method
from .params import LAM, TOP_K, TOP_K_SCOPE
from .spaces import FactoredUpdate, ModuleTasks


def _basis_and_coords(mat: torch.Tensor):
    """Orthonormal left singular vectors of a tall mat (d x k) over its numerical rank (singular
    values above S_max * max(d, k) * eps, as numpy's matrix_rank), signs fixed, and mat's
    coordinates in them. Directions of zero singular value (duplicated or opposite adapters)
    would carry only rounding noise, which TIES would count as votes."""
    Q, R = torch.linalg.qr(mat)
    U, S, _ = torch.linalg.svd(R, full_matrices=False)
    keep = (S[0] if S.numel() else 0.0) * max(mat.shape) * torch.finfo(mat.dtype).eps < S
    U = U[:, keep]
    return fix_signs(Q @ U, U.T @ R)


class CoreSpace:
    """Task i's row is its core U_B^T s_i B_i A_i V_A, given as the factors (U_B^T s_i B_i) and
    (A_i V_A); the merged core M maps back as U_B M V_A^T."""

    name = "core"
    rows_in_state = True

    def __init__(self, params=None):
        pass

    def prepare(self, m: ModuleTasks):
        f64 = torch.float64
        B_cat = torch.cat([s * B.to(f64) for (B, _), s in zip(m.factors, m.scales)], dim=1)
        A_cat_t = torch.cat([A.to(f64) for _, A in m.factors], dim=0).T
        U_B, b_coords = _basis_and_coords(B_cat)  # b_coords[:, block i] = U_B^T s_i B_i
        V_A, a_coords = _basis_and_coords(A_cat_t)  # a_coords[:, block i] = V_A^T A_i^T
        blocks, c0 = [], 0
        for B, _ in m.factors:
            r = B.shape[1]
            blocks.append((b_coords[:, c0 : c0 + r].to(torch.float32), a_coords[:, c0 : c0 + r].T.to(torch.float32)))
            c0 += r
        return U_B.to(torch.float32), V_A.to(torch.float32), blocks

    def row_factors(self, m: ModuleTasks, state) -> list:
        return [(b, a, 1.0) for b, a in state[2]]

    def update(self, m, merged: torch.Tensor, state) -> FactoredUpdate:
        U_B, V_A, _ = state
        M = merged.reshape(U_B.shape[1], V_A.shape[1])
        return FactoredUpdate(U_B, M @ V_A.T)


_TIES = (TOP_K, TOP_K_SCOPE, LAM)
METHODS = [
    rows_method("core-ta", "Task Arithmetic on Core Space cores (equals ta)", CoreSpace, "ta", (LAM,)),
    rows_method("core-ties", "TIES on Core Space cores", CoreSpace, "ties", _TIES),
    rows_method("core-dare-ta", "DARE then TA on Core Space cores", CoreSpace, "ta", (LAM,), dare=True),
    rows_method("core-dare-ties", "DARE then TIES on Core Space cores", CoreSpace, "ties", _TIES, dare=True),
]
