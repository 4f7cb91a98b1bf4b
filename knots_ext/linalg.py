"""Factored linear algebra on LoRA factors: the KnOTS SVD of [s_1 B_1 A_1 | ... | s_n B_n A_n]
(CholeskyQR of B_cat and an eigendecomposition of a small core) and the truncated SVD of a product
P @ Q (QR of the factors and an SVD of a small core): DESIGN.md §1, "The QR-of-factors trick". The
dense updates and their concatenation are never formed. Dense factorisations are torch.linalg
(Cholesky, eigh, and Householder QR where a factor is rank-deficient or ill conditioned)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from . import factor_ops

DEFAULT_TOL = 1e-5


def fix_signs(U: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sign convention of every basis the package computes (DESIGN.md §1): singular pair j
    (column j of U, row j of `rows`) is negated where needed so that the largest-magnitude entry
    of U's column j is positive, the lowest index winning ties. An SVD fixes its vectors only up
    to sign, and TIES's majority rule is not sign-equivariant: without this, a merge could change
    with the thread count, the BLAS or the memory layout."""
    if U.numel() == 0:
        return U, rows
    sign = _column_signs(U)
    return U * sign, rows * sign[:, None]


def _column_signs(U: torch.Tensor) -> torch.Tensor:
    """+-1 per column of U: the sign of its largest-magnitude entry (the first on ties), 1 for a
    zero column."""
    # A column's largest entry and its smallest decide it unless they have the same magnitude
    # (a tie between signs, decided by the lower index) or are both 0 (a zero column: +1).
    top, bottom = U.amax(dim=0), U.amin(dim=0)
    sign = torch.where(top >= -bottom, 1.0, -1.0).to(U.dtype)
    tied = (top == -bottom).nonzero()[:, 0]
    if tied.numel():
        col = U[:, tied]
        first = torch.sign(col.gather(0, col.abs().argmax(dim=0)[None, :]))[0]  # the first maximal index
        sign[tied] = torch.where(first == 0, torch.ones_like(first), first)
    return sign


@dataclass
class KnotsSVD:
    """[dW_1 | ... | dW_n] = U diag(S) [V_1^T | ... | V_n^T], singular values > tol only, in
    float64. Task i's representation diag(S) V_i^T equals coef[i] @ A_i (coef[i]: k x r_i), so
    it is rebuilt from the adapter's own A_i with one small product whenever it is needed."""

    U: torch.Tensor  # (d_out, k)
    S: torch.Tensor  # (k,)
    coef: list  # (k, r_i) per task, float64
    A: list  # (r_i, d_in) per task, as given

    def representation(self, i: int) -> torch.Tensor:
        """Task i's KnOTS representation diag(S) V_i^T (k x d_in)."""
        return self.coef[i] @ self.A[i].to(self.coef[i])

    @property
    def vt(self) -> list:
        return [self.representation(i) / self.S[:, None] for i in range(len(self.A))]


# CholeskyQR of B_cat is used when its R is this well conditioned (Frobenius estimate, an upper
# bound of the 2-norm condition number): the basis it gives is orthonormal to ~eps * cond^2
# (1e-8 in float64), below float32 output resolution. Otherwise Householder QR.
CHOLESKY_QR_MAX_COND = 1e4


# Columns of R (tasks) per product while the core is accumulated and the representations formed:
# bounded temporaries (d x 512 float64) whatever n is.
CORE_CHUNK = 512
# Rows of B_cat's Gram per product when only its lower triangle is formed (_lower_gram).
GRAM_BLOCK = 128
# The eigendecomposition of an m x m core allocates 3 m^2 doubles more than the core (its vectors
# and LAPACK's workspace): at n = 256 (m = 4096) 384 MB, the largest allocation of a merge. From
# this size of core on, the heap memory glibc keeps free after earlier modules (~50 MB there) is
# returned first, else it sits under that peak (n = 256 on 32 layers: 1059 MiB, goal 1 GB).
TRIM_BEFORE_EIGH_BYTES = 32 << 20


def knots_svd(
    Bs, As, scales, tol: float = DEFAULT_TOL, device=None, coef_dtype=torch.float64, u_dtype=torch.float64
) -> KnotsSVD:
    """The SVD of the concatenation of s_i * B_i @ A_i (B_i: d_out x r_i, A_i: r_i x d_in) along
    the input dimension, in float64, from the factors (DESIGN.md §1, the QR-of-factors trick).

    With B_cat = [s_1 B_1 .. s_n B_n] = Q R and G_i = A_i A_i^T, the concatenation X = Q R
    blockdiag(A_1..A_n) has X X^T = Q (R blockdiag(G_i) R^T) Q^T: the eigenvectors W of the
    m x m core M = R blockdiag(G_i) R^T (m = min(d_out, k), k = sum r_i) give U = Q W and S^2
    its eigenvalues, and task i's representation is U^T s_i B_i A_i = (W^T R_i) A_i, with R_i
    task i's columns of R: coef_i = W^T R_i (returned as coef_dtype), no division by S and no
    d_in-sized factor. Q R is CholeskyQR (Gram of B_cat, Cholesky; U = B_cat R^-1 W) when R is
    well conditioned, else Householder QR (rank-deficient B_cat: collinear or duplicated
    adapters); when k >= d_out, Q = I and R = B_cat. Either way the representations rebuild X
    exactly (X = U U^T X), and singular values <= tol are dropped. U is computed in float64 and
    returned as u_dtype (its signs fixed first)."""
    if not (len(Bs) == len(As) == len(scales)) or not Bs:
        raise ValueError("knots_svd needs one B, A and scale per task, and at least one task")
    # U converted once _factored_svd's float64 arrays are gone (n = 256: 128 MB each)
    U, S, coef = _factored_svd(Bs, As, scales, tol, device, coef_dtype, u_dtype != torch.float64)
    return KnotsSVD(U=U.to(u_dtype), S=S, coef=coef, A=list(As))


def _factored_svd(Bs, As, scales, tol, device, coef_dtype, u_in_work: bool):
    """knots_svd's (U in float64, S, coef); u_in_work: U may be a work array (_work)."""
    f64 = dict(dtype=torch.float64, device=device if device is not None else Bs[0].device)
    ranks = [A.shape[0] for A in As]
    B_cat = _scaled_cat(Bs, scales, ranks, f64)
    d_out, k = B_cat.shape
    grams = _row_grams(As, ranks, f64)
    to_u = None  # U = to_u(W): Q W for the QR chosen
    # R is upper triangular (k x k) after a QR, so R's columns c0:c1 are zero below row c1 and
    # products with them stop there: about half the flops of the core and the representations.
    triangular = k < d_out
    if triangular:
        R, R_inv = _cholesky_r(B_cat)
        if R_inv is not None:  # (R_inv gave the condition estimate; a solve is half its product)
            del R_inv  # (k x k: 128 MB at n = 256)
            to_u = lambda W, out: torch.matmul(  # noqa: E731
                B_cat, torch.linalg.solve_triangular(R, W, upper=True), out=out
            )
        else:
            Q_B, R = torch.linalg.qr(B_cat)
            to_u = lambda W, out: torch.matmul(Q_B, W, out=out)  # noqa: E731
    else:
        R = B_cat
    chunks = _chunks(ranks)
    m = R.shape[0]
    M = torch.zeros(m, m, **f64)
    for c0, c1, tasks in chunks:  # M = sum over chunks of (R_c blockdiag(G_c)) R_c^T
        depth = c1 if triangular else m  # (R's rows that columns c0:c1 reach)
        RG = torch.cat([R[:depth, a : a + ranks[t]] @ grams[t] for t, a in tasks], dim=1)
        # eigh reads the lower triangle only: row block j0:j1 up to column j1
        for j0 in range(0, depth, CORE_CHUNK):
            j1 = min(depth, j0 + CORE_CHUNK)
            M[j0:j1, :j1].addmm_(RG[j0:j1], R[:j1, c0:c1].T)
        del RG
    if to_u is None:  # R is B_cat itself (d_out x k, the largest array here): rebuilt after eigh
        del R, B_cat
    if M.device.type == "cpu" and M.numel() * M.element_size() >= TRIM_BEFORE_EIGH_BYTES:
        factor_ops.release_free_heap()
    evals, W = torch.linalg.eigh(M)  # ascending
    del M
    if to_u is None:
        R = _scaled_cat(Bs, scales, ranks, f64)
    S = evals.flip(0).clamp_min(0.0).sqrt()
    keep = int((tol < S).sum())
    S, W = S[:keep], W[:, W.shape[1] - keep :].flip(1)
    U = W if to_u is None else to_u(W, _work("U", (d_out, keep), f64) if u_in_work else None)
    if keep:
        sign = _column_signs(U)
        U.mul_(sign)
        if U is not W:
            W.mul_(sign)  # (the representations below take their signs from W)
    # Representations W^T R_i, signs fixed through W, formed chunk by chunk in coef_dtype.
    coef: list = [None] * len(ranks)
    for c0, c1, tasks in chunks:
        depth = c1 if triangular else m
        reps = (W[:depth].T @ R[:depth, c0:c1]).to(coef_dtype)
        for t, a in tasks:
            coef[t] = reps[:, a - c0 : a - c0 + ranks[t]]
    return U, S, coef


def _scaled_cat(Bs, scales, ranks, f64) -> torch.Tensor:
    """B_cat = [s_1 B_1 .. s_n B_n] in float64 (a work array: see _work)."""
    d_out = Bs[0].shape[0]
    B_cat = torch.cat([B.to(f64["device"]) for B in Bs], dim=1, out=_work("B_cat", (d_out, sum(ranks)), f64))
    if any(float(s) != 1.0 for s in scales):
        B_cat *= torch.tensor([float(s) for s, r in zip(scales, ranks) for _ in range(r)], **f64)
    return B_cat


# knots_svd's float64 work arrays (B_cat, the stacked A_i, U when returned in another dtype), kept
# per thread and reused from module to module while they are this small: a fresh array of a few MB
# costs its page faults (~1 ms per 4 MB here), more than the products made on it (n = 8: ~0.15 s
# of a 3 s merge). Larger ones (many tasks) are allocated each time: their products dwarf the faults.
WORK_MAX_BYTES = 8 << 20
_work_arrays = threading.local()


def _work(name: str, shape: tuple, f64) -> torch.Tensor:
    """An uninitialised float64 array of `shape` on the merge device; on the CPU and up to
    WORK_MAX_BYTES, the calling thread's array `name`, reused (valid until the next _work(name))."""
    numel = math.prod(shape)
    if torch.device(f64["device"]).type != "cpu" or numel * 8 > WORK_MAX_BYTES:
        return torch.empty(shape, **f64)
    arrays = _work_arrays.__dict__.setdefault("arrays", {})
    buf = arrays.get(name)
    if buf is None or buf.numel() < numel:
        buf = arrays[name] = torch.empty(numel, dtype=torch.float64)
    return buf[:numel].view(shape)


def _chunks(ranks) -> list:
    """(first column, end column, [(task, its first column)]) of consecutive tasks, about
    CORE_CHUNK columns each (a task is never split)."""
    out: list = []
    tasks: list = []
    c0 = a = 0
    for t, r in enumerate(ranks):
        if tasks and a + r - c0 > CORE_CHUNK:
            out.append((c0, a, tasks))
            c0, tasks = a, []
        tasks.append((t, a))
        a += r
    if tasks:
        out.append((c0, a, tasks))
    return out


def _row_grams(As, ranks, f64) -> list:
    """A_i A_i^T in float64 for each task, batched over tasks of one rank."""
    grams: list = [None] * len(As)
    by_rank: dict = {}
    for i, r in enumerate(ranks):
        by_rank.setdefault(r, []).append(i)
    for idx in by_rank.values():
        shape = As[idx[0]].shape
        # tasks a batch: as many as a reusable work array holds (a fresh one costs its page faults)
        batch = max(1, WORK_MAX_BYTES // (8 * math.prod(shape)))
        for b0 in range(0, len(idx), batch):
            part = idx[b0 : b0 + batch]
            stack = torch.stack([As[i].to(f64["device"]) for i in part], out=_work("A_stack", (len(part), *shape), f64))
            for i, G in zip(part, stack @ stack.transpose(1, 2)):
                grams[i] = G
    return grams


def _cholesky_r(B: torch.Tensor):
    """(R, R^-1) with B^T B = R^T R (upper R) when the Cholesky of B's Gram succeeds and R is
    well conditioned (CHOLESKY_QR_MAX_COND); else (None, None)."""
    L, info = torch.linalg.cholesky_ex(_lower_gram(B))
    if int(info) != 0:
        return None, None
    R = L.T
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    R_inv = torch.linalg.solve_triangular(R, eye, upper=True)
    cond = float(torch.linalg.matrix_norm(R)) * float(torch.linalg.matrix_norm(R_inv))
    if not cond <= CHOLESKY_QR_MAX_COND:  # (also NaN)
        return None, None
    return R, R_inv


def _lower_gram(B: torch.Tensor) -> torch.Tensor:
    """B^T B's lower triangle (row block j0:j1 up to column j1; the rest zero), all that the
    Cholesky reads: ~55% of the full product's flops."""
    k = B.shape[1]
    G = torch.zeros(k, k, dtype=B.dtype, device=B.device)
    for j0 in range(0, k, GRAM_BLOCK):
        j1 = min(k, j0 + GRAM_BLOCK)
        torch.matmul(B[:, j0:j1].T, B[:, :j1], out=G[j0:j1, :j1])
    return G


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
