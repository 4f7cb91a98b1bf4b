"""Reading LoRA adapters: PEFT adapter directories and bare safetensors files.

Only the safetensors header is read when an adapter is loaded; tensors are read (memory-mapped,
through safetensors' safe_open) one module at a time by `Adapter.factors` / `Adapter.extra`.
Pickle files are never opened.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch

from .. import _arrays
from . import formats
from ._common import (
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


def _tensor_spans(path: str, info: dict) -> dict:
    """{key: (byte offset in the file, byte length, dtype, shape)} of the float tensors of a
    safetensors file that safe_open has validated (keys, shapes and dtypes as `info` says)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise AdapterError(path, f"cannot read the safetensors header: {e}") from None
    spans = {}
    for key, (shape, code) in info.items():
        entry = header.get(key)
        if code not in SUPPORTED_DTYPES or not isinstance(entry, dict):
            continue
        begin, end = entry["data_offsets"]
        dtype = SUPPORTED_DTYPES[code]
        if end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
            raise AdapterError(path, f"{key}: its data does not match its shape {list(shape)} and dtype {code}")
        spans[key] = (8 + length + begin, end - begin, dtype, shape)
    return spans


def _read_span(path: str, key: str, what: str, offset: int, size: int, dtype, shape) -> torch.Tensor:
    """A tensor read with pread into memory of its own: no mapping of the file stays behind, so
    the inputs read do not count in the merge's resident memory (a memory map's pages would, as
    long as the map lives: all of every input, by the end of a merge)."""
    buf = torch.empty(size, dtype=torch.uint8)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf.numpy().data], offset) if size else 0
        finally:
            os.close(fd)
    except OSError as e:
        raise AdapterError(path, f"{what}: cannot read {key!r}: {e.strerror or e}") from None
    if got != size:
        raise AdapterError(path, f"{what}: cannot read {key!r}: the file is truncated")
    return buf.view(dtype).reshape(shape)


class Adapter:
    """One LoRA adapter, read lazily.

    Attributes: `path` (directory or file it came from), `weights_path` (the safetensors file),
    `config` (adapter_config.json, {} for a bare file), `base_model`, `fan_in_fan_out`,
    `use_rslora`, `lora_alpha`, `modules` (sorted module keys as in the file, e.g.
    "base_model.model.model.layers.0.self_attn.q_proj"), `extra_tensors` (sorted non-LoRA keys,
    e.g. modules_to_save weights "base_model.model.score.weight").

    The update of module m is `scale(m) * B @ A` with `(B, A) = factors(m)`, of shape `shape(m)` =
    (d_out, d_in); for a fan_in_fan_out adapter the base weight stores its transpose.

    Tensors are read with positioned reads of their bytes (no memory map stays open); a tensor
    of another dtype (an extra tensor) through safe_open, whose map `close()` or a `with` block
    releases (it is reopened if the adapter reads again).
    """

    def __init__(
        self,
        path: str,
        weights_path: str,
        config: dict,
        *,
        alpha: float | None = None,
        rank_hint=None,
        fmt: str = "peft",
    ):
        self.path = path
        self.format = fmt
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
        self._rule = self._scale_rule(cfg_path, config, self.lora_alpha)

        self._scan_header()
        self._resolve(cfg_path, rank_hint)

    # ---------------------------------------------------------------- construction helpers

    @staticmethod
    def _number(where, field, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(where, f"{field} must be a finite number, got {value!r}")
        return value

    @classmethod
    def _scale_rule(cls, where, config: dict, lora_alpha) -> tuple:
        """(r, rank_pattern, alpha_pattern, lora_alpha, use_rslora) of a LoraConfig's fields, checked;
        r is None without a config (nothing to check the stored ranks against)."""
        return (
            config.get("r", _DEFAULT_R) if config else None,
            cls._pattern(where, config, "rank_pattern"),
            cls._pattern(where, config, "alpha_pattern"),
            lora_alpha,
            bool(config.get("use_rslora", False)),
        )

    @classmethod
    def _pattern(cls, where, config: dict, field) -> dict:
        value = config.get(field) or {}
        if not isinstance(value, dict):
            raise AdapterError(where, f"{field} must be an object mapping module patterns to numbers")
        for key, v in value.items():
            problem = pattern_key_problem(key)
            if problem:
                raise AdapterError(where, f"{field} key {key[:80]!r} {problem}")
            if field == "rank_pattern" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AdapterError(where, f"{field}[{key!r}] must be a positive integer, got {v!r}")
            cls._number(where, f"{field}[{key!r}]", v)
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
        self._info = info
        self._spans = _tensor_spans(path, info)

        self._keys, self.extra_tensors = formats.group_keys(path, self.format, info)
        self.modules = sorted(self._keys)
        self._rank, self._shape, self._dtype, self._conv = {}, {}, {}, {}
        for m in self.modules:
            keys = self._keys[m]
            (sb, db), (sa, da) = info[keys.up], info[keys.down]
            for key, shape, code in ((keys.down, sa, da), (keys.up, sb, db)):
                if code not in SUPPORTED_DTYPES:
                    raise AdapterError(
                        path, f"{key}: unsupported dtype {code} (float32, float16, bfloat16 and float64 are read)"
                    )
                if 0 in shape:
                    raise AdapterError(path, f"{key}: empty tensor of shape {list(shape)}")
            if not (len(sa) == len(sb) == 2 or (len(sa) == len(sb) == 4 and sb[2:] == (1, 1))):
                raise AdapterError(
                    path,
                    f"module {m}: expected a 2-D tensor for each factor (a Linear layer), or a conv "
                    f"layer's down (r, c_in, kh, kw) and up (c_out, r, 1, 1); got down {list(sa)} and up {list(sb)}",
                )
            if sb[1] != sa[0]:
                raise AdapterError(
                    path,
                    f"module {m}: shapes do not chain: lora_B is {list(sb)} and lora_A is "
                    f"{list(sa)} (lora_B's columns must equal lora_A's rows, the rank)",
                )
            self._rank[m] = sa[0]
            self._shape[m] = (sb[0], math.prod(sa[1:]))
            self._dtype[m] = SUPPORTED_DTYPES[da]
            if len(sa) == 4:  # a conv LoRA is merged as the 2-D factors it is
                self._conv[m] = (sb[0], *sa[1:])

    def _resolve(self, cfg_path, rank_hint) -> None:
        """Per-module scale, exactly as PEFT's LoraModel._create_and_replace computes it."""
        self._scale = {}
        rules = {}
        if self.format == "diffusers":  # a LoraConfig per component in the metadata, else scale 1
            for component, config in formats.diffusers_configs(self.weights_path, self._file().metadata()).items():
                where = f"{self.weights_path} ({formats.DIFFUSERS_METADATA_KEY}, {component})"
                _check_config(where, config)
                lora_alpha = self._number(where, "lora_alpha", config.get("lora_alpha", _DEFAULT_ALPHA))
                rules[component] = self._scale_rule(where, config, lora_alpha)
        for m in self.modules:
            r = self._rank[m]
            if self.format == "kohya":
                alpha_key = self._keys[m].alpha
                alpha = None if alpha_key is None else self._read(alpha_key, f"module {m}")
                self._scale[m] = formats.kohya_scale(self.weights_path, m, alpha, r)
            elif self.format == "diffusers":
                component = formats.component_of(m)
                rule = rules.get(component)
                name = m[len(component) + 1 :]
                self._scale[m] = 1.0 if rule is None else self._rule_scale(rule, m, name, r, "its metadata")
            else:
                self._scale[m] = self._rule_scale(self._rule, m, relative_name(m), r, os.path.basename(cfg_path))
        if rank_hint is not None:
            for m in self.modules:
                want = (
                    rank_hint.get(m, rank_hint.get(relative_name(m))) if isinstance(rank_hint, Mapping) else rank_hint
                )
                if want is not None and int(want) != self._rank[m]:
                    raise AdapterError(
                        self.weights_path, f"module {m}: rank {self._rank[m]}, expected {int(want)} (rank_hint)"
                    )

    def _rule_scale(self, rule: tuple, module: str, name: str, r: int, source: str) -> float:
        """The scale of a module as PEFT's LoraModel._create_and_replace computes it; `name` is
        the module's name inside the model, matched against the patterns."""
        config_r, rank_pattern, alpha_pattern, lora_alpha, use_rslora = rule
        if config_r is not None:
            r_cfg = lookup_pattern(rank_pattern, name, config_r)
            if r_cfg != r:
                raise AdapterError(
                    self.weights_path,
                    f"module {module}: stored rank {r} but {source} gives "
                    f"r={r_cfg} (r / rank_pattern); PEFT would not load this adapter",
                )
        alpha = lookup_pattern(alpha_pattern, name, lora_alpha)
        return float(alpha / math.sqrt(r) if use_rslora else alpha / r)

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

    def conv_shape(self, module) -> tuple[int, int, int, int] | None:
        """(c_out, c_in, kh, kw) of a conv module's weight (its update is shape(module) reshaped),
        None for a Linear one."""
        self._check_module(module)
        return self._conv.get(module)

    def stored_dtype(self, module) -> torch.dtype:
        """The dtype lora_A is stored in."""
        self._check_module(module)
        return self._dtype[module]

    def _read(self, key, what: str) -> torch.Tensor:
        span = self._spans.get(key)
        if span is not None:
            return _read_span(self.weights_path, key, what, *span)
        try:
            return self._file().get_tensor(key)
        except _safetensors_error_types() as e:
            raise AdapterError(self.weights_path, f"{what}: cannot read {key!r}: {e}") from None

    def factors(self, module, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: d_out x r, A: r x d_in), unscaled, as stored, converted to `dtype`. Raises
        AdapterError if either holds NaN or Inf (or overflows when converted to `dtype`)."""
        B, A, _ = self._factors(module, dtype)
        return B, A

    def merge_factors(self, module) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """factors(module) in float32, and whether B or A holds an entry equal to 0 (seen by the
        same pass that converts and checks them: the merge's zero-update test needs no other)."""
        return self._factors(module, torch.float32)

    def _factors(self, module, dtype):
        """(B, A, a zero entry seen: looked for when converting to float32 only)"""
        self._check_module(module)
        out, zero = [], False
        keys = self._keys[module]
        for key, which in ((keys.up, "lora_B"), (keys.down, "lora_A")):
            t = self._read(key, f"module {module}")
            if module in self._conv:  # B (c_out, r, 1, 1) -> c_out x r, A (r, c_in, kh, kw) -> r x c_in*kh*kw
                t = t.reshape(t.shape[0], -1)
            stored = t
            if dtype == torch.float32:  # (the merge's case: converted and checked in one pass)
                t, finite, has_zero = _arrays.float32_checked(t)
                zero = zero or has_zero
            else:
                if dtype is not None and t.dtype != dtype:
                    t = t.to(dtype)
                # One check, on the converted tensor: torch's isfinite on bf16/fp16 is ~100x slower.
                finite = _arrays.all_finite(t)
            if not finite:
                if _arrays.all_finite(stored.to(torch.float64)):
                    raise AdapterError(self.weights_path, f"module {module}: {which} overflows {dtype}")
                raise AdapterError(self.weights_path, f"module {module}: {which} holds NaN or Inf values")
            out.append(t)
        return out[0], out[1], zero

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
    return _check_config(cfg_path, config)


def _check_config(cfg_path: str, config: dict) -> dict:
    """A LoraConfig's fields checked: their JSON types, LoRA, no variant whose update is not s * B @ A."""
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
    for name in (WEIGHTS_NAME, formats.DIFFUSERS_WEIGHTS_NAME):
        if name in names:
            return os.path.join(directory, name)
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
    module's scale is then alpha / r), or a Stable Diffusion LoRA in kohya or diffusers format
    (a .safetensors file, or a folder holding one, without adapter_config.json; detected from the
    keys, see io.formats; kohya files carry their alphas, diffusers files have scale 1 or a
    LoraConfig in their metadata). A file with diffusers keys given `alpha` is read as a bare PEFT
    file (e.g. a GPT-2 LoRA's "transformer.h.0..." keys).

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
        elif sd_format := _sd_format(weights, alpha):
            return _sd_adapter(path, weights, sd_format, alpha, rank_hint)
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
    if sd_format := _sd_format(path, alpha):
        return _sd_adapter(path, path, sd_format, alpha, rank_hint)
    if alpha is None:
        hint = ""
        if os.path.isfile(os.path.join(os.path.dirname(path), CONFIG_NAME)):
            hint = f"; or pass its directory to use the {CONFIG_NAME} beside it"
        raise AdapterError(path, f"a bare safetensors file needs alpha= (its lora_alpha){hint}")
    return Adapter(path, path, {}, alpha=alpha, rank_hint=rank_hint)


def _sd_format(weights: str, alpha) -> str | None:
    """'kohya' or 'diffusers' when the file's keys are in that format (diffusers keys with an
    alpha given are read as a bare PEFT file), else None."""
    handle = _open_safetensors(weights)
    try:
        fmt = formats.detect_format(handle.keys())
    except _safetensors_error_types() as e:
        raise AdapterError(weights, f"cannot read the safetensors header: {e}") from None
    return None if fmt == "diffusers" and alpha is not None else fmt


def _sd_adapter(path: str, weights: str, fmt: str, alpha, rank_hint) -> Adapter:
    if alpha is not None:
        raise AdapterError(weights, f"alpha= is for PEFT-format files; this {fmt}-format file stores its own alphas")
    return Adapter(path, weights, {}, rank_hint=rank_hint, fmt=fmt)


# -------------------------------------------------------------------- compatibility


def _norm_base(name: str) -> str:
    return name.rstrip("/\\")


def _conv_shape(adapter, module):
    """A conv module's weight shape (None for Linear ones and adapters that have no conv modules)."""
    conv_shape = getattr(adapter, "conv_shape", None)
    return conv_shape(module) if conv_shape else None


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
    for a in adapters[1:]:  # names of different formats do not meet: refused, not merged apart
        ref = adapters[0]
        fa, fr = getattr(a, "format", "peft"), getattr(ref, "format", "peft")
        if fa != fr:
            raise AdapterError(
                a.path,
                f"is in {fa} format and {ref.path} in {fr} format; merge adapters of one format "
                "(convert one by merging it alone with format=...)",
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
            if ref is not a and _conv_shape(ref, m) != _conv_shape(a, m):
                raise AdapterError(
                    a.path,
                    f"module {m}: conv weight shape {_conv_shape(a, m)} differs from {_conv_shape(ref, m)} in "
                    f"{ref.path} (None: a Linear layer)",
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
