"""The merge methods (DESIGN.md §1), by name. A Method is a space, where each task's vectors live
(dense updates, KnOTS representations, Core Space cores), and a rule on the task rows there (TA
or TIES, optionally after DARE) run by the generic driver; or a rule on the LoRA factors
themselves (exact TA, Iso-C, TSV-M, RegMean). Each method file declares its methods and their
parameters in a module-level METHODS list; the registry below fills itself from those files,
so adding a method touches one file."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from .params import DARE_P, SEED, Param


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    params: tuple  # of Param: the keywords merge() accepts for this method
    space: Callable[[dict], Any] | None = None  # params -> Space; None: `rule` merges the factors
    rule: Any = "ta"  # "ta" or "ties" on task rows; with no space, a function (ModuleTasks, params) -> update
    dare: bool = False  # DARE on the task rows before the rule (needs dare_p)
    setup: Callable[[dict, list], dict] | None = None  # (params, adapters) -> params, e.g. loading Gram files

    @property
    def param_names(self) -> list:
        return [p.name for p in self.params]

    def check(self, given: dict) -> dict:
        """All of the method's parameters, validated: given values or the declared defaults. A
        parameter that another method declares is refused here unless it is left at its default
        (a top_k given to ta would silently do nothing); unknown names are refused."""
        mine = {p.name: p for p in self.params}
        out = {}
        for name, value in given.items():
            if name in mine:
                continue
            other = ALL_PARAMS.get(name)
            if other is None:
                raise ValueError(f"unknown parameter {name!r}; {self.name} takes {', '.join(mine) or 'none'}")
            if value != other.default:
                raise ValueError(f"{name} does not apply to {self.name} (it takes {', '.join(mine) or 'none'})")
        for name, p in mine.items():  # the values given first: their errors are the useful ones
            if name in given:
                out[name] = p.check(given[name])
        for name, p in mine.items():
            if name not in out:
                if p.default is None and not p.optional:
                    where = f" in {p.range_text()}" if p.kind in ("float", "int") else ""
                    raise ValueError(f"{self.name} needs {name}{where}")
                out[name] = p.default
        return {name: out[name] for name in mine}


def rows_method(name: str, help: str, space, rule: str, params: tuple, dare: bool = False) -> Method:
    """A method that runs TA or TIES on a space's task rows (with DARE first when dare)."""
    return Method(name, help, tuple(params) + ((DARE_P, SEED) if dare else ()), space=space, rule=rule, dare=dare)


def _discover() -> dict:
    methods: dict = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for m in getattr(module, "METHODS", ()):
            if m.name in methods:
                raise RuntimeError(f"method {m.name!r} is declared twice ({info.name})")
            methods[m.name] = m
    return methods


def _all_params(methods) -> dict:
    params: dict = {}
    for m in methods.values():
        for p in m.params:
            if params.setdefault(p.name, p) != p:
                raise RuntimeError(f"parameter {p.name!r} is declared differently by two methods")
    return params


METHODS = _discover()
ALL_PARAMS: dict = _all_params(METHODS)  # name -> Param, over every method (the CLI's flags)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["ALL_PARAMS", "METHODS", "Method", "Param", "get_method", "rows_method"]
