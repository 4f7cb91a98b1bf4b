"""Pieces shared by the reader and the writer: the error type, PEFT's key layout and PEFT's
rank_pattern / alpha_pattern matching rule."""
from __future__ import annotations

import os
import re
from typing import Iterable

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


def relative_name(module: str) -> str:
    """A module key of the file as the name PEFT matches patterns against: the module's name
    inside the base (transformers) model, i.e. without the "base_model.model." prefix."""
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


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
