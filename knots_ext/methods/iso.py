"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces").

Iso-C: the Task Arithmetic sum with its spectrum flattened to the mean singular value,
lam * mean(S) * U V^T.
From the factors: the TA sum is [s_i B_i] @ [A_i] exactly, and its SVD comes from QR of those two
factors and a k x k core. The mean runs over the numerical rank (singular values > tol), not over
the zero singular values a rank-k update of a d x d matrix has. Iso-CTS: see iso_cts."""

from __future__ import annotations

import torch

from ..linalg import truncated_factors
from . import Method
from .params import LAM, TOL, Param
from .spaces import FactoredUpdate, ModuleTasks
from .ta import factored_ta
from .tsv import polar

# The authors' default (official code, config/method/iso_cts.yaml: common_space_fraction 0.8).
ISO_CTS_COMMON_FRACTION = 0.8


def iso_c(m: ModuleTasks, lam: float, tol: float) -> FactoredUpdate:
    U, S, Vt = _ta_svd(m, tol)
    if S.numel() == 0:
        return FactoredUpdate(U.float(), Vt.float())
    return FactoredUpdate((lam * S.mean() * U).float(), Vt.float())


def _ta_svd(m: ModuleTasks, tol: float):
    """U, S, V^T (float64) of the TA sum, singular values > tol only, from the factors."""
    ta = factored_ta(m, 1.0)
    US, Vt = truncated_factors(ta.B, ta.A, tol=tol)  # US = U diag(S), columns with S > tol
    S = US.norm(dim=0)
    return US / S, S, Vt


def iso_cts_split(R: int, n: int, common_fraction: float) -> tuple[int, int]:
    """(k, per_task): the common subspace size and each task's number of task-specific
    directions for a spectrum of R directions and n tasks, as the authors compute them (with R in
    place of min(d_out, d_in)): k = int(R * f), then the task-specific total R - k is rounded to a
    multiple of n (Python round) and k takes the rest. Clamped so that k >= 0."""
    k = int(R * float(common_fraction))
    ts_total = round((R - k) / n) * n
    if ts_total > R:  # only when f is near 0 and R / n rounds up
        ts_total = (R // n) * n
    return R - ts_total, ts_total // n


def iso_cts(m: ModuleTasks, lam: float, tol: float, common_fraction: float = ISO_CTS_COMMON_FRACTION) -> FactoredUpdate:
    """Iso-CTS for one module, from the LoRA factors:

    1. The TA sum sum_i s_i B_i A_i = U diag(S) V^T (from the factors, truncated_factors: QR of
       [s_i B_i] and [A_i]^T and an SVD of a (sum r_i)-sized core), keeping the R singular values > tol: R, the
       numerical rank (<= sum r_i), stands for min(d_out, d_in) of the paper.
    2. (k, per_task) = iso_cts_split(R, n, common_fraction); the common subspace is U_c = U[:, :k],
       S_c = S[:k], V_c = V[:, :k].
    3. Task i: its update projected off the common subspace, (I - U_c U_c^T) s_i B_i A_i, is the
       factored product P_i @ A_i with P_i = s_i B_i - U_c (U_c^T s_i B_i) (d_out x r_i); its SVD
       again from truncated_factors (r_i x r_i core); its top per_task directions U_i, S_i, V_i.
    4. U_all = [U_1 .. U_n, U_c], V_all likewise, S_all = [S_1 .. S_n, S_c]; U_all and V_all
       are replaced by their polar factors (nearest orthonormal columns: tsv.polar, QR + small
       SVD), the paper's orthogonalisation (U Vh of an SVD of the concatenation).
    5. merged = lam * mean(S_all) * polar(U_all) polar(V_all)^T (the isotropic spectrum), returned
       as factors (d_out x K, K x d_in), K = k + sum_i (directions kept for task i) <= R.

    Where this departs from the paper / the authors' code (which work on dense d x d matrices):
    - the "full rank" split by common_fraction is the TA sum's numerical rank R, not min(d_out,
      d_in): a sum of n rank-r_i LoRA updates has only R <= sum r_i non-zero singular values, and
      the paper's min(d) would put zero singular values into the mean and arbitrary null-space
      directions into the task-specific subspaces;
    - a task contributes only directions with singular value > tol, i.e. min(per_task,
      numerical rank of its projected update) of them (the dense code takes per_task columns even
      where they are null-space noise), so K can be < R and the mean runs over the kept ones;
    - as in the authors' code, the isotropic value is the mean of the combined spectrum S_all
      (common S_c and the task-specific S_i), not of the full TA spectrum; with common_fraction
      1.0 (per_task = 0) the two coincide and the result equals iso_c exactly (no polar step);
    - everything is in float64 from the factors (QR + SVDs of at most R x R / r_i x r_i cores);
      nothing d_out x d_in is formed. Tasks with zero scale or zero factors contribute nothing.
    lam is the paper's alpha (tuned on validation data there; given here)."""
    if not 0.0 <= float(common_fraction) <= 1.0:
        raise ValueError(f"iso-cts common_fraction must be in [0, 1], got {common_fraction}")
    U, S, Vt = _ta_svd(m, tol)
    R = S.numel()
    if R == 0:
        return FactoredUpdate(U.float(), Vt.float())
    k, per_task = iso_cts_split(R, len(m.factors), common_fraction)
    U_c, S_c, Vt_c = U[:, :k], S[:k], Vt[:k]
    Us, Ss, Vs = [], [], []
    if per_task > 0:
        for (B, A), s in zip(m.factors, m.scales):
            sB = float(s) * B.to(U.dtype)
            P = sB - U_c @ (U_c.T @ sB)
            US_i, Vt_i = truncated_factors(P, A, tol=tol)  # S_i > tol only, descending
            US_i, Vt_i = US_i[:, :per_task], Vt_i[:per_task]
            S_i = US_i.norm(dim=0)
            Us.append(US_i / S_i)
            Ss.append(S_i)
            Vs.append(Vt_i)
    if not Us or sum(u.shape[1] for u in Us) == 0:  # common subspace only: Iso-C on k directions
        U_p, Vt_p, S_all = U_c, Vt_c, S_c
    else:
        S_all = torch.cat([*Ss, S_c])
        U_p = polar(torch.cat([*Us, U_c], dim=1))
        Vt_p = polar(torch.cat([*Vs, Vt_c], dim=0).T).T
    return FactoredUpdate((lam * S_all.mean() * U_p).float(), Vt_p.float())


COMMON_FRACTION = Param(
    "common_fraction",
    None,
    f"iso-cts: share of the rank kept for the common subspace (default: the paper's {ISO_CTS_COMMON_FRACTION})",
    low=0.0,
    high=1.0,
    optional=True,
)


def _iso_cts_rule(m: ModuleTasks, p: dict) -> FactoredUpdate:
    fraction = ISO_CTS_COMMON_FRACTION if p["common_fraction"] is None else p["common_fraction"]
    return iso_cts(m, p["lam"], p["tol"], common_fraction=fraction)


METHODS = [
    Method(
        "iso-c",
        "Iso-C: the TA sum's spectrum flattened to its mean (from the factors)",
        (LAM, TOL),
        rule=lambda m, p: iso_c(m, p["lam"], p["tol"]),
    ),
    Method(
        "iso-cts",
        "Iso-CTS: a common subspace plus task-specific directions, isotropic spectrum",
        (LAM, TOL, COMMON_FRACTION),
        rule=_iso_cts_rule,
    ),
]
