"""Adapter weights and per-module weights (mergekit's per-model weights and filters, sd-scripts'
block weights): adapter i's update of module M is scaled by weights[i] times the value of the
first module_weights rule whose regular expression matches M, before any method runs -- exactly
as if adapter i's lora_alpha for M were multiplied by it. Negative weights negate a task; a zero
weight makes a zero update, which every method treats as an absent one."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .io._common import pattern_key_problem, relative_name


def finite_number(value) -> float:
    """value as a float if it is a finite real number (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def _weight(value, what: str) -> float:
    try:
        return finite_number(value)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None


def parse_module_weight(text: str) -> tuple[str, float]:
    """A command-line rule "REGEX=W" as (regex, w); the last "=" separates them, so the regex may hold one."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError(f"module weight {text!r} is not REGEX=WEIGHT (e.g. 'layers\\.[0-9]\\.=0.5')")
    try:
        return pattern, _weight(float(value), f"module weight {text!r}: the weight")
    except ValueError:
        raise ValueError(f"module weight {text!r}: {value!r} is not a finite number") from None


@dataclass(frozen=True)
class ModuleWeights:
    """Ordered (regex, weight) rules: a module takes the weight of the first rule whose regex
    matches (re.search) its name inside the base model (without PEFT's "base_model.model."), 1.0
    when none does."""

    rules: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, spec) -> ModuleWeights:
        """From None, a {regex: weight} dict (in its order), (regex, weight) pairs or "REGEX=W" strings."""
        if spec is None:
            return cls()
        if isinstance(spec, ModuleWeights):
            return spec
        if isinstance(spec, (str, bytes)):
            raise ValueError("module_weights must be a list of rules or a dict, got one string: wrap it in a list")
        items = spec.items() if isinstance(spec, Mapping) else spec
        rules = []
        for item in items:
            if isinstance(item, str):
                pattern, w = parse_module_weight(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                pattern, w = item
            else:
                raise ValueError(f"module weight {item!r} is not a (regex, weight) pair or a 'REGEX=WEIGHT' string")
            problem = pattern_key_problem(pattern)
            if problem is not None:
                raise ValueError(f"module weight pattern {pattern!r} {problem}")
            rules.append((pattern, _weight(w, f"module weight {pattern!r}")))
        return cls(tuple(rules))

    def of(self, module: str) -> float:
        name = relative_name(module)
        for pattern, w in self.rules:
            if re.search(pattern, name):
                return w
        return 1.0


@dataclass(frozen=True)
class TaskWeights:
    """The factor each adapter's update of each module is scaled by: adapter weight x module weight."""

    adapters: tuple[float, ...] | None = None  # None: all 1
    modules: ModuleWeights = ModuleWeights()

    @classmethod
    def of(cls, weights, n_adapters: int, modules: ModuleWeights | None = None) -> TaskWeights:
        modules = modules or ModuleWeights()
        if weights is None:
            return cls(None, modules)
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise ValueError(f"weights must be a list of numbers, one per adapter, got {weights!r}")
        values = tuple(_weight(w, f"weights[{i}]") for i, w in enumerate(weights))
        if len(values) != n_adapters:
            raise ValueError(f"weights has {len(values)} values for {n_adapters} adapters: give one per adapter")
        return cls(values, modules)

    def scales(self, tasks, module: str) -> list[float]:
        """The factor of each of `tasks` (adapter indices) in `module`; its rules matched once."""
        per_adapter = [1.0] * len(tasks) if self.adapters is None else [self.adapters[t] for t in tasks]
        if not self.modules.rules:
            return per_adapter
        m = self.modules.of(module)
        return [w * m for w in per_adapter]

    @property
    def is_identity(self) -> bool:
        return self.adapters is None and not self.modules.rules
