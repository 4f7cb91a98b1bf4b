"""The merge entry points: knots_ext.merge(adapters, method=...) -> MergeResult (in memory) and
knots_ext.merge_to(out_dir, adapters, method=...) (streamed to disk). Both check the method's
declared parameters, load the adapters lazily (one module's factors at a time, zero updates
dropped) and run the generic driver (driver.py); merge_to writes each module as soon as it is
final, so its memory is one module's working set plus the bounded store of KnOTS states."""

from __future__ import annotations

import gc
import math
import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from . import distributed, driver, factor_ops, hub, io, recipe
from ._arrays import all_finite
from ._progress import make_progress
from .device import Placement, check_device
from .driver import ModuleRef
from .linalg import Truncated, dense_factors, truncate, truncate_dense
from .methods import get_method
from .methods.spaces import DenseUpdate, FactoredUpdate, ModuleTasks, drop_zero_updates
from .weights import ModuleWeights, TaskWeights

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
    inputs: list = field(default_factory=list)  # paths of the adapters merged (save() never replaces them)
    weights: TaskWeights = field(default_factory=TaskWeights)  # the adapter and module weights applied
    sources: list = field(default_factory=list)  # recipe.sources of the inputs (their files are hashed by save())
    settings: dict = field(default_factory=dict)  # merge()'s other recipe settings (alpha, extra, force)
    format: str = "peft"  # the inputs' file format (io.formats), the default of save()'s
    conv_shapes: dict = field(default_factory=dict)  # conv modules' weight shapes (c_out, c_in, kh, kw)

    def delta(self, name: str) -> torch.Tensor:
        """The dense merged update of module `name` (d_out x d_in, float32, on the CPU)."""
        if name not in self.modules:
            raise KeyError(f"no module {name!r} in the merge result")
        return self.modules[name].dense().float().cpu()

    def factors(self, rank: int | None = None, rank_energy: float | None = None, quiet: bool = True) -> dict:
        """(B, A) per module with B @ A the update: lossless when rank and rank_energy are None,
        else truncated (see saved_factors); quiet=False: a progress bar on a terminal."""
        progress = make_progress(quiet)
        return {
            name: update_factors(self.modules[name], rank, rank_energy)
            for name in progress(self.modules, "save: factors")
        }

    def save(
        self,
        out_dir,
        rank: int | None = None,
        dtype=torch.float32,
        *,
        overwrite: bool = False,
        rank_energy: float | None = None,
        format: str | None = None,
        quiet: bool = True,
    ) -> None:
        """Writes a PEFT LoRA adapter (safetensors + adapter_config.json + the knots_merge.json
        manifest) that PEFT loads as is. out_dir must be new or empty, or an earlier knots-merge
        output with overwrite=True; it may not be or hold an input adapter (io.save_adapter).
        rank / rank_energy truncate each module (saved_factors). format: "peft", "kohya" or
        "diffusers" (io.formats), by default the inputs' format. quiet=False: a progress bar on a terminal."""
        check_rank(rank, rank_energy)
        layout = output_layout(out_dir, self.format, format, self.conv_shapes, list(self.modules))
        io.save_adapter(
            out_dir,
            self.factors(rank, rank_energy, quiet),
            extra=self.extra or None,
            **self.writer_args(out_dir, layout, rank, rank_energy, dtype, format, overwrite),
        )

    def writer_args(self, out_dir, layout, rank, rank_energy, dtype, format, overwrite) -> dict:
        """What the output records besides the tensors (io.AdapterWriter's keywords): the config's
        fields, the manifest and the recipe (knots_ext.recipe)."""
        return dict(
            base_model=self.base_model,
            fan_in_fan_out=self.fan_in_fan_out,
            dtype=dtype,
            task_type=self.task_type,
            overwrite=overwrite,
            inputs=self.inputs,
            manifest=_manifest(self.method, self.params, rank, self.inputs, self.weights, rank_energy),
            layout=layout,
            **_provenance(
                out_dir,
                self.sources,
                self.method,
                self.params,
                self.weights,
                rank=rank,
                rank_energy=rank_energy,
                dtype=dtype,
                format=format,
                **self.settings,
            ),
        )

    def fold_into(self, target, scale: float = 1.0):
        """Adds the merged updates to base weights: `target` is a torch.nn.Module (changed in place)
        or a state dict (a new dict is returned). Module names drop PEFT's "base_model.model."."""
        is_module = isinstance(target, torch.nn.Module)
        weights = dict(target.named_parameters()) if is_module else dict(target)
        for name in self.modules:
            key = (name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name) + ".weight"
            if key not in weights:
                raise KeyError(f"base weights have no {key!r} for module {name!r}")
            dW = self.delta(name) * scale
            if self.fan_in_fan_out:
                dW = dW.T
            W = weights[key]
            if W.dim() == 4 and dW.dim() == 2 and W.numel() == dW.numel():  # a conv module's update
                dW = dW.reshape(W.shape)
            if tuple(W.shape) != tuple(dW.shape):
                raise ValueError(f"{key}: base weight shape {tuple(W.shape)} != update shape {tuple(dW.shape)}")
            new = (W.detach().double() + dW.to(W.device).double()).to(W.dtype)
            if is_module:
                with torch.no_grad():
                    W.copy_(new)
            else:
                weights[key] = new
        return target if is_module else weights


def saved_factors(update, rank: int | None = None, rank_energy: float | None = None) -> Truncated:
    """A module's merged update as it is saved: factors (B, A), float32 on the CPU, lossless when
    rank and rank_energy are None; else its best approximation by at most `rank` singular
    directions and (rank_energy) the fewest that hold that fraction of its squared Frobenius norm
    (an SVD from the factors; a dense update's own SVD), with the squared norm dropped and the
    total. A lossless dense update is (W, I) (dense_factors). A zero update is a rank-1 LoRA of zeros."""
    if rank is None and rank_energy is None:
        B, A = (update.B, update.A) if isinstance(update, FactoredUpdate) else dense_factors(update.W)
        t = Truncated(B, A, 0.0, 0.0)
    elif isinstance(update, FactoredUpdate):
        t = truncate(update.B, update.A, rank, rank_energy)
    else:
        t = truncate_dense(update.W, rank, rank_energy)
    if t.B.shape[1] == 0:
        t.B, t.A = torch.zeros(t.B.shape[0], 1), torch.zeros(1, t.A.shape[1])
    t.B, t.A = t.B.float().cpu().contiguous(), t.A.float().cpu().contiguous()
    return t


def update_factors(update, rank: int | None = None, rank_energy: float | None = None) -> tuple:
    """(B, A) of saved_factors."""
    t = saved_factors(update, rank, rank_energy)
    return t.B, t.A


@dataclass
class TruncationError:
    """What truncating the saved modules cost, relative Frobenius errors ||dW - BA|| / ||dW||:
    over all modules together (sqrt(sum dropped / sum total)) and the worst module's."""

    dropped: float = 0.0
    total: float = 0.0
    worst: float = 0.0
    worst_module: str | None = None

    def add(self, module: str, t: Truncated) -> None:
        self.dropped += t.dropped
        self.total += t.total
        err = math.sqrt(t.dropped / t.total) if t.total > 0 else 0.0
        if self.worst_module is None or err > self.worst:
            self.worst, self.worst_module = err, module

    @property
    def relative(self) -> float:
        return math.sqrt(self.dropped / self.total) if self.total > 0 else 0.0


def _manifest(method: str, params: dict, rank, inputs, weights: TaskWeights | None = None, rank_energy=None) -> dict:
    """What knots_merge.json records about the merge: plain JSON values (Gram files as paths)."""
    plain = {
        k: (
            [os.fspath(g) if isinstance(g, (str, os.PathLike)) else str(g) for g in v]
            if isinstance(v, (list, tuple))
            else v
        )
        for k, v in params.items()
    }
    out = {"method": method, "params": plain, "rank": rank, "adapters": [os.fspath(p) for p in inputs]}
    if rank_energy is not None:
        out["rank_energy"] = rank_energy
    return {**out, **_weight_entries(weights)}


def _weight_entries(weights: TaskWeights | None) -> dict:
    """weights and module_weights as plain lists, where the merge had them."""
    out: dict = {}
    if weights is not None and weights.adapters is not None:
        out["weights"] = list(weights.adapters)
    if weights is not None and weights.modules.rules:
        out["module_weights"] = [list(rule) for rule in weights.modules.rules]
    return out


def _provenance(out_dir, sources, method: str, params: dict, weights: TaskWeights | None, **settings) -> dict:
    """The writer's metadata and text_files that carry the merge's recipe (knots_ext.recipe):
    settings are merge_to's keywords that shape the output (rank, rank_energy, dtype, format,
    alpha, extra, force)."""
    described = recipe.describe(sources, method, params, settings, _weight_entries(weights))
    metadata, text_files = recipe.output_parts(recipe.with_output(described, out_dir))
    return {"metadata": metadata, "text_files": text_files}


def check_rank(rank, rank_energy=None) -> None:
    """An output rank is None (lossless) or an integer >= 1; rank_energy None or in (0, 1]."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"rank must be an integer >= 1 (or None for the lossless rank), got {rank!r}")
    if rank_energy is not None and (
        isinstance(rank_energy, bool)
        or not isinstance(rank_energy, numbers.Real)
        or not 0.0 < float(rank_energy) <= 1.0
    ):
        raise ValueError(
            f"rank_energy must be a fraction in (0, 1] of each module's squared Frobenius norm, got {rank_energy!r}"
        )


# Adapters the merge takes as they are: read lazily from files, or held in memory (knots_ext.peft).
LOADED = (io.Adapter, io.MemoryAdapter)


def _load(adapters, alpha):
    if isinstance(adapters, (str, bytes, os.PathLike, *LOADED)):
        raise ValueError(
            f"adapters must be a list of adapter paths (or loaded adapters), got one "
            f"{type(adapters).__name__}: wrap it in a list"
        )
    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapters to merge")
    loaded = []
    for a in adapters:
        loaded.append(a if isinstance(a, LOADED) else io.load_adapter(hub.local_path(a), alpha=alpha))
    return loaded


@contextmanager
def _earlier_objects_frozen():
    """Python's collector leaves the objects alive before the block (torch's alone are ~170 K) out
    of its full passes inside it: each such pass costs ~70 ms here, the merge's own garbage is
    collected as usual. Only when nothing is frozen yet (gc.freeze is the process's: a caller's
    own freeze is left alone); unfrozen after. Used as merge's and merge_to's decorator."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_earlier_objects_frozen()
def merge(
    adapters,
    method: str = "knots-ties",
    *,
    device="cpu",
    alpha: float | None = None,
    force: bool = False,
    extra: str = "drop",
    quiet: bool = True,
    weights=None,
    module_weights=None,
    executor: str = "local",
    ray_address: str | None = None,
    **params,
) -> MergeResult:
    """Merges n LoRA adapters (paths or loaded io.Adapter objects) into one, with `method` one
    of knots_ext.methods.METHODS (DESIGN.md §1 defines each exactly). `params` are the method's
    declared parameters (METHODS[method].params: name, default, range, help), e.g.

    top_k: TIES keeps this fraction of each task's entries (threshold global per task over all
    modules with top_k_scope="task", per module with "module"); lam scales the merged update;
    dare_p, seed: DARE's drop probability (dare-* methods) and mask seed; tol: KnOTS drops
    singular values <= tol (and the numerical rank of iso-c / iso-cts); regmean: grams, one Gram
    file (or loaded knots_ext.grams.Grams) per adapter, and regmean_alpha; iso-cts:
    common_fraction. A parameter the method does not take is refused unless left at its default.

    alpha: lora_alpha for bare .safetensors files; force: merge adapters of different base
    models; extra: "drop" or "average" the non-LoRA tensors (modules_to_save); device: "cpu" or
    "cuda[:N]"; quiet: no progress bar.

    weights: one number per adapter, adapter i's update scaled by weights[i] before the method
    runs (as if its lora_alpha were multiplied by it; negative: task negation). module_weights:
    (regex, weight) rules, a {regex: weight} dict or "REGEX=W" strings; a module's updates are
    scaled, on top of the adapter weights, by the first rule whose regex re.search-matches its name
    (without "base_model.model."), 1 when none does.

    executor: "local" (this process) or "ray": the per-module work in Ray tasks (pip install
    'knots-ext[ray]'; knots_ext.distributed), on the Ray this process is connected to, else the
    cluster at ray_address ("host:port"), else a local Ray started for the merge. The same result
    to the bit; the adapters must be paths every worker can read; CPU only.
    """
    spec, declared, device, adapters, task_weights = _prepare(
        adapters, method, params, device, alpha, force, extra, weights, module_weights
    )
    distributed.check_executor(executor, device, adapters)
    result = _result_of(method, declared, adapters, task_weights, alpha, extra, force)
    out: dict = {}
    with _executor(executor, ray_address, method, declared, adapters, alpha, force, task_weights, device) as passes:
        run_merge(
            spec,
            _setup(spec, declared, adapters),
            adapters,
            device,
            lambda ref, update: out.__setitem__(ref.name, update),
            quiet,
            task_weights,
            passes=passes,
        )
    result.modules = dict(sorted(out.items()))
    result.extra, result.dropped_extra = _merge_extra(adapters, extra)
    return result


def _result_of(method, declared, adapters, task_weights, alpha, extra, force) -> MergeResult:
    """The MergeResult of a merge of these adapters, its modules still to come."""
    return MergeResult(
        {},
        method,
        declared,
        base_model=adapters[0].base_model,
        fan_in_fan_out=adapters[0].fan_in_fan_out,
        task_type=adapters[0].config.get("task_type"),
        inputs=[a.path for a in adapters],
        weights=task_weights,
        sources=recipe.sources(adapters),
        settings={"alpha": alpha, "extra": extra, "force": force},
        format=_input_format(adapters),
        conv_shapes=_conv_shapes(adapters),
    )


@dataclass
class MergeSummary:
    """What merge_to wrote: the output folder, the modules merged and the non-LoRA tensors left out."""

    out_dir: str
    modules: list
    dropped_extra: list
    truncation: TruncationError | None = None  # with rank or rank_energy: what the truncation cost


@_earlier_objects_frozen()
def merge_to(
    out_dir,
    adapters,
    method: str = "knots-ties",
    *,
    rank: int | None = None,
    dtype=torch.float32,
    overwrite: bool = False,
    rank_energy: float | None = None,
    device="cpu",
    alpha: float | None = None,
    force: bool = False,
    extra: str = "drop",
    quiet: bool = True,
    weights=None,
    module_weights=None,
    format: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    **params,
) -> MergeSummary:
    """merge() straight to a PEFT adapter folder (MergeResult.save's rules for out_dir, checked
    before the merge starts): each module's factors are written as soon as they are final, so the
    merge never holds its whole result. rank and rank_energy truncate each module (saved_factors;
    both None: lossless); the summary's `truncation` says what that cost. format: the output's
    file format, "peft", "kohya" or "diffusers" (io.formats), by default the inputs'. executor,
    ray_address: merge()'s."""
    check_rank(rank, rank_energy)
    spec, declared, device, adapters, task_weights = _prepare(
        adapters, method, params, device, alpha, force, extra, weights, module_weights
    )
    distributed.check_executor(executor, device, adapters)
    header = _result_of(method, declared, adapters, task_weights, alpha, extra, force)
    io.check_output(out_dir, inputs=header.inputs, overwrite=overwrite)
    layout = output_layout(
        out_dir, header.format, format, header.conv_shapes, {m: a.path for a in adapters for m in a.modules}
    )
    params = _setup(spec, declared, adapters)
    names: list = []
    with io.AdapterWriter(
        out_dir,
        reserve_keys=_tensor_keys(adapters, extra, layout, out_dir),
        **header.writer_args(out_dir, layout, rank, rank_energy, dtype, format, overwrite),
    ) as writer:
        truncation = None if rank is None and rank_energy is None else TruncationError()
        patcher = _WrittenRows(writer) if truncation is None and device.type == "cpu" else None

        def emit(ref, update):
            t = patcher.saved.pop(ref.name, None) if patcher else None
            t = t or saved_factors(update, rank, rank_energy)
            # run_merge checked the update finite; lossless factors are its own values (or I)
            writer.add(ref.name, t.B, t.A, finite=truncation is None)
            if truncation is not None:
                truncation.add(ref.name, t)
            names.append(ref.name)

        # The writer has written each update to the file when emit returns: its buffers are free.
        with _executor(executor, ray_address, method, declared, adapters, alpha, force, task_weights, device) as passes:
            run_merge(
                spec, params, adapters, device, emit, quiet, task_weights, consumed=True, patcher=patcher, passes=passes
            )
        merged_extra, dropped = _merge_extra(adapters, extra)
        for key in sorted(merged_extra):
            writer.add_extra(key, merged_extra[key])
    return MergeSummary(os.fspath(out_dir), sorted(names), dropped, truncation)


class _WrittenRows(driver.Patcher):
    """merge_to's lossless output as a driver.Patcher: a module's merged rows are written verbatim
    as its lossless factor (dW as B or A of (dW, I); a KnOTS module's merged rows as A), so TIES
    entries decided after the module was written are rewritten in the file."""

    def __init__(self, writer):
        self.writer = writer
        self.saved: dict = {}  # module -> its saved_factors, made by accepts for emit
        self.which: dict = {}  # module -> "B" or "A": the factor that is the merged rows

    def accepts(self, ref, update) -> bool:
        rows = update.W if isinstance(update, DenseUpdate) else update.A
        t = saved_factors(update)
        which = "B" if t.B is rows else "A" if t.A is rows else None  # (a zero update: not written as is)
        if which is None:  # held by the driver; emitted, and saved anew, once its rows are final
            return False
        self.saved[ref.name], self.which[ref.name] = t, which
        return True

    def apply(self, ref, positions, values) -> None:
        self.writer.patch(ref.name, self.which.pop(ref.name), positions, values)


def _tensor_keys(adapters, extra: str, layout: io.OutputLayout, out_dir) -> list:
    """Every key the merged adapter file will hold (room for its header is kept up front)."""
    names = set().union(*(a.modules for a in adapters))
    keys = [key for n in names for key in layout.keys(os.fspath(out_dir), n)]
    return keys + (sorted(set().union(*(a.extra_tensors for a in adapters))) if extra == "average" else [])


def _input_format(adapters) -> str:
    """The adapters' file format (check_compatible refused a mix); in-memory adapters are PEFT's."""
    return getattr(adapters[0], "format", "peft")


def _conv_shapes(adapters) -> dict:
    """{module: (c_out, c_in, kh, kw)} of the conv modules, merged as their 2-D factors."""
    shapes = {}
    for a in adapters:
        if hasattr(a, "conv_shape"):
            shapes.update({m: a.conv_shape(m) for m in a.modules if a.conv_shape(m) is not None})
    return shapes


def output_layout(out_dir, source: str, fmt: str | None, conv_shapes: dict, modules) -> io.OutputLayout:
    """How a merge of `source`-format adapters is written in `fmt` (None: `source`), with every
    module's name in that format checked now, before a long merge (one AdapterError if one has
    none, e.g. an SDXL kohya name written as diffusers, naming the adapter file of the module
    when `modules` maps each to one, else out_dir)."""
    layout = io.OutputLayout(fmt or source, source, conv_shapes, modules)
    where = modules if isinstance(modules, dict) else {}
    for m in sorted(modules):
        layout.keys(os.fspath(where.get(m, out_dir)), m)
    return layout


def _prepare(adapters, method, params, device, alpha, force, extra, weights=None, module_weights=None):
    """The checks shared by merge and merge_to: (method, its validated parameters, device, loaded
    adapters, their TaskWeights)."""
    spec = get_method(method)
    declared = spec.check(params)
    if extra not in ("drop", "average"):
        raise ValueError(f"extra must be 'drop' or 'average', got {extra!r}")
    device = check_device(device, needs_kernels=spec.space is not None)
    rules = ModuleWeights.parse(module_weights)
    adapters = _load(adapters, alpha)
    io.check_compatible(adapters, force=force)
    return spec, declared, device, adapters, TaskWeights.of(weights, len(adapters), rules)


def _setup(spec, declared: dict, adapters: list) -> dict:
    return declared if spec.setup is None else spec.setup(declared, adapters)


@contextmanager
def _executor(executor: str, address, method, declared, adapters, alpha, force, weights, device):
    """driver.run's passes for `executor` (checked): None (here) or on Ray, connected for the merge."""
    if executor == "local":
        yield None
        return
    with distributed.cluster(address) as ray:
        yield distributed.passes_for(ray, [a.path for a in adapters], method, declared, alpha, force, weights)


def run_merge(
    spec,
    params: dict,
    adapters: list,
    device,
    emit,
    quiet: bool = True,
    weights: TaskWeights | None = None,
    consumed: bool = False,
    patcher: driver.Patcher | None = None,
    passes=None,
) -> None:
    """The merge of loaded adapters, each module's update handed to emit(ref, update) as soon as
    it is final (checked finite). weights scale each adapter's update of each module. consumed:
    emit keeps no reference to an update once it returns; patcher: emit's consumer can rewrite
    entries of a module's merged rows later; passes: where the per-module work runs (driver.run)."""
    weights = weights or TaskWeights()
    names = sorted(set().union(*(a.modules for a in adapters)))
    modules = []
    for name in names:
        tasks = [i for i, a in enumerate(adapters) if name in a.modules]
        modules.append(ModuleRef(name, tasks, tuple(adapters[tasks[0]].shape(name))))

    placement = Placement(device, spec)
    load = module_loader(adapters, weights, placement)

    def checked(ref, update):
        _check_finite(ref, update, adapters, params.get("lam"))
        emit(ref, update)

    try:
        with placement.results(checked) as deliver:
            driver.run(
                spec, params, modules, load, len(adapters), deliver, make_progress(quiet), consumed, patcher, passes
            )
    except ValueError as e:
        if isinstance(e, io.AdapterError) or "NaN or Inf" not in str(e):  # (a bad input names its file)
            raise
        _blame_nonfinite(modules, load, spec.space(params), adapters, e)


def module_loader(adapters: list, weights: TaskWeights, placement: Placement):
    """load(ref): the module's tasks with a non-zero update (factors loaded now, on the merge device)."""

    def load(ref: ModuleRef) -> ModuleTasks:
        loaded = [adapters[i].merge_factors(ref.name) for i in ref.tasks]
        factors = [(B, A) for B, A, _ in loaded]
        scales = [adapters[i].scale(ref.name) * w for i, w in zip(ref.tasks, weights.scales(ref.tasks, ref.name))]
        m = ModuleTasks(ref.name, ref.tasks, factors, scales, ref.shape)
        return placement.load(drop_zero_updates(m, [zero for _, _, zero in loaded]))

    return load


def _check_finite(ref, update, adapters, lam) -> None:
    """Refuses a merged update that overflowed float32, naming the module, its inputs and lam
    (the inputs are known to be finite: the reader refuses NaN and Inf)."""
    parts = (update.B, update.A) if isinstance(update, FactoredUpdate) else (update.W,)
    if all(all_finite(t) for t in parts):
        return
    paths = ", ".join(str(adapters[i].path) for i in ref.tasks)
    raise ValueError(
        f"module {ref.name}: the merged update overflows float32 with lam={lam}; the inputs "
        f"({paths}) are finite, so their updates times lam are too large: lower lam or check "
        "those adapters' lora_alpha"
    )


def _blame_nonfinite(modules, load, space, adapters, error) -> None:
    """A kernel saw NaN or Inf in the task rows: finite factors whose update overflows float32.
    Finds the module and adapter and says so (only on this error path: it reads every module)."""
    for ref in modules:
        m = load(ref)
        if not m.tasks:
            continue
        factors = space.row_factors(m, space.prepare(m))
        for j, t in enumerate(m.tasks):
            if not factor_ops.is_finite(factors[j]):
                raise ValueError(
                    f"{adapters[t].path}: module {ref.name}: its update (scale {m.scales[j]} x "
                    f"lora_B x lora_A) overflows float32 in the {space.name} space"
                ) from None
    raise ValueError(f"the task updates overflow float32 after DARE's rescaling 1/(1-dare_p) ({error})") from None


def _merge_extra(adapters, extra: str) -> tuple[dict, list]:
    """(merged non-LoRA tensors, the keys left out): extra="average" averages each key over the
    adapters that have it (same shapes required), "drop" leaves every key out."""
    keys = sorted(set().union(*(a.extra_tensors for a in adapters)))
    if extra == "drop":
        return {}, keys
    merged = {}
    for key in keys:
        having = [a for a in adapters if key in a.extra_tensors]
        tensors = [a.extra(key, dtype=torch.float32) for a in having]
        for a, t in zip(having, tensors):
            if t.shape != tensors[0].shape:
                raise io.AdapterError(
                    a.path,
                    f"extra tensor {key}: shape {list(t.shape)} differs from "
                    f"{list(tensors[0].shape)} in {having[0].path}; cannot average them",
                )
        merged[key] = torch.stack(tensors).mean(0)
    return merged, []
