"""The merge methods (DESIGN.md §1), by name: each is a space (where the task vectors live:
dense updates, KnOTS representations, Core Space cores, or LoRA factors) and a merge rule on it
(TA or TIES), optionally after DARE."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    space: str  # "factors" (exact TA on LoRA factors), "dense", "knots" or "core"
    rule: str  # "ta" or "ties"; on factors also "iso-c", "iso-cts", "tsv-m", "regmean"
    dare: bool  # DARE before the rule (needs dare_p > 0)


METHODS = {m.name: m for m in [
    Method("ta", "factors", "ta", False),
    Method("ties", "dense", "ties", False),
    Method("dare-ta", "dense", "ta", True),
    Method("dare-ties", "dense", "ties", True),
    Method("knots-ta", "knots", "ta", False),
    Method("knots-ties", "knots", "ties", False),
    Method("knots-dare-ta", "knots", "ta", True),
    Method("knots-dare-ties", "knots", "ties", True),
    Method("iso-c", "factors", "iso-c", False),
    Method("iso-cts", "factors", "iso-cts", False),
    Method("tsv-m", "factors", "tsv-m", False),
    Method("regmean", "factors", "regmean", False),
    Method("core-ta", "core", "ta", False),
    Method("core-ties", "core", "ties", False),
    Method("core-dare-ta", "core", "ta", True),
    Method("core-dare-ties", "core", "ties", True),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
