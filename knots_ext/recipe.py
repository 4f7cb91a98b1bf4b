"""Merge recipes: what to merge and how, in one YAML or JSON file (`knots-merge --config FILE`),
and the provenance every merged output carries -- the same recipe with each adapter's file
hashes, the knots_ext version and the date -- as `recipe.yaml` (loadable by --config as it is),
as JSON in the safetensors metadata (key "knots_ext.recipe") and as a short README.md model card.

A recipe is a mapping with these keys (all optional but adapters, method from the CLI's default):

    adapters:      [path or hub name, ...], or entries {path: ..., sha256: {file: hex}, hub: org/name@commit}
    method:        knots-ties                     params: {top_k: 0.2, lam: 1.0, ...}
    weights:       [1.0, 0.5, ...]                module_weights: [[regex, weight], ...]
    output:        folder                         rank / rank_energy / dtype / format / alpha / extra / force / device

Relative paths are relative to the recipe file's folder. knots_ext_version and date are
provenance, read and ignored. Hashes that differ from the adapters' files now are reported
(Recipe.hash_warnings) and the merge goes on with the files as they are: the new output's
recipe then records the new hashes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import numbers
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import hub
from .io import AdapterError
from .io._common import read_json, require_regular_file
from .io._output import CARD_NAME, RECIPE_NAME
from .io.adapter import CONFIG_NAME
from .methods import ALL_PARAMS, METHODS
from .weights import ModuleWeights, finite_number

METADATA_KEY = "knots_ext.recipe"  # the safetensors metadata key holding the recipe as JSON
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
PROVENANCE_KEYS = ("knots_ext_version", "date")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ------------------------------------------------------------------------------ file hashes

_hash_cache: dict = {}  # (real path, inode, size, mtime) -> hex digest: a file is hashed once per change


def sha256_file(path) -> str:
    """The sha256 of a regular file, in hex (cached while the file's size and mtime stay)."""
    require_regular_file(os.fspath(path))
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def hash_side_by_side(files, threads: int = 8) -> None:
    """Hashes files into sha256_file's cache a few at a time (file reads and hashlib release the
    GIL): 64 adapters' 1.7 GB took 2.2 s one after another on 2 cores. A file that cannot be
    hashed is left for sha256_file to report when it is asked for it."""

    def attempt(path):
        with contextlib.suppress(OSError, ValueError, AdapterError):
            sha256_file(path)

    files = list(files)
    if len(files) > 1:
        with ThreadPoolExecutor(min(threads, len(files), os.cpu_count() or 1)) as pool:
            list(pool.map(attempt, files))


def sources(adapters) -> list:
    """(absolute path, [files to hash]) of each loaded adapter: its weights file and, for a folder,
    its config; (its name, []) for an adapter held in memory. Nothing is read here."""
    out: list = []
    for a in adapters:
        path = getattr(a, "path", None)
        if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):  # held in memory: a name
            out.append((str(path), []))
            continue
        path = os.path.abspath(os.fspath(path))
        files = [getattr(a, "weights_path", None)]
        if os.path.isdir(path):
            files.append(os.path.join(path, CONFIG_NAME))
        out.append((path, [os.fspath(f) for f in files if isinstance(f, (str, os.PathLike)) and os.path.isfile(f)]))
    return out


# ------------------------------------------------------------------------------ writing


def describe(adapter_sources, method: str, params: Mapping, settings: Mapping, extra_keys: Mapping) -> dict:
    """The recipe of a merge: the adapters (sources(): their absolute paths, the sha256 of their
    files, read now, and for a Hub cache snapshot its repo and commit), the method, its validated
    params, `extra_keys` (weights, module_weights) and the other merge_to settings (dtype by
    name). with_output adds the output folder."""
    from . import __version__

    hash_side_by_side(f for _, files in adapter_sources for f in files)
    entries = []
    for path, files in adapter_sources:
        entry: dict = {"path": path}
        source = hub.hub_source(path)
        if source is not None:
            entry["hub"] = source
        if files:
            entry["sha256"] = {os.path.basename(f): sha256_file(f) for f in files}
        entries.append(entry)
    recipe: dict = {
        "knots_ext_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "params": {name: _plain_param(name, value) for name, value in params.items()},
        "adapters": entries,
    }
    recipe.update(extra_keys)
    for key, value in settings.items():
        recipe[key] = _dtype_name(value) if isinstance(value, torch.dtype) else value
    return recipe


def _plain_param(name: str, value):
    """A parameter value as plain YAML/JSON: file lists (RegMean's Grams) as absolute paths."""
    p = ALL_PARAMS.get(name)
    if p is not None and p.kind == "paths" and value is not None:
        return [os.path.abspath(os.fspath(v)) if isinstance(v, (str, os.PathLike)) else str(v) for v in value]
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


def with_output(recipe: Mapping, out_dir) -> dict:
    """The recipe of an output written to out_dir (its absolute path under "output")."""
    return {**recipe, "output": os.path.abspath(os.fspath(out_dir))}


def output_parts(recipe: Mapping) -> tuple[dict, dict]:
    """What an output carries of its recipe: (safetensors metadata, {file name: text}) with the
    recipe as JSON in the metadata, recipe.yaml and the README.md model card."""
    metadata = {METADATA_KEY: json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)}
    return metadata, {RECIPE_NAME: recipe_yaml(recipe), CARD_NAME: model_card(recipe)}


def recipe_yaml(recipe: Mapping) -> str:
    import yaml

    head = (
        "# knots-merge recipe: what was merged and how. Reproduce the merge with\n"
        f"#   knots-merge --config {RECIPE_NAME} -o NEW_FOLDER\n"
        "# (command-line flags override these values; relative paths are relative to this file)\n"
    )
    return head + yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False, allow_unicode=True)


def model_card(recipe: Mapping) -> str:
    """A short README.md: what was merged, how, and the command that reproduces it."""
    adapters = recipe.get("adapters") or []
    weights = recipe.get("weights")
    params = recipe.get("params") or {}
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, merge, knots-ext]",
        "---",
        "",
        "# Merged LoRA adapter",
        "",
        f"{len(adapters)} LoRA adapters merged with `{recipe.get('method')}` by knots-ext "
        f"{recipe.get('knots_ext_version')} on {recipe.get('date')}.",
        "",
        "| # | adapter | weight | sha256 of the weights file |",
        "|---|---|---|---|",
    ]
    for i, entry in enumerate(adapters):
        name = entry.get("hub") or entry.get("path")
        digests = entry.get("sha256") or {}
        digest = next((v for k, v in digests.items() if k != CONFIG_NAME), "")
        w = 1.0 if weights is None else weights[i]
        lines.append(f"| {i} | `{name}` | {w:g} | `{digest[:16]}` |")
    settings = ", ".join(f"{k} = {v}" for k, v in params.items()) or "none"
    rank = recipe.get("rank")
    lines += [
        "",
        f"Method parameters: {settings}.",
        f"Output rank: {'lossless' if rank is None else rank}; dtype {recipe.get('dtype', 'float32')}.",
    ]
    if recipe.get("module_weights"):
        rules = "; ".join(f"`{p}` = {w:g}" for p, w in recipe["module_weights"])
        lines.append(f"Module weights (first match wins): {rules}.")
    lines += [
        "",
        "## Reproduce",
        "",
        f"`{RECIPE_NAME}` in this folder is the full recipe, with every input's sha256:",
        "",
        "```",
        f"knots-merge --config {RECIPE_NAME} -o merged-again",
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ reading


@dataclass
class Recipe:
    """A recipe file, checked: `values` holds its keys (paths absolute, adapters resolved)."""

    path: str
    values: dict
    expected_hashes: list = field(default_factory=list)  # per adapter: {file name: sha256} or {}

    def hash_warnings(self) -> list:
        """One line per adapter file whose sha256 is not the recipe's any more."""
        out = []
        for i, (path, expected) in enumerate(zip(self.values["adapters"], self.expected_hashes)):
            for name, digest in sorted(expected.items()):
                file = os.path.join(path, name) if os.path.isdir(path) else path
                try:
                    now = sha256_file(file) if os.path.basename(file) == name else None
                except (OSError, AdapterError):
                    now = None
                if now != digest:
                    out.append(
                        f"{self.path}: adapters[{i}]: {file} differs from the recipe's sha256 "
                        "(changed since the recipe was written); merging it as it is now"
                    )
        return out

    def merge_kwargs(self) -> dict:
        """The keyword arguments of knots_ext.merge_to that run this recipe."""
        kwargs = {k: v for k, v in self.values.items() if k not in ("params", "output", *PROVENANCE_KEYS)}
        if "dtype" in kwargs:
            kwargs["dtype"] = DTYPES[kwargs["dtype"]]
        if "output" in self.values:
            kwargs["out_dir"] = self.values["output"]
        return {**kwargs, **self.values.get("params", {})}


def load(path) -> Recipe:
    """Reads and checks a recipe (.yaml / .yml: YAML, safe_load only; .json: JSON). Every problem
    is one AdapterError line naming the file and the key: unknown keys, wrong types, adapters
    that are neither a local path nor a cached Hub repo."""
    path = os.fspath(path)
    data = _read(path)
    if not isinstance(data, dict):
        raise AdapterError(path, f"a recipe must be a mapping of keys to values, got {_kind(data)}")
    base = os.path.dirname(os.path.abspath(path))
    values: dict = {}
    expected: list = []
    for key, value in data.items():
        if key in PROVENANCE_KEYS:
            continue
        if key not in _CHECKS:
            raise AdapterError(path, f"unknown key {key!r} (a recipe holds {', '.join(_CHECKS)})")
        try:
            if key == "adapters":
                values[key], expected = _check_adapters(value, base)
            else:
                values[key] = _CHECKS[key](value, base)
        except _KeyError as e:
            raise AdapterError(path, f"{key}{e.where}: {e.problem}") from None
        except ValueError as e:
            raise AdapterError(path, f"{key}: {e}") from None
    n_weights, n_adapters = len(values.get("weights") or []), len(values.get("adapters") or [])
    if n_weights and n_adapters and n_weights != n_adapters:
        raise AdapterError(path, f"weights: {n_weights} values for {n_adapters} adapters (give one per adapter)")
    return Recipe(path, values, expected)


def _read(path: str):
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return read_json(path, "recipe JSON")
    if ext not in (".yaml", ".yml"):
        raise AdapterError(path, "a recipe is a .yaml, .yml or .json file")
    import yaml

    try:
        require_regular_file(path)
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise AdapterError(path, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise AdapterError(path, f"invalid recipe YAML (not UTF-8: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise AdapterError(path, f"invalid recipe YAML: {problem}{where}") from None
    except RecursionError:
        raise AdapterError(path, "invalid recipe YAML: nested too deeply") from None


class _KeyError(ValueError):
    """A problem inside a key's value: `where` locates it ("[2].path")."""

    def __init__(self, where: str, problem: str):
        super().__init__(problem)
        self.where, self.problem = where, problem


def _kind(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}
    names[dict] = "a mapping"
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _local(value: str, base: str) -> str:
    return value if os.path.isabs(value) else os.path.join(base, value)


def _find_adapter(name: str, base: str, hub_name) -> str:
    """A local path (relative to the recipe's folder) when it exists, else the cached Hub repo of
    that name (or of the entry's hub source)."""
    local = _local(os.path.expanduser(name), base)
    if os.path.lexists(local):
        return local
    for candidate in (name, hub_name):
        if candidate is not None and hub.split_name(candidate) is not None:
            try:
                return hub.resolve(candidate)
            except AdapterError as e:
                raise ValueError(e.problem) from None
    raise ValueError(f"{local}: no such file or directory")


def _check_adapters(value, base: str) -> tuple[list, list]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of adapter paths or Hub names, got {_kind(value)}")
    paths, hashes = [], []
    for i, entry in enumerate(value):
        where = f"[{i}]"
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "sha256", "hub"}
            if unknown:
                first = sorted(map(str, unknown))[0]
                raise _KeyError(where, f"unknown key {first!r} (an entry holds path, sha256, hub)")
            name, digests, source = entry.get("path"), entry.get("sha256") or {}, entry.get("hub")
            if source is not None and not isinstance(source, str):
                raise _KeyError(where + ".hub", f"must be a Hub name org/name@revision, got {_kind(source)}")
            if not isinstance(digests, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in digests.items()
            ):
                raise _KeyError(where + ".sha256", "must map file names to sha256 hex digests")
            where += ".path"
        else:
            name, digests, source = entry, {}, None
        if not isinstance(name, str) or not name:
            raise _KeyError(where, f"must be an adapter path or Hub name, got {_kind(name)}")
        try:
            paths.append(_find_adapter(name, base, source))
        except ValueError as e:
            raise _KeyError(where, str(e)) from None
        hashes.append(dict(digests))
    return paths, hashes


def _string(choices=None):
    def check(value, base):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _optional(check):
    return lambda value, base: None if value is None else check(value, base)


def _number(value, base) -> float:
    return finite_number(value)


def _rank(value, base) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be an integer >= 1 or null, got {value!r}")
    return value


def _boolean(value, base) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_kind(value)}")
    return value


def _weights(value, base) -> list:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of numbers (one per adapter), got {_kind(value)}")
    for i, w in enumerate(value):
        try:
            _number(w, base)
        except ValueError as e:
            raise _KeyError(f"[{i}]", str(e)) from None
    return [float(w) for w in value]


def _module_weights(value, base) -> list:
    if not isinstance(value, (list, dict)):
        raise ValueError(f"must be a list of [regex, weight] pairs, got {_kind(value)}")
    return [list(rule) for rule in ModuleWeights.parse(value).rules]


def _output(value, base) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a folder path, got {_kind(value)}")
    return _local(os.path.expanduser(value), base)


def _params(value, base) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of method parameters, got {_kind(value)}")
    out = {}
    for name, v in value.items():
        p = ALL_PARAMS.get(name) if isinstance(name, str) else None
        if p is None:
            raise _KeyError(f".{name}", f"unknown method parameter (the parameters are {', '.join(ALL_PARAMS)})")
        if p.kind == "paths":
            if not isinstance(v, list) or not all(isinstance(f, str) for f in v):
                raise _KeyError(f".{name}", f"must be a list of file paths, got {_kind(v)}")
            out[name] = [_local(os.path.expanduser(f), base) for f in v]
            continue
        if p.kind in ("int", "float") and v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise _KeyError(f".{name}", f"must be {'an integer' if p.kind == 'int' else 'a number'}, got {_kind(v)}")
        try:
            out[name] = p.check(v)
        except ValueError as e:
            raise _KeyError(f".{name}", str(e)) from None
    return out


# Each key's check: (value, the recipe's folder) -> the value to use, or a ValueError saying why not.
_CHECKS: dict = {
    "adapters": None,  # (_check_adapters, which also returns the hashes)
    "method": _string(list(METHODS)),
    "params": _params,
    "weights": _optional(_weights),
    "module_weights": _optional(_module_weights),
    "output": _output,
    "format": _optional(_string()),
    "rank": _optional(_rank),
    "rank_energy": _optional(_number),
    "dtype": _string(list(DTYPES)),
    "alpha": _optional(_number),
    "extra": _string(["drop", "average"]),
    "force": _boolean,
    "device": _string(),
}
