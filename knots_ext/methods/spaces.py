"""Where a merge method's per-task vectors live, module by module. A space turns one module of
the n adapters into task rows (one flat float32 vector per task that has the module) and
turns the merged row back into the module's update."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg import DEFAULT_TOL, knots_svd


@dataclass
class FactoredUpdate:
    """dW = B @ A (B: d_out x k, A: k x d_in), float32."""

    B: torch.Tensor
    A: torch.Tensor

    def dense(self) -> torch.Tensor:
        return (self.B.double() @ self.A.double()).float()


@dataclass
class DenseUpdate:
    """dW itself (d_out x d_in), float32."""

    W: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.W


@dataclass
class ModuleTasks:
    """One module as the adapters that have it see it."""

    name: str
    tasks: list  # indices into the merge's adapter list
    factors: list  # (B_i, A_i) per task, float32, on the merge device
    scales: list
    shape: tuple


def drop_zero_updates(m: ModuleTasks) -> ModuleTasks:
    """m without the tasks whose update s_i B_i A_i is exactly zero (DESIGN.md §1: a zero update
    is an absent one; no votes, no count, no basis directions, no budget in any method). A rank
    component whose column of B_i or row of A_i is all zero contributes nothing either and is
    dropped, so an untrained LoRA (B_i = 0, A_i random) leaves no trace in any basis."""
    tasks, factors, scales = [], [], []
    for t, (B, A), s in zip(m.tasks, m.factors, m.scales):
        live = (B != 0).any(dim=0) & (A != 0).any(dim=1)
        if s == 0 or not bool(live.any()):
            continue
        if not bool(live.all()):
            B, A = B[:, live], A[live]
        tasks.append(t), factors.append((B, A)), scales.append(s)
    return ModuleTasks(m.name, tasks, factors, scales, m.shape)


def zero_update(m) -> "FactoredUpdate":
    """The update of a module (anything with a .shape) that no task changes: rank 0."""
    d_out, d_in = m.shape
    return FactoredUpdate(torch.zeros(d_out, 0), torch.zeros(0, d_in))


class DenseSpace:
    """The plain task vectors: row i is the flattened s_i * B_i @ A_i (for TIES, DARE on dW)."""

    name = "dense"

    def prepare(self, m: ModuleTasks):
        return None

    def rows(self, m: ModuleTasks, state) -> list:
        return [(s * (B @ A)).reshape(-1) for (B, A), s in zip(m.factors, m.scales)]

    def update(self, m, merged_row: torch.Tensor, state) -> DenseUpdate:
        return DenseUpdate(merged_row.reshape(m.shape))


class KnotsSpace:
    """KnOTS: row i is task i's representation diag(S) V_i^T (k x d_in, flattened) in the SVD of
    the module's concatenated updates; the merged row M maps back as U @ M. The SVD is computed
    once per module (prepare); the rows are rebuilt from A_i on every pass (coef_i @ A_i)."""

    name = "knots"

    def __init__(self, tol: float = DEFAULT_TOL):
        self.tol = tol

    def prepare(self, m: ModuleTasks):
        svd = knots_svd([B for B, _ in m.factors], [A for _, A in m.factors], m.scales, tol=self.tol)
        # The rows go to float32 kernels: building them in float32 (inner dimension r_i) costs
        # nothing in accuracy and half the time.
        return svd.U.to(torch.float32), [c.to(torch.float32) for c in svd.coef]

    def rows(self, m: ModuleTasks, state) -> list:
        _, coef = state
        return [(c @ A.to(torch.float32)).reshape(-1) for c, (_, A) in zip(coef, m.factors)]

    def update(self, m, merged_row: torch.Tensor, state) -> FactoredUpdate:
        U = state[0]
        return FactoredUpdate(U, merged_row.reshape(U.shape[1], m.shape[1]))
