"""Declared parameters of the merge methods: each Param says its name, type, default, allowed
range and help; merge() validates keywords with it and the CLI builds its flags from it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import cast


@dataclass(frozen=True)
class Param:
    name: str
    default: object
    help: str
    kind: str = "float"  # "float", "int", "choice" or "paths"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    hint: str = ""  # appended to the refusal of a value out of range
    optional: bool = False  # None is allowed (and means "the method's own default")
    extra: dict = field(default_factory=dict, compare=False)  # CLI-only argparse settings (metavar, ...)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        lo = "(-inf" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
        return f"{lo}, {hi}"

    def check(self, value):
        """value, converted to the parameter's type, or a one-line ValueError naming the parameter."""
        if value is None and self.optional:
            return None
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
            return value
        if self.kind == "paths":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"{self.name} must be a list (one entry per adapter), got {type(value).__name__}")
            return list(value)
        integral = self.kind == "int"
        want = numbers.Integral if integral else numbers.Real
        if isinstance(value, bool) or not isinstance(value, want):
            raise ValueError(f"{self.name} must be {'an integer' if integral else 'a number'}, got {value!r}")
        if not integral and not math.isfinite(value):
            raise ValueError(f"{self.name} must be finite, got {value}" + (f" ({self.hint})" if self.hint else ""))
        if not self._in_range(value):
            raise ValueError(
                f"{self.name} must be in {self.range_text()}, got {value}" + (f" ({self.hint})" if self.hint else "")
            )
        return int(cast(numbers.Integral, value)) if integral else float(value)

    def _in_range(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None and (v >= self.high if self.high_open else v > self.high))


LAM = Param("lam", 1.0, "scale of the merged update")
TOP_K = Param(
    "top_k",
    1.0,
    "TIES: fraction of each task's entries kept, by magnitude",
    low=0.0,
    high=1.0,
    low_open=True,
    hint="top_k is a fraction: 20% is 0.2",
)
TOP_K_SCOPE = Param(
    "top_k_scope",
    "task",
    "TIES: trim threshold over all modules of a task, or per module",
    kind="choice",
    choices=("task", "module"),
)
DARE_P = Param(
    "dare_p", None, "DARE: drop probability of each entry (required)", low=0.0, high=1.0, low_open=True, high_open=True
)
SEED = Param("seed", 0, "DARE: mask seed", kind="int", low=0, high=2**64, high_open=True)
TOL = Param("tol", 1e-5, "drop singular values <= tol (KnOTS's basis, the numerical rank of Iso-C / Iso-CTS)", low=0.0)
