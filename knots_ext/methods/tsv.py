"""TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors"): per task, the top singular
directions of dW_i (at most min(d_out, d_in) / n of them, so that the concatenation fits);
concatenate U = [U_1 .. U_n], V = [V_1 .. V_n] and S; replace U and V by their nearest
matrices with orthonormal columns (polar factors), which removes the interference between the
tasks' subspaces; merged = lam * U_perp diag(S) V_perp^T. Everything from the factors: each dW_i
has rank r_i, its SVD comes from QR of s_i B_i and A_i^T, and the polar factors of the thin
d x K concatenations from a QR and a K x K SVD."""

from __future__ import annotations

import torch

from ..linalg import truncated_factors
from . import Method
from .params import LAM
from .spaces import FactoredUpdate, ModuleTasks


def polar(M: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns nearest to a thin M (d x K, K <= d): P W^T from
    M = P diag(s) W^T, through M = Q R and an SVD of R."""
    Q, R = torch.linalg.qr(M)
    P, _, Wt = torch.linalg.svd(R)
    return Q @ (P @ Wt)


def tsv_m(m: ModuleTasks, lam: float) -> FactoredUpdate:
    d_out, d_in = m.shape
    per_task = max(1, min(d_out, d_in) // len(m.factors))
    Us, Ss, Vs = [], [], []
    for (B, A), s in zip(m.factors, m.scales):
        keep = min(B.shape[1], per_task)
        US, Vt = truncated_factors(s * B, A, rank=keep)  # US = U diag(S)
        S = US.norm(dim=0)
        Us.append(US / torch.where(S > 0, S, torch.ones_like(S)))
        Ss.append(S)
        Vs.append(Vt.T)
    U_perp, V_perp = polar(torch.cat(Us, dim=1)), polar(torch.cat(Vs, dim=1))
    return FactoredUpdate((lam * U_perp * torch.cat(Ss)).float(), V_perp.T.float())


METHODS = [
    Method(
        "tsv-m",
        "TSV-M: each task's top singular directions, orthogonalised (from the factors)",
        (LAM,),
        rule=lambda m, p: tsv_m(m, p["lam"]),
    ),
]
