"""The merge engine and its result: knots_ext.merge(adapters, method=...) -> MergeResult.

Modules are processed one at a time (factors loaded lazily), so memory stays bounded by one
module's working set plus the output (for KnOTS, each module's SVD is part of the output)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import io
from ._progress import make_progress
from .linalg import DEFAULT_TOL, dense_factors, truncated_factors
from .methods import get_method
from .methods.core_space import CoreSpace
from .methods.iso import iso_c
from .methods.tsv import tsv_m
from .methods.spaces import DenseSpace, FactoredUpdate, KnotsSpace, ModuleTasks
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


def _load(adapters, alpha):
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
    if spec.dare and not 0.0 < dare_p < 1.0:
        raise ValueError(f"{method} needs dare_p in (0, 1), got {dare_p}")
    if not spec.dare and dare_p != 0.0:
        raise ValueError(f"dare_p applies to the dare methods only, not {method}")
    if top_k_scope not in ("task", "module"):
        raise ValueError(f"top_k_scope must be 'task' or 'module', got {top_k_scope!r}")
    if not top_k >= 0.0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if extra not in ("drop", "average"):
        raise ValueError(f"extra must be 'drop' or 'average', got {extra!r}")
    if not adapters:
        raise ValueError("no adapters to merge")
    device = torch.device(device)
    adapters = _load(adapters, alpha)
    io.check_compatible(adapters, force=force)
    progress = make_progress(quiet)

    names = sorted(set().union(*(a.modules for a in adapters)))

    def module_tasks(ref: "_ModuleRef") -> ModuleTasks:
        factors = [tuple(t.to(device) for t in adapters[i].factors(ref.name)) for i in ref.tasks]
        return ModuleTasks(ref.name, ref.tasks, factors, [adapters[i].scale(ref.name) for i in ref.tasks], ref.shape)

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
            out[ref.name] = rule(module_tasks(ref))
    else:
        space = {"knots": lambda: KnotsSpace(tol), "core": CoreSpace, "dense": DenseSpace}[spec.space]()
        p = dare_p if spec.dare else 0.0
        if spec.rule == "ta" or top_k_scope == "module":
            for ref in progress(modules, method):
                m = module_tasks(ref)
                state = space.prepare(m)
                rows = space.rows(m, state)
                if spec.rule == "ta":
                    merged = _merge_rows(rows, lambda r: ta_rows(r, ref, lam, p, seed))
                else:
                    merged = _merge_rows(rows, lambda r: ties_per_module(r, ref, top_k, lam, p, seed))
                out[ref.name] = space.update(ref, merged, state)
        else:
            out = _global_ties(modules, module_tasks, space, len(adapters), top_k, lam, p, seed, progress, method)

    result = MergeResult(out, method, dict(top_k=top_k, lam=lam, dare_p=dare_p, seed=seed, top_k_scope=top_k_scope,
                                           tol=tol), base_model=adapters[0].base_model,
                         fan_in_fan_out=adapters[0].fan_in_fan_out, task_type=adapters[0].config.get("task_type"))
    _merge_extra(adapters, extra, result)
    return result


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
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"regmean_alpha must be in [0, 1], got {alpha}")
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
    then a merge pass; each module's space state (its KnOTS SVD) is computed once and kept, as
    it is part of the output anyway."""
    states = {}

    def rows_of(ref):
        m = module_tasks(ref)
        if ref.name not in states:
            states[ref.name] = space.prepare(m)
        return space.rows(m, states[ref.name]), states[ref.name]

    thresholds = global_thresholds(modules, rows_of, n_tasks, top_k, dare_p, seed, progress)
    out, sign_sum, pending = {}, 0, []
    for ref in progress(modules, f"{method} merge"):
        rows, state = rows_of(ref)
        if rows[0].numel() == 0:
            merged = rows[0].new_zeros(0)
        else:
            merged, signs, zero_sum = ties_module(rows, ref, thresholds, lam, dare_p, seed)
            sign_sum += signs
            if zero_sum:
                pending.append((ref, merged, zero_sum))
        out[ref.name] = space.update(ref, merged, state)
    majority = (sign_sum > 0) - (sign_sum < 0)
    for ref, merged, zero_sum in pending:
        fix_majority(rows_of(ref)[0], ref, merged, thresholds, zero_sum, majority, lam, dare_p, seed)
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
        result.extra[key] = torch.stack([a.extra(key, dtype=torch.float32) for a in having]).mean(0)
