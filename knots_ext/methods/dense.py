"""TIES and DARE on the dense task vectors dW_i = s_i B_i A_i (the classic baselines, DESIGN.md
§1): trim, elect and disjoint mean (Yadav et al. 2023), DARE's random drop and rescale first."""

from __future__ import annotations

from . import rows_method
from .params import LAM, TOP_K, TOP_K_SCOPE
from .spaces import DenseSpace

METHODS = [
    rows_method("ties", "TIES on the dense updates", DenseSpace, "ties", (TOP_K, TOP_K_SCOPE, LAM)),
    rows_method("dare-ta", "DARE then Task Arithmetic on the dense updates", DenseSpace, "ta", (LAM,), dare=True),
    rows_method(
        "dare-ties", "DARE then TIES on the dense updates", DenseSpace, "ties", (TOP_K, TOP_K_SCOPE, LAM), dare=True
    ),
]
