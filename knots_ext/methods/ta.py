"""Task Arithmetic: dW = lam * sum_i dW_i. In factored form it is exact with no SVD:
B = [lam s_1 B_1 | ... | lam s_n B_n], A = [A_1; ...; A_n]."""

from __future__ import annotations

import torch

from . import Method
from .params import LAM
from .spaces import FactoredUpdate, ModuleTasks


def factored_ta(m: ModuleTasks, lam: float) -> FactoredUpdate:
    B = torch.cat([lam * s * B for (B, _), s in zip(m.factors, m.scales)], dim=1)
    A = torch.cat([A for _, A in m.factors], dim=0)
    return FactoredUpdate(B, A)


METHODS = [
    Method(
        "ta",
        "Task Arithmetic, exact on the LoRA factors (rank sum r_i, no SVD)",
        (LAM,),
        rule=lambda m, p: factored_ta(m, p["lam"]),
    ),
]
