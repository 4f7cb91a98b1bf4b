"""Factored linear algebra on LoRA factors: the KnOTS SVD of [s_1 B_1 A_1 | ... | s_n B_n A_n]
and the truncated SVD of a product P @ Q, through QR of the factors and an SVD of a small core
(DESIGN.md §1, "The QR-of-factors trick"). The dense updates and their concatenation are never
formed. Dense factorisations are torch.linalg (Householder QR, so rank-deficient factors work)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_TOL = 1e-5


def fix_signs(U: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sign convention of every basis the package computes (DESIGN.md §1): singular pair j
    (column j of U, row j of `rows`) is negated where needed so that the largest-magnitude entry
    of U's column j is positive, the lowest index winning ties. An SVD fixes its vectors only up
    to sign, and TIES's majority rule is not sign-equivariant: without this, a merge could change
    with the thread count, the BLAS or the memory layout."""
    if U.numel() == 0:
        return U, rows
    idx = U.abs().argmax(dim=0)  # the first maximal index
    sign = torch.sign(U.gather(0, idx[None, :]))[0]
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, rows * sign[:, None]


@dataclass
class KnotsSVD:
    """[dW_1 | ... | dW_n] = U diag(S) [V_1^T | ... | V_n^T], singular values > tol only, in
    float64. Task i's representation diag(S) V_i^T equals coef[i] @ A_i (coef[i]: k x r_i), so
    it is rebuilt from the adapter's own A_i with one small product whenever it is needed."""

    U: torch.Tensor  # (d_out, k)
    S: torch.Tensor  # (k,)
    coef: list  # (k, r_i) per task
    A: list  # (r_i, d_in) per task, float64

    def representation(self, i: int) -> torch.Tensor:
        """Task i's KnOTS representation diag(S) V_i^T (k x d_in)."""
        return self.coef[i] @ self.A[i]

    @property
    def vt(self) -> list:
        return [self.representation(i) / self.S[:, None] for i in range(len(self.A))]


def knots_svd(Bs, As, scales, tol: float = DEFAULT_TOL, device=None) -> KnotsSVD:
    """The SVD of the concatenation of s_i * B_i @ A_i (B_i: d_out x r_i, A_i: r_i x d_in) along
    the input dimension, in float64, from the factors: QR of B_cat = [s_1 B_1 .. s_n B_n] and of
    each A_i^T, SVD of the core K = R_B blockdiag(R_1^T .. R_n^T) (at most k x k, k = sum r_i).

    With A_i^T = Q_i R_i, V_i^T = W_i^T Q_i^T, where W_i is task i's block of K's right singular
    vectors. Those lie in range(R_i), so V_i^T = W_i^T pinv(R_i^T) A_i: the d_in-sized Q_i is never
    kept, and rank-deficient A_i (pinv) and B_cat (Householder QR) need no special case."""
    if not (len(Bs) == len(As) == len(scales)) or not Bs:
        raise ValueError("knots_svd needs one B, A and scale per task, and at least one task")
    f64 = dict(dtype=torch.float64, device=device if device is not None else Bs[0].device)
    # Intermediates are dropped as soon as they are used: at n = 256 rank-16 adapters of a
    # 4096-wide module each is 4096 x 4096 float64 (128 MB).
    B_cat = torch.cat([float(s) * B.to(**f64) for B, s in zip(Bs, scales)], dim=1)
    Q_B, R_B = torch.linalg.qr(B_cat)  # (d_out, m), (m, k), m = min(d_out, k)
    del B_cat
    A64 = [A.to(**f64) for A in As]
    R_A = [torch.linalg.qr(A.T, mode="r")[1] for A in A64]  # (q_i, r_i), q_i = min(d_in, r_i)
    core = torch.cat(
        [R_B[:, c0 : c0 + A.shape[0]] @ R.T for A, R, c0 in zip(A64, R_A, _offsets([A.shape[0] for A in A64]))], dim=1
    )
    del R_B
    U_K, S, W_t = torch.linalg.svd(core, full_matrices=False)
    del core
    keep = tol < S
    U, W_t = fix_signs(Q_B @ U_K[:, keep], W_t[keep])
    del Q_B, U_K
    S = S[keep]
    coef = []
    for R, c0 in zip(R_A, _offsets([R.shape[0] for R in R_A])):
        coef.append(S[:, None] * (W_t[:, c0 : c0 + R.shape[0]] @ torch.linalg.pinv(R.T)))
    return KnotsSVD(U=U, S=S, coef=coef, A=A64)


def _offsets(sizes):
    out, c = [], 0
    for n in sizes:
        out.append(c)
        c += n
    return out


@dataclass
class Truncated:
    """The kept singular directions of a matrix as factors B = U_r diag(S_r), A = V_r^T (float64,
    signs fixed), and what the truncation cost: the sum of the squared singular values dropped
    and of all of them (||M||_F^2), so ||M - B A||_F / ||M||_F = sqrt(dropped / total)."""

    B: torch.Tensor
    A: torch.Tensor
    dropped: float
    total: float


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The fewest leading singular directions whose squared singular values hold at least
    `energy` (0 < energy <= 1) of the total, sum S^2 = ||M||_F^2; 0 for a zero matrix."""
    cum = torch.cumsum(S.to(torch.float64) ** 2, 0)
    if cum.numel() == 0 or float(cum[-1]) == 0.0:
        return 0
    return int((cum < energy * cum[-1]).sum()) + 1


def _kept(S: torch.Tensor, rank: int | None, energy: float | None, tol: float) -> tuple[int, float, float]:
    """(how many directions to keep, dropped, total) (see Truncated): at most `rank`, at most
    energy_rank(S, energy), and with no rank and no energy every singular value above tol."""
    keep = S.numel() if rank is not None or energy is not None else int((tol < S).sum())
    if rank is not None:
        keep = min(keep, int(rank))
    if energy is not None:
        keep = min(keep, energy_rank(S, energy))
    sq = S.to(torch.float64) ** 2
    return keep, float(sq[keep:].sum()), float(sq.sum())


def truncate(P: torch.Tensor, Q: torch.Tensor, rank=None, energy=None, tol: float = 0.0) -> Truncated:
    """The truncated SVD of P @ Q (P: d_out x k, Q: k x d_in) from the factors: QR of P and Q^T,
    an SVD of the k x k core; only the kept directions are formed (see _kept for which)."""
    P64, Q64 = P.to(torch.float64), Q.to(torch.float64)
    Q_P, R_P = torch.linalg.qr(P64)
    Q_Q, R_Q = torch.linalg.qr(Q64.T)
    U, S, Vt = torch.linalg.svd(R_P @ R_Q.T, full_matrices=False)
    keep, dropped, total = _kept(S, rank, energy, tol)
    U, Vt = fix_signs(Q_P @ U[:, :keep], Vt[:keep])
    return Truncated(U * S[:keep], Vt @ Q_Q.T, dropped, total)


def truncate_dense(dW: torch.Tensor, rank=None, energy=None) -> Truncated:
    """The truncated SVD of a dense matrix (float64; see _kept for which directions stay)."""
    U, S, Vt = torch.linalg.svd(dW.to(torch.float64), full_matrices=False)
    keep, dropped, total = _kept(S, rank, energy, 0.0)
    U, Vt = fix_signs(U[:, :keep], Vt[:keep])
    return Truncated(U * S[:keep], Vt, dropped, total)


def truncated_factors(P: torch.Tensor, Q: torch.Tensor, rank: int | None = None, tol: float = 0.0):
    """Factors (B, A) of the best rank-`rank` approximation of P @ Q (truncate); rank=None keeps
    every singular value above tol. B = U_r diag(S_r), A = V_r^T, in float64."""
    t = truncate(P, Q, rank, tol=tol)
    return t.B, t.A


def dense_factors(dW: torch.Tensor, rank: int | None = None):
    """Factors (B, A) of a dense update. rank=None: exact, with no SVD: (dW, I) or (I, dW) at rank
    min(d_out, d_in) (a dense merge such as TIES's is full-rank in practice, so an SVD would keep
    as many directions, at O(d^3) cost and with its own rounding); all-zero: rank 0. Otherwise the
    best rank-`rank` approximation, by SVD (signs fixed)."""
    d_out, d_in = dW.shape
    if rank is None:
        if not bool(dW.any()):
            return dW.new_zeros(d_out, 0), dW.new_zeros(0, d_in)
        if d_in <= d_out:
            return dW, torch.eye(d_in, dtype=dW.dtype, device=dW.device)
        return torch.eye(d_out, dtype=dW.dtype, device=dW.device), dW
    t = truncate_dense(dW, rank)
    return t.B, t.A
