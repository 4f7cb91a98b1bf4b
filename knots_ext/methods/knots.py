"""KnOTS (Stoica et al., ICLR 2025): per module, the SVD of the concatenated updates
[dW_1 | .. | dW_n] = U diag(S) [V_1^T | .. | V_n^T] (from the factors: knots_ext.linalg.knots_svd);
task i is represented by diag(S) V_i^T = coef_i @ A_i (k x d_in), TA / TIES / DARE merge those
representations, and the merged update is U @ merged. knots-ta equals ta exactly."""

from __future__ import annotations

import torch

from ..linalg import knots_svd
from . import rows_method
from .params import LAM, TOL, TOP_K, TOP_K_SCOPE
from .spaces import FactoredUpdate, ModuleTasks


class KnotsSpace:
    """Task i's row is diag(S) V_i^T = coef_i @ A_i (k x d_in); the merged row M maps back as
    U @ M. The SVD is computed once per module (prepare); the state keeps the A_i, so the passes
    after it need nothing else of the module (rows_in_state)."""

    name = "knots"
    rows_in_state = True
    rows_verbatim = True  # update(): U @ merged, merged itself the output's A

    def __init__(self, params):
        self.tol = params["tol"]

    def prepare(self, m: ModuleTasks):
        # The rows go to float32 kernels: coef_i in float32 (inner dimension r_i) costs nothing
        # in accuracy; U is the output's float32 B.
        As = [A for _, A in m.factors]
        f32 = torch.float32
        svd = knots_svd([B for B, _ in m.factors], As, m.scales, tol=self.tol, coef_dtype=f32, u_dtype=f32)
        return svd.U, svd.coef, As

    def row_factors(self, m: ModuleTasks, state) -> list:
        return [(c, A, 1.0) for c, A in zip(state[1], state[2])]

    def update(self, m, merged: torch.Tensor, state) -> FactoredUpdate:
        U = state[0]
        return FactoredUpdate(U, merged.reshape(U.shape[1], m.shape[1]))


_TIES = (TOP_K, TOP_K_SCOPE, LAM, TOL)
METHODS = [
    rows_method("knots-ta", "Task Arithmetic on the KnOTS representations (equals ta)", KnotsSpace, "ta", (LAM, TOL)),
    rows_method("knots-ties", "TIES on the KnOTS representations", KnotsSpace, "ties", _TIES),
    rows_method("knots-dare-ta", "DARE then TA on the KnOTS representations", KnotsSpace, "ta", (LAM, TOL), dare=True),
    rows_method("knots-dare-ties", "DARE then TIES on the KnOTS representations", KnotsSpace, "ties", _TIES, dare=True),
]
