"""Task Arithmetic: dW = lam * sum_i dW_i. In factored form it is exact with no SVD:
B = [lam s_1 B_1 | ... | lam s_n B_n], A = [A_1; ...; A_n]. On task rows (KnOTS
representations, or dense rows with DARE) it is the fused weighted-sum kernel."""
from __future__ import annotations

import torch

from .. import ops
from .spaces import FactoredUpdate, ModuleTasks


def factored_ta(m: ModuleTasks, lam: float) -> FactoredUpdate:
    B = torch.cat([lam * s * B for (B, _), s in zip(m.factors, m.scales)], dim=1)
    A = torch.cat([A for _, A in m.factors], dim=0)
    return FactoredUpdate(B, A)


def ta_rows(rows, m: ModuleTasks, lam: float, dare_p: float, seed: int) -> torch.Tensor:
    return ops.task_arithmetic(rows, lam=lam, dare_p=dare_p, seed=seed, module=m.name, tasks=m.tasks)
