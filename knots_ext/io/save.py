"""Writing a PEFT LoRA adapter whose update for each module is exactly B @ A (scale 1)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from .._arrays import all_finite
from ._common import (
    A_SUFFIX,
    B_SUFFIX,
    PEFT_PREFIX,
    WRITABLE_DTYPES,
    AdapterError,
    file_name,
    lookup_pattern,
    relative_name,
)
from ._output import (
    MANIFEST_NAME,
    WRITEBACK_CHUNK,
    fresh_temp_name,
    fsync_path,
    inspect_output,
    install,
    manifest_text,
    plain_file_name,
    remove_stale_temps,
    start_writeback,
)
from .adapter import CONFIG_NAME
from .formats import OutputLayout


def rank_config(ranks: Mapping[str, int]) -> tuple[int, dict, dict]:
    """(r, rank_pattern, alpha_pattern) giving every module (named relative to the base model)
    its rank and lora_alpha = rank, i.e. scale 1, under PEFT's get_pattern_key rule.

    r is the most common rank (the largest of those on a tie), so only the other modules get a
    pattern entry. Entries are the plain module names, as PEFT's own LoRA conversion writes them,
    when every name is made of word characters and dots; if a name holds other characters (regex
    metacharacters such as "(" or "+") or a plain name would also match another module (the key is
    a regex matched against a dotted suffix of the name: "a.b" matches "x.a.b", and "." matches any
    character), every key is written as "^" + re.escape(name) instead, which matches that module
    alone."""
    counts = Counter(ranks.values())
    top = max(counts.values())
    r0 = max(r for r, c in counts.items() if c == top)
    differing = {n: r for n, r in sorted(ranks.items()) if r != r0}

    def resolves(pattern: dict) -> bool:
        return all(lookup_pattern(pattern, n, r0) == r for n, r in ranks.items())

    pattern = dict(differing)
    if not all(re.fullmatch(r"[\w.]+", n) for n in differing) or not resolves(pattern):
        pattern = {"^" + re.escape(n): r for n, r in differing.items()}
        if not resolves(pattern):  # cannot happen: the anchored keys match exactly one name each
            raise RuntimeError("internal error: rank_pattern does not resolve")
    return r0, pattern, dict(pattern)


def _target_matches(target_modules, name: str) -> bool:
    """PEFT's check_target_module_exists for a module name relative to the base model."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


# safetensors' dtype names of the writable dtypes.
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _prepared(out_dir, t, dtype, what: str, finite: bool = False) -> torch.Tensor:
    """t checked (a finite floating tensor), on the CPU, as `dtype`, contiguous. finite: the caller
    has checked t's values already; they are checked again only if converting them may overflow."""
    if not isinstance(t, torch.Tensor):
        raise AdapterError(out_dir, f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    t = t.detach()
    if t.is_complex():
        raise AdapterError(out_dir, f"{what}: complex tensors cannot be written")
    if not t.is_floating_point():
        raise AdapterError(out_dir, f"{what}: must be floating point, got {t.dtype}")
    converted = t.to(device="cpu", dtype=dtype)
    if finite and converted.dtype == t.dtype:
        return converted.contiguous()
    if not all_finite(converted):  # one pass in the usual case; the cause only on error
        if not all_finite(t):
            raise AdapterError(out_dir, f"{what}: holds NaN or Inf values")
        raise AdapterError(out_dir, f"{what}: overflows {dtype}")
    return converted.contiguous()


def _header_room(keys: Sequence[str], metadata: Mapping[str, str]) -> int:
    """Bytes that surely hold the safetensors header of these tensor keys and this metadata (a
    multiple of 8): per entry the quoted key, its dtype, a 2-D shape and two offsets of at most 20
    digits each."""
    if not keys:
        return 0
    room = 64 + len(json.dumps(dict(metadata))) + sum(len(json.dumps(k)) + 120 for k in keys)
    return room + (-room % 8)


class AdapterWriter:
    """A PEFT LoRA adapter written module by module: each module's factors go to disk as soon as
    add() is called, so a merge never holds its whole result; close() writes the safetensors
    header, the config and the manifest and puts the folder in place (the rules and guarantees of
    save_adapter); abort() (or an exception inside a `with` block) leaves nothing behind.
    `metadata` (string values) joins the safetensors header's metadata; `text_files` ({name:
    text}, e.g. a recipe and a model card) are written beside the adapter and listed in the
    manifest like its own files. `layout` (io.formats.OutputLayout) writes another format than
    PEFT's (kohya, diffusers: no config, their own key names and file name) or conv modules.

        with AdapterWriter(out, base_model=...) as w:
            for name, (B, A) in ...:
                w.add(name, B, A)
        # closed on leaving the block
    """

    def __init__(
        self,
        out_dir,
        *,
        base_model: str | None,
        target_modules=None,
        fan_in_fan_out: bool = False,
        dtype=torch.float32,
        task_type=None,
        overwrite: bool = False,
        inputs: Sequence = (),
        manifest: Mapping | None = None,
        reserve_keys: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        text_files: Mapping[str, str] | None = None,
        layout: OutputLayout | None = None,
    ):
        self.layout = layout or OutputLayout()
        self.weights_name = (
            self.layout.weights_name(os.fspath(out_dir)) if isinstance(out_dir, (str, os.PathLike)) else ""
        )
        own_files = [self.weights_name, MANIFEST_NAME] + ([CONFIG_NAME] if self.layout.writes_config else [])
        self.metadata, self.text_files = _checked_extras(out_dir, metadata, text_files, own_files)
        self.files = own_files + sorted(self.text_files)
        self.target, _ = inspect_output(out_dir, inputs, overwrite, self.files)
        self.out_dir = os.fspath(out_dir)
        if dtype not in WRITABLE_DTYPES:
            raise AdapterError(self.out_dir, f"unsupported output dtype {dtype} (float32, float16, bfloat16, float64)")
        if task_type is not None and not isinstance(task_type, str):
            task_type = str(getattr(task_type, "value", task_type))
        if manifest is not None and not isinstance(manifest, Mapping):
            raise AdapterError(self.out_dir, f"manifest must be a dict, got {type(manifest).__name__}")
        try:
            self.manifest = manifest_text(self.files, manifest)
        except (TypeError, ValueError) as e:
            raise AdapterError(self.out_dir, f"manifest metadata cannot be written as JSON: {e}") from None
        self.inputs, self.overwrite = inputs, overwrite
        self.base_model, self.target_modules, self.fan_in_fan_out = base_model, target_modules, fan_in_fan_out
        self.dtype, self.task_type = dtype, task_type
        self.ranks: dict[str, int] = {}
        self.modules_to_save: set = set()
        self.entries: dict[str, dict] = {}  # key -> safetensors header entry
        self.size = 0
        self.written_back = 0  # data bytes whose writeback has been started (start_writeback)
        parent, base = os.path.dirname(self.target), os.path.basename(self.target)
        self.tmp: str | None = None
        try:
            os.makedirs(parent, exist_ok=True)
            remove_stale_temps(parent, base)
            self.tmp = fresh_temp_name(parent, base)
            os.mkdir(self.tmp)
            # The tensors go straight into the weights file, after room for the header (8 bytes of
            # length + JSON) of the keys announced in reserve_keys; close() writes the header there,
            # or, if it does not fit, copies the data behind a header of its own.
            self.data_start = 8 + _header_room(reserve_keys, self.metadata)
            self.data = open(os.path.join(self.tmp, self.weights_name), "wb")  # noqa: SIM115 (closed by close / abort)
            self.data.seek(self.data_start)
        except OSError as e:
            raise AdapterError(self.out_dir, f"cannot create a directory beside it: {e.strerror or e}") from None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.close()
        else:
            self.abort()

    def _guard(self, step, *args):
        """Runs a step; any error aborts the write (nothing left behind) and OSErrors become one line."""
        try:
            return step(*args)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise AdapterError(self.out_dir, f"cannot write the adapter: {e.strerror or e}") from None
            raise

    def _append(self, key: str, t: torch.Tensor) -> None:
        raw = t.reshape(-1).view(torch.uint8).numpy()
        self.data.write(raw.data)
        self.entries[key] = {
            "dtype": _ST_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + raw.size],
        }
        self.size += raw.size
        if self.size - self.written_back >= WRITEBACK_CHUNK:
            self.data.flush()
            start_writeback(self.data.fileno(), self.data_start + self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def add(self, module: str, B, A, *, finite: bool = False) -> None:
        """Writes module's factors: its update is exactly B @ A (B: d_out x r, A: r x d_in). finite:
        the caller has checked that B and A hold no NaN or Inf (saves a pass over a dense update's
        tens of MB; converting to a narrower dtype is checked in any case)."""
        self._guard(self._add, module, B, A, finite)

    def _add(self, module, B, A, finite=False):
        out_dir = self.out_dir
        if not isinstance(module, str) or not module or module.endswith(".") or module == PEFT_PREFIX:
            raise AdapterError(out_dir, f"bad module name {module!r}")
        name = relative_name(self.layout.name(out_dir, module))
        if name in self.ranks:
            raise AdapterError(out_dir, f"module {name} is given twice (with and without the {PEFT_PREFIX!r} prefix)")
        for which, t in (("B", B), ("A", A)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise AdapterError(out_dir, f"module {module}: {which} must be a 2-D tensor, got {shape}")
        if B.shape[1] != A.shape[0] or A.shape[0] == 0 or 0 in B.shape or 0 in A.shape:
            raise AdapterError(
                out_dir,
                f"module {module}: B {list(B.shape)} and A {list(A.shape)} do not chain "
                "(B must be d_out x r and A r x d_in, r >= 1)",
            )
        B = _prepared(out_dir, B, self.dtype, f"module {module}: B", finite)
        A = _prepared(out_dir, A, self.dtype, f"module {module}: A", finite)
        B_key, A_key = self.layout.keys(out_dir, module)
        B, A = self.layout.shaped(module, B, A)
        self._append(B_key, B)
        self._append(A_key, A)
        self.ranks[name] = int(A.shape[0])

    def patch(self, module: str, which: str, positions, values: torch.Tensor) -> None:
        """Overwrites entries of a module's written B or A (which: "B" or "A"): its flat
        (row-major) entries at `positions` get `values` (converted to the output dtype as the
        tensor was). For results finished after their module was written (TIES's majority sign)."""
        self._guard(self._patch, module, which, positions, values)

    def _patch(self, module, which, positions, values):
        if which not in ("B", "A"):
            raise AdapterError(self.out_dir, f"module {module}: patch takes which='B' or 'A', got {which!r}")
        B_key, A_key = self.layout.keys(self.out_dir, module)
        entry = self.entries.get(B_key if which == "B" else A_key)
        if entry is None:
            raise AdapterError(self.out_dir, f"module {module}: not written yet, nothing to patch")
        raw = _prepared(self.out_dir, values.reshape(-1), self.dtype, f"module {module}: {which}").view(torch.uint8)
        size = raw.numel() // max(len(positions), 1)
        start, end = (self.data_start + offset for offset in entry["data_offsets"])
        self.data.flush()  # (pwrite below the buffered appends' position)
        for j, p in enumerate(positions):
            at = start + int(p) * size
            if not start <= at < end:
                raise AdapterError(self.out_dir, f"module {module}: {which} has no entry {p}")
            os.pwrite(self.data.fileno(), raw[j * size : (j + 1) * size].numpy().tobytes(), at)

    def add_extra(self, name: str, t) -> None:
        """A non-LoRA tensor under its file key (e.g. "base_model.model.score.weight"); its module
        goes into modules_to_save, so that PEFT loads it."""
        self._guard(self._add_extra, name, t)

    def _add_extra(self, name, t):
        key = file_name(name) if self.layout.writes_config else name  # (other formats: the key as given)
        if key in self.entries or key.endswith((A_SUFFIX, B_SUFFIX)):
            raise AdapterError(self.out_dir, f"extra tensor {name!r} collides with a LoRA tensor")
        owner = relative_name(key).rpartition(".")[0]
        if not owner:
            raise AdapterError(self.out_dir, f"extra tensor {name!r}: expected '<module>.<parameter>'")
        if self.layout.writes_config:
            self.modules_to_save.add(owner)
        self._append(key, _prepared(self.out_dir, t, self.dtype, f"extra tensor {name}"))

    def close(self) -> None:
        """Finishes the files and puts the folder in place."""
        self._guard(self._close)

    def _close(self):
        tmp = self.tmp
        assert tmp is not None, "the writer is closed"
        if not self.ranks:
            raise AdapterError(self.out_dir, "no modules to write")
        self._check_targets()
        weights = os.path.join(tmp, self.weights_name)
        header = json.dumps(
            {"__metadata__": {"format": "pt", **self.metadata}, **dict(sorted(self.entries.items()))},
            separators=(",", ":"),
        ).encode()
        if 8 + len(header) <= self.data_start:  # padded with spaces, as safetensors allows
            self.data.seek(0)
            self.data.write((self.data_start - 8).to_bytes(8, "little"))
            self.data.write(header + b" " * (self.data_start - 8 - len(header)))
            self.data.close()
        else:
            self.data.close()
            moved = os.path.join(tmp, ".tensors")
            os.rename(weights, moved)
            header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
            with open(weights, "wb") as f, open(moved, "rb") as data:
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                data.seek(self.data_start)
                shutil.copyfileobj(data, f, 16 << 20)
            os.unlink(moved)
        if self.layout.writes_config:
            cfg = os.path.join(tmp, CONFIG_NAME)
            _write_text(cfg, json.dumps(self._config(), indent=2, sort_keys=True) + "\n")
            os.chmod(weights, stat.S_IMODE(os.stat(cfg).st_mode))  # the mode open() gave the config
        fsync_path(weights)
        for name, text in sorted(self.text_files.items()):
            _write_text(os.path.join(tmp, name), text)
        _write_text(os.path.join(tmp, MANIFEST_NAME), self.manifest)
        fsync_path(tmp)
        # Checked again: the folder may have changed during a long write.
        _, old_files = inspect_output(self.out_dir, self.inputs, self.overwrite, self.files)
        install(tmp, self.target, old_files)
        self.tmp = None

    def abort(self) -> None:
        """Removes everything written so far."""
        if not self.data.closed:
            self.data.close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _check_targets(self):
        for name in self.ranks:
            if self.target_modules is not None and not _target_matches(self.target_modules, name):
                raise AdapterError(
                    self.out_dir,
                    f"module {name} is not matched by target_modules={self.target_modules!r}; PEFT would not load it",
                )
            for owner in self.modules_to_save:
                if name == owner or name.startswith(owner + "."):
                    raise AdapterError(
                        self.out_dir,
                        f"module {name} lies inside modules_to_save module {owner} "
                        "(from the extra tensors); PEFT would not give it a LoRA layer",
                    )

    def _config(self) -> dict:
        r0, rank_pattern, alpha_pattern = rank_config(self.ranks)
        target_list: list[str] | str
        if self.target_modules is None:
            target_list = sorted(self.ranks)
        elif isinstance(self.target_modules, str):
            target_list = self.target_modules
        else:
            target_list = sorted(set(self.target_modules))
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model,
            "revision": None,
            "inference_mode": True,
            "r": r0,
            "lora_alpha": r0,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": False,
            "use_dora": False,
            "target_modules": target_list,
            "exclude_modules": None,
            "fan_in_fan_out": bool(self.fan_in_fan_out),
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": False,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "modules_to_save": sorted(self.modules_to_save) or None,
        }


def _checked_extras(out_dir, metadata, text_files, own_files) -> tuple[dict, dict]:
    """(safetensors metadata, {file name: text}) checked: string metadata beside "format", plain
    file names that are not the adapter's own files."""
    metadata, text_files = dict(metadata or {}), dict(text_files or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or key == "format":
            raise AdapterError(out_dir, f"safetensors metadata must map names (not 'format') to strings, got {key!r}")
    for name, text in text_files.items():
        if not plain_file_name(name) or name in own_files or not isinstance(text, str):
            raise AdapterError(out_dir, f"cannot write the extra file {name!r} (a plain new file name and its text)")
    return metadata, text_files


def save_adapter(
    out_dir,
    factors: Mapping[str, tuple],
    *,
    base_model: str | None,
    target_modules=None,
    fan_in_fan_out: bool = False,
    extra: Mapping | None = None,
    dtype=torch.float32,
    task_type=None,
    overwrite: bool = False,
    inputs: Sequence = (),
    manifest: Mapping | None = None,
    metadata: Mapping[str, str] | None = None,
    text_files: Mapping[str, str] | None = None,
    layout: OutputLayout | None = None,
) -> None:
    """Writes a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) whose update
    for each module m is exactly `B @ A` with `(B, A) = factors[m]` (B: d_out x r, A: r x d_in;
    for fan_in_fan_out the base weight is its transpose).

    Module names are keys as Adapter.modules gives them ("base_model.model.<name>") or names
    inside the base model ("<name>"). Ranks may differ per module: lora_alpha = r for the most
    common rank, and rank_pattern / alpha_pattern (equal to each other) for the rest, so every
    module's scale is 1. `target_modules` defaults to the exact module names; a given one must
    match every module. `extra` holds non-LoRA tensors under their file keys (as in
    Adapter.extra_tensors, e.g. "base_model.model.score.weight"); the module owning each key is
    listed in modules_to_save, so that PEFT loads it. Floating tensors are written as `dtype`.

    A manifest, knots_merge.json, lists the files written and holds `manifest` (metadata such as
    the method and its parameters, under "merge"); it marks the folder as a knots-merge output.
    `out_dir` must not exist, or be an empty folder, or -- with `overwrite` -- an earlier
    knots-merge output, whose own files are then replaced (other files there stay); it must not
    be or hold any of `inputs` (the adapters merged). check_output runs these checks alone;
    knots_ext.io._output says the rules in full. Everything is written into a fresh folder beside
    `out_dir` first: on any error (or Ctrl-C) nothing is left behind and an existing out_dir is
    intact. Files get the permissions 0o666 & ~umask, a new folder 0o777 & ~umask. `metadata` and
    `text_files` are AdapterWriter's (safetensors metadata; more files beside the adapter), and
    so is `layout` (another format: kohya, diffusers; conv modules).
    PeftModel.from_pretrained(base, out_dir) loads the result as it is.
    """
    writer = AdapterWriter(
        out_dir,
        base_model=base_model,
        target_modules=target_modules,
        fan_in_fan_out=fan_in_fan_out,
        dtype=dtype,
        task_type=task_type,
        overwrite=overwrite,
        inputs=inputs,
        manifest=manifest,
        metadata=metadata,
        text_files=text_files,
        layout=layout,
        reserve_keys=_reserved_keys(out_dir, layout, [k for k in factors if isinstance(k, str)])
        + [file_name(k) for k in (extra or {}) if isinstance(k, str)],
    )
    with writer:
        if not factors:
            raise AdapterError(writer.out_dir, "no modules to write")
        for module in factors:  # every name checked before any tensor is written
            if not isinstance(module, str) or not module or module.endswith(".") or module == PEFT_PREFIX:
                raise AdapterError(writer.out_dir, f"bad module name {module!r}")
        for module in sorted(factors, key=file_name):
            pair = factors[module]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise AdapterError(writer.out_dir, f"module {module}: expected a (B, A) pair")
            writer.add(module, *pair)
        for k, t in sorted((extra or {}).items()):
            writer.add_extra(k, t)


def _reserved_keys(out_dir, layout: OutputLayout | None, modules) -> list[str]:
    """The tensor keys of these modules in the output (room for the header is kept for them);
    a module the layout cannot name is left to add() to refuse."""
    layout = layout or OutputLayout()
    keys: list[str] = []
    for module in modules:
        with contextlib.suppress(AdapterError):
            keys += layout.keys(os.fspath(out_dir), module)
    return keys


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
