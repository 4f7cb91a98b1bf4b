"""Pieces shared by the reader and the writer: the error type, PEFT's key layout and PEFT's
rank_pattern / alpha_pattern matching rule."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable

import torch

# PeftModel.save_pretrained writes every key of a LoRA adapter under this prefix: the PeftModel
# holds a LoraModel as `base_model`, which holds the transformers model as `model`.
PEFT_PREFIX = "base_model.model."

# Suffixes of the two factors of a LoRA Linear layer, after PEFT removed the adapter name
# ("q_proj.lora_A.default.weight" is saved as "q_proj.lora_A.weight").
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

# safetensors dtype codes read (and the torch dtypes they load as). float64 is read too: it is
# lossless to convert and is what a float64 reference pipeline writes.
SUPPORTED_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
WRITABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_MESSAGE = "pickle adapters are not read; convert to safetensors"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class AdapterError(ValueError):
    """Bad adapter input or output. The message is one line: "<path>: <problem>".

    `AdapterError(path, problem)` builds that message; `.path` and `.problem` keep the parts.
    """

    def __init__(self, path, problem: str | None = None):
        if problem is None:
            self.path, self.problem = None, _one_line(path)
            super().__init__(self.problem)
        else:
            self.path, self.problem = os.fspath(path), _one_line(problem)
            super().__init__(f"{self.path}: {self.problem}")


def require_regular_file(path: str) -> None:
    """Refuses anything but a regular file (or a symlink to one): opening a FIFO or a device
    would block or read forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise AdapterError(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise AdapterError(path, "not a regular file (a directory, FIFO or device?)")


def read_json(path: str, what: str = "JSON"):
    """Parses a JSON file into Python values; every problem (not a regular file, unreadable, not
    UTF-8, invalid or too deeply nested JSON) is an AdapterError naming the file. The file is
    opened non-blocking and checked on the open descriptor, so a FIFO cannot make this hang."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise AdapterError(path, f"cannot read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AdapterError(path, "not a regular file (a directory, FIFO or device?)")
        try:
            raw = f.read()
        except OSError as e:
            raise AdapterError(path, f"cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AdapterError(path, f"invalid {what} (not UTF-8: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(path, f"invalid {what}: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise AdapterError(path, f"invalid {what}: nested too deeply") from None


def relative_name(module: str) -> str:
    """A module key of the file as the name PEFT matches patterns against: the module's name
    inside the base (transformers) model, i.e. without the "base_model.model." prefix."""
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def file_name(module: str) -> str:
    """A module name (relative to the base model, or already with the prefix) as a key of the file."""
    return module if module.startswith(PEFT_PREFIX) else PEFT_PREFIX + module


def pattern_key(pattern_keys: Iterable[str], name: str) -> str:
    """PEFT's `get_pattern_key` rule (peft.utils.other): the first key of the pattern dict, in its
    order, for which `re.match(rf"(.*\\.)?({key})$", name)` succeeds -- the key is a regular
    expression that must match a dot-separated suffix of the name; `name` itself when none does.
    `name` is the module's name inside the base model (see relative_name)."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def lookup_pattern(patterns: dict, name: str, default):
    """The value PEFT takes for module `name`: `patterns.get(get_pattern_key(...), default)`."""
    if not patterns:
        return default
    return patterns.get(pattern_key(patterns.keys(), name), default)


# ------------------------------------------------------------------ safe pattern keys

# rank_pattern / alpha_pattern keys come from the adapter's config and are matched with Python's
# backtracking regex engine, where a key like "(a+)+$" takes exponential time on a name like
# "a" * 40 + "b". Keys are therefore held to a subset whose matching time is polynomial and small:
# no quantifier or alternation inside a quantified part, no backreference, at most
# MAX_PATTERN_CHOICES quantifiers and alternations in all, and at most MAX_PATTERN_KEY characters.
MAX_PATTERN_KEY = 1000
MAX_PATTERN_CHOICES = 2

try:
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python < 3.11
    import sre_constants as _sre
    import sre_parse as _sre_parse

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_BACKREFS = {_sre.GROUPREF, _sre.GROUPREF_EXISTS, getattr(_sre, "GROUPREF_IGNORE", _sre.GROUPREF)}


class _SlowPattern(Exception):
    pass


def _choices(items, quantified: bool) -> int:
    """Counts the quantifiers (max > 1) and alternations of a parsed regex; raises _SlowPattern
    where one sits inside a quantified part (the exponential case) or at a backreference."""
    count = 0
    for op, av in items:
        if op in _REPEATS:
            _, hi, sub = av
            if hi > 1 and quantified:
                raise _SlowPattern("a quantifier inside a quantified group")
            count += (hi > 1) + _choices(sub, quantified or hi > 1)
        elif op is _sre.BRANCH:
            if quantified:
                raise _SlowPattern("an alternation inside a quantified group")
            count += 1 + sum(_choices(branch, quantified) for branch in av[1])
        elif op is _sre.SUBPATTERN:
            count += _choices(av[-1], quantified)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            count += _choices(av[1], quantified)
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            count += _choices(av, quantified)
        elif op in _BACKREFS:
            raise _SlowPattern("a backreference")
    return count


def pattern_key_problem(key) -> str | None:
    """Why a rank_pattern / alpha_pattern key is refused, or None when it is fine: not a string,
    not a valid regular expression in PEFT's rule, or possibly slow to match (see above)."""
    if not isinstance(key, str):
        return "is not a string"
    if len(key) > MAX_PATTERN_KEY:
        return f"is longer than {MAX_PATTERN_KEY} characters"
    try:
        re.compile(rf"(.*\.)?({key})$")
        parsed = _sre_parse.parse(key)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    try:
        n = _choices(parsed, False)
    except _SlowPattern as e:
        return f"has {e} (slow to match; write the module names out)"
    if n > MAX_PATTERN_CHOICES:
        return (
            f"has {n} quantifiers and alternations, more than {MAX_PATTERN_CHOICES} (slow to match; "
            "write the module names out)"
        )
    return None
