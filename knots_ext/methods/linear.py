"""Linear merging (mergekit's `linear` with equal weights, model soups): the mean of the task
updates, lam * (1/n) sum_i dW_i, exact on the LoRA factors. n counts the adapters whose update
of the module is non-zero (a zero update is an absent one), so a module only some adapters
have is their mean. This file is all a method needs: its parameters and its rule."""

from __future__ import annotations

from . import Method
from .params import LAM
from .ta import factored_ta

METHODS = [
    Method(
        "linear",
        "the mean of the task updates, exact on the LoRA factors",
        (LAM,),
        rule=lambda m, p: factored_ta(m, p["lam"] / len(m.tasks)),
    ),
]
