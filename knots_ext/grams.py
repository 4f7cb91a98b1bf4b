"""Input Gram matrices for RegMean: G = X^T X per linear module, X the module's inputs (one row per
input vector, summed over every vector seen). Collected with forward pre-hooks, stored as
safetensors (module name as in the base model -> d_in x d_in float64 tensor), read back lazily
and checked one module at a time. Nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Mapping

import torch

from ._arrays import all_finite

PEFT_PREFIX = "base_model.model."
FORMAT = "knots-ext-grams"
# Linear layers PEFT adds inside a LoRA layer: not modules of the base model.
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
SYMMETRY_TOL = 1e-6


def _one_line(text) -> str:
    return " ".join(str(text).split())


class GramError(ValueError):
    """Bad Gram input or output. The message is one line: "<path>: <problem>"."""

    def __init__(self, path, problem: str):
        self.path, self.problem = os.fspath(path), _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


def base_name(name: str) -> str:
    """A module name as in the base model: without PEFT's "base_model.model." prefix and without
    the ".base_layer" a LoRA layer wraps the original Linear in."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


class GramDict(dict):
    """collect_grams' result: module name -> float64 Gram (CPU), plus `num_vectors` (module name ->
    number of input vectors summed), which save_grams writes into the file's metadata."""

    num_vectors: dict


def collect_grams(model: torch.nn.Module, batches: Iterable, module_names=None) -> GramDict:
    """G = X^T X (float64, summed over every input vector, inputs flattened to (-1, d_in)) for each
    torch.nn.Linear of `model`, or for those named in `module_names` (names as in the base model;
    PEFT-style "base_model.model." names are accepted). `batches` yields dicts (model(**batch))
    or tensors (model(batch)); they are fed as they are (move them to the model's device first).

    Runs under torch.no_grad() with model.eval() (the previous training mode is restored) and
    removes its hooks afterwards, also on error. On a PeftModel the hooks go on the wrapped
    base layers (".base_layer", whose input is the LoRA layer's input); the LoRA factors' own
    Linear layers are skipped. Every input vector counts, padding positions included: feed
    unpadded sequences if padding should not count. The Grams accumulate on the module's device
    (d_in^2 float64 each) and are returned on the CPU. A module that saw no input is left out."""
    wanted = None if module_names is None else {base_name(n) for n in module_names}
    targets = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if any(part in _LORA_PARTS for part in name.split(".")):
            continue
        key = base_name(name)
        if wanted is not None and key not in wanted:
            continue
        targets[key] = mod
    if wanted is not None:
        missing = sorted(wanted - targets.keys())
        if missing:
            raise ValueError(f"no torch.nn.Linear module named {', '.join(missing)} in the model")

    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(key, d_in):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            x = x.detach().reshape(-1, d_in).to(torch.float64)
            g = x.T @ x
            if key in grams:
                grams[key] += g
            else:
                grams[key] = g
            counts[key] = counts.get(key, 0) + x.shape[0]

        return hook

    handles = [
        mod.register_forward_pre_hook(make_hook(key, mod.in_features), with_kwargs=True) for key, mod in targets.items()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, Mapping):
                    model(**batch)
                else:
                    model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = GramDict((k, grams[k].cpu()) for k in targets if k in grams)
    out.num_vectors = {k: counts[k] for k in out}
    return out


def _fresh_name(path: str) -> str:
    parent, base = os.path.split(os.path.abspath(path))
    while True:
        p = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(p):
            return p


def save_grams(path, grams: Mapping[str, torch.Tensor], num_vectors=None, dtype=torch.float64) -> None:
    """Writes `grams` (module name -> d_in x d_in tensor) as a safetensors file at `path`: keys are
    the names as in the base model (a "base_model.model." prefix is removed), tensors `dtype`
    (float64 by default, float32 halves the size), metadata {"format": "knots-ext-grams",
    "num_vectors": JSON}. num_vectors defaults to grams.num_vectors (collect_grams' result); an
    int, or a dict giving one count per module, is stored as JSON. Written to a temporary file
    beside `path`, then renamed over it: on error nothing is left behind and an old file is
    intact."""
    path = os.fspath(path)
    if dtype not in (torch.float32, torch.float64):
        raise GramError(path, f"unsupported dtype {dtype} (float32 or float64)")
    if not grams:
        raise GramError(path, "no Grams to write")
    if os.path.isdir(path):
        raise GramError(path, "is a directory")
    if num_vectors is None:
        num_vectors = getattr(grams, "num_vectors", None)
    tensors = {}
    for name, g in grams.items():
        key = base_name(name)
        if key in tensors:
            raise GramError(path, f"module {key} is given twice")
        if not isinstance(g, torch.Tensor) or g.dim() != 2 or g.shape[0] != g.shape[1] or g.shape[0] == 0:
            shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise GramError(path, f"module {key}: a Gram must be a non-empty square 2-D tensor, got {shape}")
        if not g.is_floating_point():
            raise GramError(path, f"module {key}: a Gram must be floating point, got {g.dtype}")
        g = g.detach().to(device="cpu", dtype=dtype).contiguous()
        if not all_finite(g):
            raise GramError(path, f"module {key}: holds NaN or Inf values")
        tensors[key] = g
    meta = {"format": FORMAT}
    if num_vectors is not None:
        if isinstance(num_vectors, Mapping):
            num_vectors = {base_name(k): int(v) for k, v in num_vectors.items()}
        else:
            num_vectors = int(num_vectors)
        meta["num_vectors"] = json.dumps(num_vectors, sort_keys=True)

    from safetensors.torch import save_file

    tmp = _fresh_name(path)
    try:
        save_file(tensors, tmp, metadata=meta)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise GramError(path, f"cannot write the Grams: {e.strerror or e}") from None
        raise


class Grams:
    """A Gram file opened by load_grams: the header is read and checked at once, each Gram when
    asked for (get), so a file holding every module of a large model costs no memory up front."""

    def __init__(self, path: str, keys: dict, shapes: dict, dtypes: dict, metadata: dict):
        self.path = path
        self._keys = keys  # base-model name -> key in the file
        self._shapes = shapes
        self._dtypes = dtypes
        self.metadata = metadata
        nv = metadata.get("num_vectors")
        try:
            self.num_vectors = None if nv is None else json.loads(nv)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            raise GramError(path, "metadata num_vectors is not valid JSON") from None

    @property
    def modules(self) -> list:
        return sorted(self._shapes)

    def __contains__(self, name) -> bool:
        return base_name(name) in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def get(self, module_name: str, d_in: int) -> torch.Tensor:
        """The float64 Gram of `module_name` (as in the base model, or adapter-style with the
        "base_model.model." prefix), checked: present, square, d_in x d_in, finite, symmetric
        (max |G - G^T| <= 1e-6 * max |G|) and with a non-negative diagonal."""
        key = base_name(module_name)
        where = f"module {key}"
        if key not in self._shapes:
            raise GramError(self.path, f"{where}: no Gram in this file ({len(self._shapes)} modules)")
        shape = self._shapes[key]
        if len(shape) != 2 or shape[0] != shape[1]:
            raise GramError(self.path, f"{where}: Gram is not square, shape {list(shape)}")
        if shape[0] != d_in:
            raise GramError(self.path, f"{where}: Gram is {shape[0]} x {shape[1]}, the module's input size is {d_in}")
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                g = f.get_tensor(self._keys[key])
        except Exception as e:
            raise GramError(self.path, f"{where}: cannot read the Gram: {e}") from None
        g = g.to(torch.float64)
        if not all_finite(g):
            raise GramError(self.path, f"{where}: Gram holds NaN or Inf values")
        scale = float(g.abs().max()) if g.numel() else 0.0
        asym = float((g - g.T).abs().max()) if g.numel() else 0.0
        if asym > SYMMETRY_TOL * scale:
            raise GramError(
                self.path,
                f"{where}: Gram is not symmetric (max |G - G^T| / max |G| = {asym / scale:.3g} > {SYMMETRY_TOL:g})",
            )
        if bool((torch.diagonal(g) < 0).any()):
            raise GramError(self.path, f"{where}: Gram has a negative diagonal entry (not X^T X)")
        return g


def load_grams(path) -> Grams:
    """Opens a Gram file written by save_grams (any safetensors file of floating tensors keyed by
    module name). A missing, unreadable or corrupt file, or a non-floating tensor, raises
    GramError naming the file; the per-module checks happen in Grams.get."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GramError(path, "no such file")
    if not os.path.isfile(path):
        raise GramError(path, "not a file")
    from safetensors import safe_open

    shapes, dtypes = {}, {}
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                sl = f.get_slice(k)
                shapes[k] = tuple(sl.get_shape())
                dtypes[k] = sl.get_dtype()
    except Exception as e:
        raise GramError(path, f"not a readable safetensors file: {e}") from None
    by_name = {}
    for k in shapes:
        name = base_name(k)
        if name in by_name:
            raise GramError(path, f"module {name} appears twice")
        if dtypes[k] not in ("F64", "F32", "F16", "BF16"):
            raise GramError(path, f"module {name}: unsupported dtype {dtypes[k]} (expected floating point)")
        by_name[name] = k
    return Grams(
        path, by_name, {n: shapes[k] for n, k in by_name.items()}, {n: dtypes[k] for n, k in by_name.items()}, metadata
    )
