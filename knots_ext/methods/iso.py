"""Iso-C (Marczak et al., 2025, "No task left behind: isotropic model merging"): the Task
Arithmetic sum with its spectrum flattened to the mean singular value, lam * mean(S) * U V^T.
From the factors: the TA sum is [s_i B_i] @ [A_i] exactly, and its SVD comes from QR of those two
factors and a k x k core. The mean runs over the numerical rank (singular values > tol), not over
the zero singular values a rank-k update of a d x d matrix has."""
from __future__ import annotations

from ..linalg import truncated_factors
from .spaces import FactoredUpdate, ModuleTasks
from .ta import factored_ta


def iso_c(m: ModuleTasks, lam: float, tol: float) -> FactoredUpdate:
    ta = factored_ta(m, 1.0)
    US, Vt = truncated_factors(ta.B, ta.A, tol=tol)  # US = U diag(S), columns with S > tol
    if US.shape[1] == 0:
        return FactoredUpdate(US.float(), Vt.float())
    S = US.norm(dim=0)
    U = US / S
    return FactoredUpdate((lam * S.mean() * U).float(), Vt.float())
