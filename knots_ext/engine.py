"""The merge engine and its result: knots_ext.merge(adapters, method=...) -> MergeResult.

Modules are processed one at a time (factors loaded lazily), so memory stays bounded by one
module's working set plus the output (for KnOTS, each module's SVD is part of the output)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

import torch

from . import _C, io
from ._progress import make_progress
from .linalg import DEFAULT_TOL, dense_factors, truncated_factors
from .methods import get_method
from .methods.core_space import CoreSpace
from .methods.iso import iso_c
from .methods.tsv import tsv_m
from .methods.spaces import DenseSpace, FactoredUpdate, KnotsSpace, ModuleTasks, drop_zero_updates, zero_update
from .methods.ta import factored_ta, ta_rows
from .methods.ties import fix_majority, global_thresholds, ties_module, ties_per_module

PEFT_PREFIX = "base_model.model."


@dataclass
class MergeResult:
    """The merged adapter: one update per module, factored (B @ A) or dense."""

    modules: dict
    method: str
    params: dict
    base_model: str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    extra: dict = field(default_factory=dict)  # merged non-LoRA tensors (extra="average")
    dropped_extra: list = field(default_factory=list)  # non-LoRA tensors left out

    def delta(self, name: str) -> torch.Tensor:
        """The dense merged update of module `name` (d_out x d_in, float32, on the CPU)."""
        if name not in self.modules:
            raise KeyError(f"no module {name!r} in the merge result")
        return self.modules[name].dense().float().cpu()

    def factors(self, rank: int | None = None) -> dict:
        """(B, A) per module with B @ A the update: lossless when rank is None, else the best
        rank-`rank` approximation (an SVD from the factors; dense updates are factored by SVD)."""
        out = {}
        for name, upd in self.modules.items():
            if isinstance(upd, FactoredUpdate):
                B, A = (upd.B, upd.A) if rank is None else truncated_factors(upd.B, upd.A, rank)
            else:
                B, A = dense_factors(upd.W, rank)
            if B.shape[1] == 0:  # an all-zero update still needs a rank-1 LoRA
                B, A = torch.zeros(B.shape[0], 1), torch.zeros(1, A.shape[1])
            out[name] = (B.float().cpu().contiguous(), A.float().cpu().contiguous())
        return out

    def save(self, out_dir, rank: int | None = None, dtype=torch.float32) -> None:
        """Writes a PEFT LoRA adapter (safetensors + adapter_config.json) that PEFT loads as is."""
        check_rank(rank)
        io.save_adapter(out_dir, self.factors(rank), base_model=self.base_model,
                        fan_in_fan_out=self.fan_in_fan_out, extra=self.extra or None, dtype=dtype,
                        task_type=self.task_type)

    def fold_into(self, target, scale: float = 1.0):
        """Adds the merged updates to base weights: `target` is a torch.nn.Module (changed in place)
        or a state dict (a new dict is returned). Module names drop PEFT's "base_model.model."."""
        is_module = isinstance(target, torch.nn.Module)
        weights = dict(target.named_parameters()) if is_module else dict(target)
        for name in self.modules:
            key = (name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name) + ".weight"
            if key not in weights:
                raise KeyError(f"base weights have no {key!r} for module {name!r}")
            dW = self.delta(name) * scale
            if self.fan_in_fan_out:
                dW = dW.T
            W = weights[key]
            if tuple(W.shape) != tuple(dW.shape):
                raise ValueError(f"{key}: base weight shape {tuple(W.shape)} != update shape {tuple(dW.shape)}")
            new = (W.detach().double() + dW.to(W.device).double()).to(W.dtype)
            if is_module:
                with torch.no_grad():
                    W.copy_(new)
            else:
                weights[key] = new
        return target if is_module else weights


def check_rank(rank) -> None:
    """An output rank is None (lossless) or an integer >= 1."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (or None for the lossless rank), got {rank!r}")


def _load(adapters, alpha):
    if isinstance(adapters, (str, bytes, os.PathLike, io.Adapter)):
        raise ValueError(f"adapters must be a list of adapter paths (or loaded adapters), got one "
                         f"{type(adapters).__name__}: wrap it in a list")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapters to merge")
    loaded = []
    for a in adapters:
        loaded.append(a if isinstance(a, io.Adapter) else io.load_adapter(a, alpha=alpha))
    return loaded


def merge(adapters, method: str = "knots-ties", top_k: float = 1.0, lam: float = 1.0, dare_p: float = 0.0,
          seed: int = 0, device="cpu", *, top_k_scope: str = "task", tol: float = DEFAULT_TOL,
          alpha: float | None = None, force: bool = False, extra: str = "drop", quiet: bool = True,
          grams=None, regmean_alpha: float = 0.9, common_fraction: float | None = None) -> MergeResult:
    """Merges n LoRA adapters (paths or loaded io.Adapter objects) into one, with `method` one
    of knots_ext.methods.METHODS (DESIGN.md §1 defines each exactly):

    top_k: TIES keeps this fraction of each task's entries (threshold global per task over all
    modules with top_k_scope="task", per module with "module"); lam scales the merged update;
    dare_p, seed: DARE's drop probability (dare-* methods only) and mask seed; tol: KnOTS drops
    singular values <= tol (and the numerical rank of iso-c / iso-cts); alpha: lora_alpha for
    bare .safetensors files; force: merge adapters of different base models; extra: "drop" or
    "average" the non-LoRA tensors (modules_to_save). regmean: grams, one Gram file (or loaded
    knots_ext.grams.Grams) per adapter, and regmean_alpha, the off-diagonal scale; iso-cts:
    common_fraction, the share of the rank given to the common subspace (None: the paper's).
    """
    spec = get_method(method)
    _check_params(spec, top_k=top_k, lam=lam, dare_p=dare_p, seed=seed, top_k_scope=top_k_scope, tol=tol,
                  extra=extra, regmean_alpha=regmean_alpha, common_fraction=common_fraction)
    device = _check_device(device, needs_kernels=spec.space != "factors")
    adapters = _load(adapters, alpha)
    io.check_compatible(adapters, force=force)
    progress = make_progress(quiet)

    names = sorted(set().union(*(a.modules for a in adapters)))

    def module_tasks(ref: "_ModuleRef") -> ModuleTasks:
        """The module's tasks with a non-zero update (factors loaded now, on the merge device)."""
        factors = [tuple(t.to(device) for t in adapters[i].factors(ref.name)) for i in ref.tasks]
        scales = [adapters[i].scale(ref.name) for i in ref.tasks]
        return drop_zero_updates(ModuleTasks(ref.name, ref.tasks, factors, scales, ref.shape))

    modules = []
    for name in names:
        tasks = [i for i, a in enumerate(adapters) if name in a.modules]
        modules.append(_ModuleRef(name, tasks, tuple(adapters[tasks[0]].shape(name))))
    out = {}
    if spec.space == "factors":
        if spec.rule == "regmean":
            rule = _regmean_rule(grams, len(adapters), regmean_alpha, lam)
        elif spec.rule == "iso-cts":
            rule = _iso_cts_rule(lam, tol, common_fraction)
        else:
            rule = {"ta": lambda m: factored_ta(m, lam), "iso-c": lambda m: iso_c(m, lam, tol),
                    "tsv-m": lambda m: tsv_m(m, lam)}[spec.rule]
        for ref in progress(modules, method):
            m = module_tasks(ref)
            out[ref.name] = rule(m) if m.tasks else zero_update(m)
    else:
        space = {"knots": lambda: KnotsSpace(tol), "core": CoreSpace, "dense": DenseSpace}[spec.space]()
        try:
            out = _merge_in_space(space, spec, modules, module_tasks, len(adapters), top_k, top_k_scope, lam,
                                  dare_p if spec.dare else 0.0, seed, progress)
        except ValueError as e:
            if "NaN or Inf" not in str(e):
                raise
            _blame_nonfinite(modules, module_tasks, space, adapters, e)
    for ref in modules:
        _check_finite(ref, out[ref.name], adapters, lam)

    result = MergeResult(out, method, dict(top_k=top_k, lam=lam, dare_p=dare_p, seed=seed, top_k_scope=top_k_scope,
                                           tol=tol), base_model=adapters[0].base_model,
                         fan_in_fan_out=adapters[0].fan_in_fan_out, task_type=adapters[0].config.get("task_type"))
    _merge_extra(adapters, extra, result)
    return result


def _merge_in_space(space, spec, modules, module_tasks, n_tasks, top_k, top_k_scope, lam, dare_p, seed,
                    progress) -> dict:
    """TA or TIES on task rows in a space (dense, KnOTS, Core): per module, or with TIES's
    thresholds global per task."""
    if spec.rule == "ties" and top_k_scope == "task":
        return _global_ties(modules, module_tasks, space, n_tasks, top_k, lam, dare_p, seed, progress, spec.name)
    out = {}
    for ref in progress(modules, spec.name):
        m = module_tasks(ref)
        if not m.tasks:
            out[ref.name] = zero_update(m)
            continue
        state = space.prepare(m)
        rows = space.rows(m, state)
        if spec.rule == "ta":
            merged = _merge_rows(rows, lambda r: ta_rows(r, m, lam, dare_p, seed))
        else:
            merged = _merge_rows(rows, lambda r: ties_per_module(r, m, top_k, lam, dare_p, seed))
        out[ref.name] = space.update(m, merged, state)
    return out


def _check_finite(ref, update, adapters, lam) -> None:
    """Refuses a merged update that overflowed float32, naming the module, its inputs and lam
    (the inputs are known to be finite: the reader refuses NaN and Inf)."""
    parts = (update.B, update.A) if isinstance(update, FactoredUpdate) else (update.W,)
    if all(bool(torch.isfinite(t).all()) for t in parts):
        return
    paths = ", ".join(str(adapters[i].path) for i in ref.tasks)
    raise ValueError(f"module {ref.name}: the merged update overflows float32 with lam={lam}; the inputs "
                     f"({paths}) are finite, so their updates times lam are too large: lower lam or check "
                     "those adapters' lora_alpha")


def _blame_nonfinite(modules, module_tasks, space, adapters, error) -> None:
    """A kernel saw NaN or Inf in the task rows: finite factors whose update overflows float32.
    Finds the module and adapter and says so (only on this error path: it reads every module)."""
    for ref in modules:
        m = module_tasks(ref)
        if not m.tasks:
            continue
        for row, t, s in zip(space.rows(m, space.prepare(m)), m.tasks, m.scales):
            if not bool(torch.isfinite(row).all()):
                raise ValueError(f"{adapters[t].path}: module {ref.name}: its update (scale {s} x lora_B x "
                                 f"lora_A) overflows float32 in the {space.name} space") from None
    raise ValueError(f"the task updates overflow float32 after DARE's rescaling 1/(1-dare_p) ({error})") from None


def _check_params(spec, *, top_k, lam, dare_p, seed, top_k_scope, tol, extra, regmean_alpha,
                  common_fraction) -> None:
    """Refuses, with one line naming the parameter, every value that would silently mean
    something else (a percent for top_k, a NaN lam, ...)."""
    def number(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return float(value)

    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be in (0, 1], got {top_k} (top_k is a fraction: 20% is 0.2)")
    number("lam", lam)
    if spec.dare and not 0.0 < number("dare_p", dare_p) < 1.0:
        raise ValueError(f"{spec.name} needs dare_p in (0, 1), got {dare_p}")
    if not spec.dare and dare_p != 0.0:
        raise ValueError(f"dare_p applies to the dare methods only, not {spec.name}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    if number("tol", tol) < 0.0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if top_k_scope not in ("task", "module"):
        raise ValueError(f"top_k_scope must be 'task' or 'module', got {top_k_scope!r}")
    if extra not in ("drop", "average"):
        raise ValueError(f"extra must be 'drop' or 'average', got {extra!r}")
    if not 0.0 <= number("regmean_alpha", regmean_alpha) <= 1.0:
        raise ValueError(f"regmean_alpha must be in [0, 1], got {regmean_alpha}")
    if common_fraction is not None and not 0.0 <= number("common_fraction", common_fraction) <= 1.0:
        raise ValueError(f"common_fraction must be in [0, 1], got {common_fraction}")


def _check_device(device, needs_kernels: bool) -> torch.device:
    """The merge device, or a one-line ValueError: unknown names, CUDA without a device or
    without the CUDA build of the kernels."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported (cpu or cuda)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if needs_kernels and not _C.build_info()["cuda_compiled"]:
        raise ValueError(f"device {device!r}: knots_ext was built without its CUDA kernels "
                         "(reinstall with KNOTS_EXT_CUDA=1 where nvcc is available)")
    return dev


def _iso_cts_rule(lam, tol, common_fraction):
    from .methods.iso import iso_cts

    if common_fraction is None:
        return lambda m: iso_cts(m, lam, tol)
    return lambda m: iso_cts(m, lam, tol, common_fraction=common_fraction)


def _regmean_rule(grams, n_adapters: int, alpha: float, lam: float):
    """RegMean per module, with each task's Gram of that module's inputs from its Gram file."""
    from .grams import Grams, load_grams
    from .methods.regmean import module_grams, regmean

    if grams is None or len(grams) != n_adapters:
        raise ValueError(f"regmean needs one Gram file per adapter (--grams): got "
                         f"{0 if grams is None else len(grams)} for {n_adapters} adapters")
    loaded = [g if isinstance(g, Grams) else load_grams(g) for g in grams]
    return lambda m: regmean(m, module_grams(loaded, m), alpha, lam)


@dataclass
class _ModuleRef:
    """A module's name, the adapters that have it and its (d_out, d_in): what the passes carry
    from module to module (the factors themselves are loaded when needed)."""

    name: str
    tasks: list
    shape: tuple


def _global_ties(modules, module_tasks, space, n_tasks, top_k, lam, dare_p, seed, progress, method):
    """TIES with per-task thresholds over all modules: a threshold pass (one or two rounds),
    then a merge pass, then the global majority sign at the positions whose trimmed sum was
    exactly 0; only then are the merged rows mapped back (space.update), so the fix reaches
    every space. Each module's space state (its KnOTS SVD) is computed once and kept, as it is
    part of the output anyway."""
    states = {}

    def rows_of(ref):
        m = module_tasks(ref)
        if not m.tasks:
            return m, [], None
        if ref.name not in states:
            states[ref.name] = space.prepare(m)
        return m, space.rows(m, states[ref.name]), states[ref.name]

    thresholds = global_thresholds(modules, rows_of, n_tasks, top_k, dare_p, seed, progress)
    merged_rows, sign_sum, pending = {}, 0, []
    for ref in progress(modules, f"{method} merge"):
        m, rows, _ = rows_of(ref)
        if not rows or rows[0].numel() == 0:
            merged_rows[ref.name] = None if not rows else rows[0].new_zeros(0)
            continue
        merged, signs, zero_sum = ties_module(rows, m, thresholds, lam, dare_p, seed)
        sign_sum += signs
        merged_rows[ref.name] = merged
        if zero_sum:
            pending.append((ref, zero_sum))
    majority = (sign_sum > 0) - (sign_sum < 0)
    for ref, zero_sum in pending:
        m, rows, _ = rows_of(ref)
        fix_majority(rows, m, merged_rows[ref.name], thresholds, zero_sum, majority, lam, dare_p, seed)
    out = {}
    for ref in modules:
        merged = merged_rows[ref.name]
        out[ref.name] = zero_update(ref) if merged is None else space.update(ref, merged, states[ref.name])
    return out


def _merge_rows(rows, rule):
    return rows[0].new_zeros(0) if rows[0].numel() == 0 else rule(rows)


def _merge_extra(adapters, extra: str, result: MergeResult) -> None:
    keys = sorted(set().union(*(a.extra_tensors for a in adapters)))
    if extra == "drop":
        result.dropped_extra = keys
        return
    for key in keys:
        having = [a for a in adapters if key in a.extra_tensors]
        tensors = [a.extra(key, dtype=torch.float32) for a in having]
        for a, t in zip(having, tensors):
            if t.shape != tensors[0].shape:
                raise io.AdapterError(a.path, f"extra tensor {key}: shape {list(t.shape)} differs from "
                                              f"{list(tensors[0].shape)} in {having[0].path}; cannot average them")
        result.extra[key] = torch.stack(tensors).mean(0)
