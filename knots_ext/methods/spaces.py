"""Where a merge method's per-task vectors live, module by module. A space prepares a module's
state (prepare), gives each task's row as factors (row_factors: row_i = s_i P_i @ Q_i, an
m x c matrix never stored whole) and maps the merged m x c row back to the module's update
(update: a pure function of the merged row and the state). A space whose row_factors need only
the state sets rows_in_state = True: the driver then loads each module's factors once, not once
per pass. A space whose update() holds the merged row itself (as dW, or as the A factor) sets
rows_verbatim = True: a consumer may then patch entries of it after it was emitted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._arrays import has_zero


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


def drop_zero_updates(m: ModuleTasks, zero_entries: list | None = None) -> ModuleTasks:
    """m without the tasks whose update s_i B_i A_i is exactly zero (DESIGN.md §1: a zero update
    is an absent one; no votes, no count, no basis directions, no budget in any method). A rank
    component whose column of B_i or row of A_i is all zero contributes nothing either and is
    dropped, so an untrained LoRA (B_i = 0, A_i random) leaves no trace in any basis.
    zero_entries: per task, whether B_i or A_i has an entry equal to 0, where the loader saw it
    (else each is scanned here)."""
    tasks, factors, scales = [], [], []
    for j, (t, (B, A), s) in enumerate(zip(m.tasks, m.factors, m.scales)):
        if s == 0:
            continue
        zero = zero_entries[j] if zero_entries is not None else has_zero(B) or has_zero(A)
        if zero:  # (without a zero entry every component is live)
            live = (torch.count_nonzero(B, dim=0) > 0) & (torch.count_nonzero(A, dim=1) > 0)
            if not bool(live.any()):
                continue
            if not bool(live.all()):
                B, A = B[:, live], A[live]
        tasks.append(t)
        factors.append((B, A))
        scales.append(s)
    return ModuleTasks(m.name, tasks, factors, scales, m.shape)


def zero_update(m) -> FactoredUpdate:
    """The update of a module (anything with a .shape) that no task changes: rank 0."""
    d_out, d_in = m.shape
    return FactoredUpdate(torch.zeros(d_out, 0), torch.zeros(0, d_in))


class DenseSpace:
    """The plain task vectors: row i is s_i * B_i @ A_i (d_out x d_in), for TIES and DARE on dW."""

    name = "dense"
    rows_verbatim = True  # update(): the merged row is dW itself
    rows_per_task = True  # row i needs task i's factors only (no state): a subset of tasks may be loaded

    def __init__(self, params=None):
        pass

    def prepare(self, m: ModuleTasks):
        return None

    def row_factors(self, m: ModuleTasks, state) -> list:
        return [(B, A, s) for (B, A), s in zip(m.factors, m.scales)]

    def update(self, m, merged: torch.Tensor, state) -> DenseUpdate:
        return DenseUpdate(merged.reshape(m.shape))
