"""Reading LoRA adapters: PEFT adapter directories and bare safetensors files.

Only the safetensors header is read when an adapter is loaded; tensors are read (memory-mapped,
through safetensors' safe_open) one module at a time by `Adapter.factors` / `Adapter.extra`.
Pickle files are never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import torch

from ._common import (
    A_SUFFIX,
    B_SUFFIX,
    PICKLE_MESSAGE,
    PICKLE_SUFFIXES,
    SUPPORTED_DTYPES,
    AdapterError,
    lookup_pattern,
    pattern_key_problem,
    read_json,
    relative_name,
    require_regular_file,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT's LoraConfig defaults, used when adapter_config.json leaves a field out.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8

# Config switches that change what the stored factors mean: the update is then not s * B @ A.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "lora_bias": "adapters with a LoRA bias (lora_bias) are not supported",
    "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens) are not supported",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not supported",
}

# JSON types of the config fields read (a wrong one, e.g. "use_rslora": "false", which is truthy,
# is refused rather than guessed at); null stands for PEFT's default where PEFT accepts it.
_BOOL_OR_NULL = ((bool, type(None)), "true, false or null")
_LIST_OR_NULL = ((list, type(None)), "a list or null")
_OBJECT_OR_NULL = ((dict, type(None)), "an object mapping module patterns to numbers, or null")
_STRING_OR_NULL = ((str, type(None)), "a string or null")
_FIELD_TYPES = {
    "peft_type": ((str,), "a string"),
    "task_type": _STRING_OR_NULL,
    "base_model_name_or_path": _STRING_OR_NULL,
    "r": ((int,), "a positive integer"),
    "lora_alpha": ((int, float), "a finite number"),
    "fan_in_fan_out": _BOOL_OR_NULL,
    "use_rslora": _BOOL_OR_NULL,
    "use_dora": _BOOL_OR_NULL,
    "use_qalora": _BOOL_OR_NULL,
    "lora_bias": _BOOL_OR_NULL,
    "rank_pattern": _OBJECT_OR_NULL,
    "alpha_pattern": _OBJECT_OR_NULL,
    "alora_invocation_tokens": _LIST_OR_NULL,
    "target_parameters": _LIST_OR_NULL,
}


def _safetensors_error_types():
    from safetensors import SafetensorError

    return (SafetensorError, OSError, RuntimeError, ValueError, TypeError)


def _open_safetensors(path: str):
    from safetensors import safe_open

    require_regular_file(path)  # a FIFO would block the open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except _safetensors_error_types() as e:
        raise AdapterError(path, f"not a readable safetensors file (corrupt or truncated?): {e}") from None


class Adapter:
    """One LoRA adapter, read lazily.

    Attributes: `path` (directory or file it came from), `weights_path` (the safetensors file),
    `config` (adapter_config.json, {} for a bare file), `base_model`, `fan_in_fan_out`,
    `use_rslora`, `lora_alpha`, `modules` (sorted module keys as in the file, e.g.
    "base_model.model.model.layers.0.self_attn.q_proj"), `extra_tensors` (sorted non-LoRA keys,
    e.g. modules_to_save weights "base_model.model.score.weight").

    The update of module m is `scale(m) * B @ A` with `(B, A) = factors(m)`, of shape `shape(m)` =
    (d_out, d_in); for a fan_in_fan_out adapter the base weight stores its transpose.

    The file stays open (memory-mapped) while the object lives; `close()` or a `with` block
    releases it, and a closed or unpickled Adapter reopens the file when it next reads.
    """

    def __init__(self, path: str, weights_path: str, config: dict, *, alpha: float | None = None, rank_hint=None):
        self.path = path
        self.weights_path = weights_path
        self.config = config
        base = config.get("base_model_name_or_path")
        self.base_model = str(base) if base else None
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.use_rslora = bool(config.get("use_rslora", False))
        self._handle = None

        cfg_path = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        self.lora_alpha = self._number(
            cfg_path, "lora_alpha", alpha if alpha is not None else config.get("lora_alpha", _DEFAULT_ALPHA)
        )
        self._config_r = config.get("r", _DEFAULT_R)
        self._rank_pattern = self._pattern(cfg_path, "rank_pattern")
        self._alpha_pattern = self._pattern(cfg_path, "alpha_pattern")

        self._scan_header()
        self._resolve(cfg_path, rank_hint)

    # ---------------------------------------------------------------- construction helpers

    @staticmethod
    def _number(where, field, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(where, f"{field} must be a finite number, got {value!r}")
        return value

    def _pattern(self, where, field) -> dict:
        value = self.config.get(field) or {}
        if not isinstance(value, dict):
            raise AdapterError(where, f"{field} must be an object mapping module patterns to numbers")
        for key, v in value.items():
            problem = pattern_key_problem(key)
            if problem:
                raise AdapterError(where, f"{field} key {key[:80]!r} {problem}")
            if field == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AdapterError(where, f"{field}[{key!r}] must be a positive integer, got {v!r}")
            self._number(where, f"{field}[{key!r}]", v)
        return dict(value)

    def _scan_header(self) -> None:
        """Reads the safetensors header only: key names, shapes and dtypes."""
        path = self.weights_path
        handle = _open_safetensors(path)
        try:
            info = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = handle.get_slice(key)
                info[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        except _safetensors_error_types() as e:
            raise AdapterError(path, f"cannot read the safetensors header: {e}") from None
        self._handle = handle
        self._info = info

        a_mods, b_mods, extras = set(), set(), []
        for key in info:
            if key.endswith(A_SUFFIX):
                a_mods.add(key[: -len(A_SUFFIX)])
            elif key.endswith(B_SUFFIX):
                b_mods.add(key[: -len(B_SUFFIX)])
            elif "lora_magnitude_vector" in key:
                raise AdapterError(path, f"DoRA adapters are not supported (found {key!r})")
            elif ".lora_embedding_A" in key or ".lora_embedding_B" in key:
                raise AdapterError(path, f"LoRA on embedding layers is not supported (found {key!r})")
            elif key.endswith(".lora_B.bias"):
                raise AdapterError(path, f"adapters with a LoRA bias (lora_bias) are not supported (found {key!r})")
            elif re.search(r"\.lora_[AB]\.", key):
                raise AdapterError(
                    path,
                    f"unrecognised LoRA key {key!r} (expected '<module>.lora_A.weight' and "
                    "'<module>.lora_B.weight', as PeftModel.save_pretrained writes them)",
                )
            else:
                extras.append(key)
        for m in sorted(a_mods - b_mods):
            raise AdapterError(path, f"module {m}: lora_A without its lora_B")
        for m in sorted(b_mods - a_mods):
            raise AdapterError(path, f"module {m}: lora_B without its lora_A")
        if not a_mods:
            raise AdapterError(path, "no LoRA tensors (expected keys ending in '.lora_A.weight' and '.lora_B.weight')")

        self.modules = sorted(a_mods)
        self.extra_tensors = sorted(extras)
        self._rank, self._shape, self._dtype = {}, {}, {}
        for m in self.modules:
            (sa, da), (sb, db) = info[m + A_SUFFIX], info[m + B_SUFFIX]
            for key, shape, code in ((m + A_SUFFIX, sa, da), (m + B_SUFFIX, sb, db)):
                if code not in SUPPORTED_DTYPES:
                    raise AdapterError(
                        path, f"{key}: unsupported dtype {code} (float32, float16, bfloat16 and float64 are read)"
                    )
                if len(shape) != 2:
                    raise AdapterError(
                        path,
                        f"{key}: expected a 2-D tensor, got shape {list(shape)} "
                        "(only LoRA on Linear layers is supported)",
                    )
                if 0 in shape:
                    raise AdapterError(path, f"{key}: empty tensor of shape {list(shape)}")
            if sb[1] != sa[0]:
                raise AdapterError(
                    path,
                    f"module {m}: shapes do not chain: lora_B is {list(sb)} and lora_A is "
                    f"{list(sa)} (lora_B's columns must equal lora_A's rows, the rank)",
                )
            self._rank[m] = sa[0]
            self._shape[m] = (sb[0], sa[1])
            self._dtype[m] = SUPPORTED_DTYPES[da]

    def _resolve(self, cfg_path, rank_hint) -> None:
        """Per-module scale, exactly as PEFT's LoraModel._create_and_replace computes it."""
        self._scale = {}
        has_config = bool(self.config)
        for m in self.modules:
            name = relative_name(m)
            r = self._rank[m]
            if has_config:
                r_cfg = lookup_pattern(self._rank_pattern, name, self._config_r)
                if r_cfg != r:
                    raise AdapterError(
                        self.weights_path,
                        f"module {m}: stored rank {r} but {os.path.basename(cfg_path)} gives "
                        f"r={r_cfg} (r / rank_pattern); PEFT would not load this adapter",
                    )
            alpha = lookup_pattern(self._alpha_pattern, name, self.lora_alpha)
            self._scale[m] = float(alpha / math.sqrt(r) if self.use_rslora else alpha / r)
        if rank_hint is not None:
            for m in self.modules:
                want = (
                    rank_hint.get(m, rank_hint.get(relative_name(m))) if isinstance(rank_hint, Mapping) else rank_hint
                )
                if want is not None and int(want) != self._rank[m]:
                    raise AdapterError(
                        self.weights_path, f"module {m}: rank {self._rank[m]}, expected {int(want)} (rank_hint)"
                    )

    # ---------------------------------------------------------------- file handle

    def _file(self):
        if self._handle is None:
            self._handle = _open_safetensors(self.weights_path)
        return self._handle

    def close(self) -> None:
        """Releases the memory-mapped file (it is reopened if the adapter reads again)."""
        self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def __repr__(self):
        ranks = sorted(set(self._rank.values()))
        return (
            f"Adapter({self.path!r}, modules={len(self.modules)}, ranks={ranks}, "
            f"base_model={self.base_model!r}, fan_in_fan_out={self.fan_in_fan_out})"
        )

    # ---------------------------------------------------------------- queries

    def _check_module(self, module):
        if module not in self._rank:
            raise KeyError(f"{self.path}: no LoRA module {module!r}")

    def __contains__(self, module) -> bool:
        return module in self._rank

    def __len__(self) -> int:
        return len(self.modules)

    def rank(self, module) -> int:
        self._check_module(module)
        return self._rank[module]

    def scale(self, module) -> float:
        self._check_module(module)
        return self._scale[module]

    def shape(self, module) -> tuple[int, int]:
        """(d_out, d_in) of B @ A, from the header (no data read)."""
        self._check_module(module)
        return self._shape[module]

    def stored_dtype(self, module) -> torch.dtype:
        """The dtype lora_A is stored in."""
        self._check_module(module)
        return self._dtype[module]

    def _read(self, key, what: str) -> torch.Tensor:
        try:
            return self._file().get_tensor(key)
        except _safetensors_error_types() as e:
            raise AdapterError(self.weights_path, f"{what}: cannot read {key!r}: {e}") from None

    def factors(self, module, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: d_out x r, A: r x d_in), unscaled, as stored, converted to `dtype`. Raises
        AdapterError if either holds NaN or Inf (or overflows when converted to `dtype`)."""
        self._check_module(module)
        out = []
        for suffix in (B_SUFFIX, A_SUFFIX):
            t = self._read(module + suffix, f"module {module}")
            which = "lora_B" if suffix == B_SUFFIX else "lora_A"
            stored = t
            if dtype is not None and t.dtype != dtype:
                t = t.to(dtype)
            # One check, on the converted tensor: torch's isfinite on bf16/fp16 is ~100x slower.
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                if bool(torch.isfinite(stored.to(torch.float64)).all()):
                    raise AdapterError(self.weights_path, f"module {module}: {which} overflows {dtype}")
                raise AdapterError(self.weights_path, f"module {module}: {which} holds NaN or Inf values")
            out.append(t)
        return out[0], out[1]

    def extra(self, key, dtype=None) -> torch.Tensor:
        """A non-LoRA tensor (e.g. a modules_to_save weight), as stored or converted to `dtype`."""
        if key not in self.extra_tensors:
            raise KeyError(f"{self.path}: no extra tensor {key!r}")
        t = self._read(key, "extra tensor")
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t


# -------------------------------------------------------------------- loading


def _refuse_pickle(path: str):
    raise AdapterError(path, PICKLE_MESSAGE)


def _json_kind(value) -> str:
    for types, kind in (
        (bool, "a boolean"),
        ((int, float), "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "an object"),
        (type(None), "null"),
    ):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _check_field_types(cfg_path: str, config: dict) -> None:
    for field, (types, expected) in _FIELD_TYPES.items():
        if field not in config:
            continue
        value = config[field]
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if field == "r" and not wrong:
            wrong = value < 1
        if wrong:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise AdapterError(cfg_path, f"{field} must be {expected}, got {shown} ({_json_kind(value)})")


def _read_config(cfg_path: str) -> dict:
    config = read_json(cfg_path)
    if not isinstance(config, dict):
        raise AdapterError(cfg_path, "invalid adapter config: expected a JSON object")
    _check_field_types(cfg_path, config)
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterError(cfg_path, f"peft_type is {peft_type!r}, not 'LORA': only LoRA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(cfg_path, "DoRA adapters are not supported (use_dora is true)")
    for flag, problem in _UNSUPPORTED_FLAGS.items():
        if flag != "use_dora" and config.get(flag):
            raise AdapterError(cfg_path, problem)
    return config


def _find_weights(directory: str) -> str:
    names = sorted(os.listdir(directory))
    if WEIGHTS_NAME in names:
        return os.path.join(directory, WEIGHTS_NAME)
    st = [n for n in names if n.endswith(".safetensors") and os.path.isfile(os.path.join(directory, n))]
    if len(st) == 1:
        return os.path.join(directory, st[0])
    if len(st) > 1:
        raise AdapterError(
            directory, f"no {WEIGHTS_NAME} and several .safetensors files ({', '.join(st)}); pass the file to read"
        )
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise AdapterError(os.path.join(directory, pickles[0]), PICKLE_MESSAGE)
    raise AdapterError(directory, f"no .safetensors file in the directory (expected {WEIGHTS_NAME})")


def load_adapter(path, alpha: float | None = None, *, rank_hint=None) -> Adapter:
    """Opens a LoRA adapter: a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors), or a bare .safetensors file with PEFT-style keys
    ("<module>.lora_A.weight" / "<module>.lora_B.weight"), which needs `alpha` (lora_alpha; each
    module's scale is then alpha / r).

    For a directory, `alpha` (if given) replaces the config's lora_alpha; alpha_pattern still
    applies. `rank_hint` (an int, or {module: int}) is a check: a module stored with another rank
    is an error. Only the header is read here; tensors are read by Adapter.factors / extra.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AdapterError(path, "no such file or directory")
    if alpha is not None:
        Adapter._number(path, "alpha", alpha)

    if os.path.isdir(path):
        cfg_path = os.path.join(path, CONFIG_NAME)
        weights = _find_weights(path)
        if os.path.lexists(cfg_path):  # a FIFO or directory there is refused, not ignored
            config = _read_config(cfg_path)
        elif alpha is not None:
            config = {}
        else:
            raise AdapterError(
                path, f"no {CONFIG_NAME} (pass alpha= to read {os.path.basename(weights)} as a bare file)"
            )
        return Adapter(path, weights, config, alpha=alpha, rank_hint=rank_hint)

    if path.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(path)
    if os.path.basename(path) == CONFIG_NAME:
        return load_adapter(os.path.dirname(path) or ".", alpha, rank_hint=rank_hint)
    if alpha is None:
        hint = ""
        if os.path.isfile(os.path.join(os.path.dirname(path), CONFIG_NAME)):
            hint = f"; or pass its directory to use the {CONFIG_NAME} beside it"
        raise AdapterError(path, f"a bare safetensors file needs alpha= (its lora_alpha){hint}")
    return Adapter(path, path, {}, alpha=alpha, rank_hint=rank_hint)


# -------------------------------------------------------------------- compatibility


def _norm_base(name: str) -> str:
    return name.rstrip("/\\")


def check_compatible(adapters, force: bool = False) -> None:
    """Checks that adapters can be merged: the same base model (base_model_name_or_path, where
    both adapters record one) and the same fan_in_fan_out, unless `force`; and, always, that
    every module present in several adapters has the same (d_out, d_in) in all of them.
    Raises AdapterError naming both files and the module otherwise."""
    adapters = list(adapters)
    if not adapters:
        raise AdapterError("check_compatible: no adapters given")
    if not force:
        named = [a for a in adapters if a.base_model]
        for a in named[1:]:
            ref = named[0]
            if _norm_base(a.base_model) != _norm_base(ref.base_model):
                raise AdapterError(
                    a.path,
                    f"base model {a.base_model!r} differs from {ref.base_model!r} of "
                    f"{ref.path} (force=True merges anyway)",
                )
        for a in adapters[1:]:
            ref = adapters[0]
            if a.fan_in_fan_out != ref.fan_in_fan_out:
                raise AdapterError(
                    a.path,
                    f"fan_in_fan_out={a.fan_in_fan_out} differs from {ref.path} "
                    f"(fan_in_fan_out={ref.fan_in_fan_out}); they are not for the same "
                    "base model (force=True merges anyway)",
                )
    first_seen: dict[str, Adapter] = {}
    for a in adapters:
        for m in a.modules:
            ref = first_seen.setdefault(m, a)
            if ref is not a and ref.shape(m) != a.shape(m):
                raise AdapterError(
                    a.path,
                    f"module {m}: update shape (d_out, d_in) = {a.shape(m)} differs from {ref.shape(m)} in {ref.path}",
                )
    # Same modules under different key prefixes would silently never meet: say so.
    for a in adapters[1:]:
        ref = adapters[0]
        if not set(a.modules) & set(ref.modules) and (
            {relative_name(m) for m in a.modules} & {relative_name(m) for m in ref.modules}
        ):
            raise AdapterError(
                a.path,
                f"no module key in common with {ref.path}, but the same module names "
                f"appear under different key prefixes (e.g. {a.modules[0]!r} vs "
                f"{ref.modules[0]!r})",
            )
