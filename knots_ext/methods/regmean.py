"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models"): per linear module y = W x, the W minimising sum_i ||X_i W^T - X_i W_i^T||^2 is
W* = (sum_i W_i G_i)(sum_i G_i)^-1 with G_i = X_i^T X_i; RegMean shrinks each Gram's
off-diagonal part, G~_i = alpha G_i + (1 - alpha) diag(G_i). On LoRA updates of one base weight
(the base cancels: sum_i W0 G~_i (sum G~)^-1 = W0) this is exact in factored form:
dW* = [s_1 B_1 .. s_n B_n] @ ([A_1 G~_1; ..; A_n G~_n] (sum G~)^-1), rank <= k = sum r_i,
never forming a d_out x d_in matrix. Cost O(n d_in^2 r + d_in^3) per module, in float64."""

from __future__ import annotations

import torch

from .._arrays import all_finite
from . import Method
from .params import LAM, Param
from .spaces import FactoredUpdate, ModuleTasks

# Relative residual ||S Y - R|| / ||R|| above which the solve is taken as failed (S singular).
RESIDUAL_TOL = 1e-6


def shrink(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(diag(G))."""
    if alpha == 1.0:
        return G
    return alpha * G + (1.0 - alpha) * torch.diag(torch.diagonal(G))


def solve_sym(S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Y with S Y = R for a symmetric positive semi-definite S (float64), by LU
    (torch.linalg.solve). When S is singular -- an input feature that is always zero, or
    alpha = 1 with fewer input vectors than d_in -- the solve fails (non-zero info, non-finite
    values, or a relative residual above RESIDUAL_TOL) and the minimum-norm solution
    pinv(S) R is returned instead (torch.linalg.pinv, hermitian, default rtol). RegMean's system
    is consistent (each A_i G~_i lies in the row space of sum G~), so that solution is still an
    exact minimiser; in the null space of S (input directions no task ever saw) the merged
    update is zero."""
    Y, info = torch.linalg.solve_ex(S, R)
    if int(info) == 0 and all_finite(Y):
        rnorm = torch.linalg.norm(R)
        if float(torch.linalg.norm(S @ Y - R)) <= RESIDUAL_TOL * float(rnorm):
            return Y
    return torch.linalg.pinv(S, hermitian=True) @ R


def regmean(m: ModuleTasks, grams: list, alpha: float = 0.9, lam: float = 1.0) -> FactoredUpdate:
    """RegMean of module m's LoRA updates. grams[j] is the (float64) input Gram, d_in x d_in, of
    task m.tasks[j]; alpha scales the off-diagonal part of each Gram (1: plain RegMean, 0: a
    per-input-feature weighted average); lam multiplies the result. Returns float32 factors
    B = lam * [s_j B_j] (d_out x k) and A = [A_j G~_j] (sum G~)^-1 (k x d_in)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean: alpha must lie in [0, 1], got {alpha}")
    if len(grams) != len(m.factors):
        raise ValueError(f"{m.name}: {len(grams)} Grams for {len(m.factors)} tasks")
    d_in = m.shape[1]
    device = m.factors[0][1].device
    S = torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
    rows = []
    for (_, A), G in zip(m.factors, grams):
        if tuple(G.shape) != (d_in, d_in):
            raise ValueError(f"{m.name}: Gram is {list(G.shape)}, expected {d_in} x {d_in}")
        Gt = shrink(G.to(device=device, dtype=torch.float64), alpha)
        S += Gt
        rows.append(A.to(torch.float64) @ Gt)
    R = torch.cat(rows, dim=0)  # k x d_in
    # A* = R S^-1, i.e. S A*^T = R^T (S symmetric).
    A_out = solve_sym(S, R.T).T
    B_out = torch.cat([s * B.to(torch.float64) for (B, _), s in zip(m.factors, m.scales)], dim=1)
    return FactoredUpdate((lam * B_out).float(), A_out.float())


def module_grams(gram_files: list, m: ModuleTasks) -> list:
    """The Grams regmean needs for module m: gram_files[t] (a grams.Grams, one per adapter of the
    merge) for each task t of m, checked against the module's input size."""
    return [gram_files[t].get(m.name, m.shape[1]) for t in m.tasks]


GRAMS = Param(
    "grams",
    None,
    "regmean: one Gram file (knots_ext.grams.save_grams) per adapter, in the same order",
    kind="paths",
    extra={"nargs": "+"},
)
REGMEAN_ALPHA = Param("regmean_alpha", 0.9, "regmean: scale of the Grams' off-diagonals", low=0.0, high=1.0)


def _load_grams(params: dict, adapters: list) -> dict:
    """The Gram files opened (headers only), one per adapter."""
    from ..grams import Grams, load_grams

    grams = params["grams"]
    if len(grams) != len(adapters):
        raise ValueError(
            f"regmean needs one Gram file per adapter (--grams): got {len(grams)} for {len(adapters)} adapters"
        )
    return dict(params, grams=[g if isinstance(g, Grams) else load_grams(g) for g in grams])


METHODS = [
    Method(
        "regmean",
        "RegMean: the least-squares merge with each task's input Grams (exact in factored form)",
        (LAM, GRAMS, REGMEAN_ALPHA),
        setup=_load_grams,
        rule=lambda m, p: regmean(m, module_grams(p["grams"], m), p["regmean_alpha"], p["lam"]),
    ),
]
