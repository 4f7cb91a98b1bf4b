"""Factored linear algebra on LoRA factors: the KnOTS SVD of [s_1 B_1 A_1 | ... | s_n B_n A_n]
and the truncated SVD of a product P @ Q, through QR of the factors and an SVD of a small core
(DESIGN.md §1, "The QR-of-factors trick"). The dense updates and their concatenation are never
formed. Dense factorisations are torch.linalg (Householder QR, so rank-deficient factors work)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOL = 1e-5


@dataclass
class KnotsSVD:
    """[dW_1 | ... | dW_n] = U diag(S) [V_1^T | ... | V_n^T], singular values > tol only.
    U: (d_out, k), S: (k,), vt[i]: (k, d_in) — all float64."""

    U: torch.Tensor
    S: torch.Tensor
    vt: list

    def representation(self, i: int) -> torch.Tensor:
        """Task i's KnOTS representation diag(S) V_i^T (k x d_in)."""
        return self.S[:, None] * self.vt[i]


def knots_svd(Bs, As, scales, tol: float = DEFAULT_TOL, device=None) -> KnotsSVD:
    """The SVD of the concatenation of s_i * B_i @ A_i (B_i: d_out x r_i, A_i: r_i x d_in) along
    the input dimension, in float64, from the factors: QR of B_cat = [s_1 B_1 .. s_n B_n] and of
    each A_i^T, SVD of the k x k core R_B blockdiag(R_1^T .. R_n^T), k = sum r_i."""
    if not (len(Bs) == len(As) == len(scales)) or not Bs:
        raise ValueError("knots_svd needs one B, A and scale per task, and at least one task")
    f64 = dict(dtype=torch.float64, device=device if device is not None else Bs[0].device)
    B_cat = torch.cat([float(s) * B.to(**f64) for B, s in zip(Bs, scales)], dim=1)
    Q_B, R_B = torch.linalg.qr(B_cat)  # (d_out, m), (m, k), m = min(d_out, k)
    Q_A, core_cols = [], []
    col = 0
    for A in As:
        Q_i, R_i = torch.linalg.qr(A.to(**f64).T)  # (d_in, q_i), (q_i, r_i)
        r = A.shape[0]
        Q_A.append(Q_i)
        core_cols.append(R_B[:, col:col + r] @ R_i.T)  # block column i of the core: (m, q_i)
        col += r
    core = torch.cat(core_cols, dim=1)
    U_K, S, W_t = torch.linalg.svd(core, full_matrices=False)
    keep = S > tol
    U_K, S, W_t = U_K[:, keep], S[keep], W_t[keep]
    vt, col = [], 0
    for Q_i in Q_A:
        q = Q_i.shape[1]
        vt.append(W_t[:, col:col + q] @ Q_i.T)
        col += q
    return KnotsSVD(U=Q_B @ U_K, S=S, vt=vt)


def truncated_factors(P: torch.Tensor, Q: torch.Tensor, rank: int | None = None, tol: float = 0.0):
    """Factors (B, A) of the best rank-`rank` approximation of P @ Q (P: d_out x k, Q: k x d_in),
    through QR of P and Q^T and an SVD of the k x k core. rank=None keeps every singular value
    above tol. B = U_r diag(S_r), A = V_r^T, in float64."""
    P64, Q64 = P.to(torch.float64), Q.to(torch.float64)
    Q_P, R_P = torch.linalg.qr(P64)
    Q_Q, R_Q = torch.linalg.qr(Q64.T)
    U, S, Vt = torch.linalg.svd(R_P @ R_Q.T, full_matrices=False)
    keep = int((S > tol).sum()) if rank is None else min(int(rank), S.numel())
    return (Q_P @ U[:, :keep]) * S[:keep], Vt[:keep] @ Q_Q.T


def dense_factors(dW: torch.Tensor, rank: int | None = None, tol: float = 0.0):
    """Factors (B, A) of a dense update, truncated to `rank` (None: its numerical rank)."""
    U, S, Vt = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    keep = int((S > tol * max(1.0, float(S[0]) if S.numel() else 1.0)).sum()) if rank is None else min(int(rank), S.numel())
    return U[:, :keep] * S[:keep], Vt[:keep]
