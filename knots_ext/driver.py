"""The generic merge driver: one code path for every method and space.

A method either merges each module's LoRA factors itself (rule(m, params) -> update), or runs TA
or TIES on the task rows of a space, which the space gives as factors (row_i = s_i P_i @ Q_i,
knots_ext.factor_ops) so that no task's row is ever stored whole. TIES with the trim threshold
global per task takes two passes: the thresholds (on the CPU a 1/16 sample that brackets them
and one exact pass; elsewhere, or where a bracket misses, one or two radix rounds), then the
merge; each module's factors are loaded once for all of them where they fit (LoadCache).
Positions whose trimmed sum is exactly 0 wait for the majority sign of all modules, so only the
modules holding such positions are kept until the end; every other module is handed to `emit`
as soon as it is final (streamed to disk by the CLI)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from . import factor_ops, ops
from .device import format_bytes
from .methods.spaces import ModuleTasks, zero_update

# Space states (a module's KnOTS SVD) kept in memory between the passes of global TIES, in bytes;
# the others wait in a temporary folder. At n = 256 rank-16 adapters a 4096-wide KnOTS module's
# state is ~128 MB, so keeping them all would grow with n and with the model.
STATE_MEMORY = 256 << 20
# Loaded factors (float32, checked) kept between those passes, in bytes; the others are read from
# the adapters again (no temporary copy: the adapter files are the copy). A module's factors are
# n r (d_out + d_in) floats: at n = 8 a Llama-3-8B layer's q, k, v, o are 13 MiB.
FACTOR_MEMORY = 128 << 20
# Global TIES's bases (one SVD per module) are computed side by side, as many modules at a time as
# torch has threads and BASES_MEMORY holds. With at most this many tasks in every module, each
# basis with one torch thread: small bases' linear algebra (k x k cores, d x k products) gains
# little from threads, and their Python between products holds the GIL (n = 8 rank-16 on 2 cores:
# 1.43 -> 1.18 s for 32 layers); their bits then do not depend on the thread count. More tasks:
# torch's threads shared among the bases side by side (n = 64 on 2 cores, one thread each: the
# eigendecompositions' memory-bound halves overlap, 93 -> ~80 s for 32 layers, ~350 MB more held).
BASES_ONE_THREAD_MAX_TASKS = 16
# What the bases side by side may hold at once, in bytes: a basis's working set is estimated as
# 4x its state (its float64 temporaries), scaled from the first module to the widest; with many
# threads or large bases, fewer workers.
BASES_MEMORY = 512 << 20


def bases_threads(modules: list, workers: int = 1) -> int | None:
    """The torch threads global TIES computes a module's basis with, `workers` bases side by side:
    1 when every module has at most BASES_ONE_THREAD_MAX_TASKS tasks, else torch's threads shared
    among the workers (None: torch's setting). Ray's workers follow it, so that their bits are
    this process's."""
    if all(len(ref.tasks) <= BASES_ONE_THREAD_MAX_TASKS for ref in modules):
        return 1
    return None if workers <= 1 else max(1, torch.get_num_threads() // workers)


def bases_workers(ref, state_bytes: int | None, widest: int) -> int:
    """How many bases global TIES computes side by side after the first module with tasks, `ref`
    (its state `state_bytes` in all, None when it is not on the CPU: one at a time): at most
    torch's threads, and as many as BASES_MEMORY holds with one more in flight. widest: the
    modules' largest d_out + d_in."""
    if state_bytes is None:
        return 1
    one = 4 * widest / max(1, sum(ref.shape)) * state_bytes
    return min(torch.get_num_threads(), max(1, int(BASES_MEMORY // max(one, 1.0)) - 1))


def count_rows(sel, counted: set, module: str, tasks: list, factors: list, dare_p: float, seed: int) -> None:
    """Adds to sel's open round the rows of a module's tasks that it counts (counted:
    MagnitudeThreshold.counted()), the others left out: after a sampled window missed, the rounds
    that follow count only the tasks that missed (at n = 1000 a few), whose rows are all that is
    computed."""
    if not all(t in counted for t in tasks):
        keep = [j for j, t in enumerate(tasks) if t in counted]
        tasks, factors = [tasks[j] for j in keep], [factors[j] for j in keep]
    if tasks:
        factor_ops.histogram(sel, factors, dare_p, seed, module, tasks)


def load_counted(space, load, ref: ModuleRef, counted: set | None) -> ModuleTasks | None:
    """ref's module with only the tasks a threshold round counts loaded, when that leaves some
    out and the space's rows need nothing of the other tasks (rows_per_task); else None."""
    if counted is None or counted.issuperset(ref.tasks) or not getattr(space, "rows_per_task", False):
        return None
    return load(replace(ref, tasks=[t for t in ref.tasks if t in counted]))


def free_bytes(folder: str) -> int:
    """Bytes free on folder's disk."""
    return shutil.disk_usage(folder).free


def cpu_state_bytes(state) -> int | None:
    """The bytes of a space state's tensors, None when any is off the CPU."""
    tensors = _flatten(state)[0]
    if any(t.device.type != "cpu" for t in tensors):
        return None
    return _nbytes(tensors)


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op threads set to `threads` (None: left alone) inside the block."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class ModuleRef:
    """A module's name, the adapters that have it and its (d_out, d_in): what the passes carry
    from module to module (the factors themselves are loaded when needed)."""

    name: str
    tasks: list
    shape: tuple


class StateStore:
    """Each module's space state between passes: in memory up to `budget` bytes, the rest in a
    temporary folder (under TMPDIR), one raw file per module (its tensors' bytes at 64-byte
    aligned offsets; the dtypes, shapes and offsets stay in memory: no pickles, no headers to
    parse), read back when the module is visited again. A write that fails (a full disk) is an
    OSError naming the folder and TMPDIR; check_room fails before any is written where the
    states clearly will not fit."""

    def __init__(self, budget: int | None = None):
        self.budget, self.used = STATE_MEMORY if budget is None else budget, 0
        self.memory: dict = {}
        self.on_disk: dict = {}
        self.folder: str | None = None

    def __contains__(self, name) -> bool:
        return name in self.memory or name in self.on_disk

    def put(self, name: str, state) -> None:
        tensors, layout = _flatten(state)
        size = _nbytes(tensors)
        # A state over a quarter of the budget goes to disk whatever room is left: kept, one or
        # two of them (n = 256: 84-192 MB each) would sit under every later module's SVD.
        if self.used + size <= self.budget and size <= self.budget // 4:
            self.memory[name] = (state, size)
            self.used += size
            return
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="knots-states-")
        path = os.path.join(self.folder, f"{len(self.on_disk)}.bin")
        entries, offset = [], 0
        try:
            with open(path, "wb") as f:
                for t in tensors:
                    data = t.detach().contiguous().cpu()
                    f.write(b"\0" * (-offset % 64))
                    offset += -offset % 64
                    nbytes = data.numel() * data.element_size()
                    entries.append((offset, nbytes, data.dtype, tuple(data.shape), t.device))
                    if nbytes:
                        f.write(memoryview(data.view(torch.uint8).numpy()))
                    offset += nbytes
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(path)
            spilled = sum(os.path.getsize(p) for p, _, _ in self.on_disk.values())
            raise OSError(
                e.errno,
                f"cannot write the merge's temporary states ({format_bytes(spilled)} written so far): "
                f"{e.strerror or e}; TMPDIR chooses where they go",
                self.folder,
            ) from None
        self.on_disk[name] = (path, entries, layout)

    def check_room(self, estimate: int) -> None:
        """Raises an OSError before anything is spilled if `estimate` bytes of states, less what
        the memory budget keeps, would clearly not fit on the temporary folder's disk (more than
        1.25x its free space: the estimate is rough)."""
        folder = tempfile.gettempdir()
        free = free_bytes(folder)
        needed = estimate - self.budget
        if needed > 1.25 * free:
            raise OSError(
                errno.ENOSPC,
                f"the merge's temporary states need about {format_bytes(needed)} and the disk has "
                f"{format_bytes(free)} free; TMPDIR chooses where they go",
                folder,
            )

    def get(self, name: str):
        if name in self.memory:
            return self.memory[name][0]
        path, entries, layout = self.on_disk[name]
        # Mapped, not read: the pages come from the page cache as the kernels touch them (a
        # private mapping, so that the tensors are writable like any other).
        if os.path.getsize(path):
            raw = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
        else:  # (only empty tensors; an empty file cannot be mapped)
            raw = torch.empty(0, dtype=torch.uint8)
        tensors = []
        for offset, nbytes, dtype, shape, device in entries:
            tensors.append(raw[offset : offset + nbytes].view(dtype).reshape(shape).to(device))
        return _unflatten(tensors, layout)

    def pop(self, name: str):
        state = self.get(name)
        if name in self.memory:
            self.used -= self.memory.pop(name)[1]
        else:
            os.remove(self.on_disk.pop(name)[0])
        return state

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class LoadCache:
    """load(ref) once per module for the passes of global TIES: the loaded ModuleTasks kept while
    their factors fit in `budget` bytes, the others loaded again when visited."""

    def __init__(self, load: Callable[[ModuleRef], ModuleTasks], budget: int | None = None):
        self.load, self.budget, self.used = load, FACTOR_MEMORY if budget is None else budget, 0
        self.kept: dict = {}

    def __call__(self, ref: ModuleRef) -> ModuleTasks:
        if ref.name in self.kept:
            return self.kept[ref.name]
        m = self.load(ref)
        size = _nbytes(t for pair in m.factors for t in pair)
        if self.used + size <= self.budget:
            self.kept[ref.name] = m
            self.used += size
        return m

    def drop(self, name: str) -> None:
        """Forgets a module whose last pass is over."""
        m = self.kept.pop(name, None)
        if m is not None:
            self.used -= _nbytes(t for pair in m.factors for t in pair)


class Patcher:
    """What a consumer that can rewrite entries of a module it was given implements (merge_to's
    lossless output): accepts(ref, update) says whether update's merged rows will be stored
    verbatim (flat, row-major), so that apply(ref, positions, values) can later set those rows'
    flat entries at positions to values."""

    def accepts(self, ref: ModuleRef, update) -> bool:
        raise NotImplementedError

    def apply(self, ref: ModuleRef, positions, values: torch.Tensor) -> None:
        raise NotImplementedError


class OutputPool:
    """Merged-row buffers (float32, on the CPU) reused from module to module when the consumer of
    the updates has consumed each one by the time emit returns (merge_to's writer has written it
    to the file): a fresh tens-of-MB buffer per module costs its page faults (about 30 ms for
    64 MB here), as much as a third of the TIES pass that fills it. One buffer kept per shape."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.free: dict = {}

    def take(self, factors) -> torch.Tensor | None:
        if not self.enabled or not _on_cpu(factors):
            return None
        return self.free.pop(factor_ops.shape_of(factors), None)

    def give(self, merged: torch.Tensor) -> None:
        if self.enabled and merged.device.type == "cpu":
            self.free[tuple(merged.shape)] = merged


def _on_cpu(factors) -> bool:
    return torch.as_tensor(factors[0][0]).device.type == "cpu"


def _done(pending: deque) -> tuple:
    """(ref, known, state) of the oldest of pending (ref, future), waited for; the future is
    dropped, so that it holds no state once the store has it."""
    ref, future = pending.popleft()
    return (ref, *future.result())


def _flatten(state):
    """(tensors, layout) of a state made of tensors, tuples / lists of them and None."""
    if isinstance(state, torch.Tensor):
        return [state], "t"
    if state is None:
        return [], None
    tensors, layouts = [], []
    for item in state:
        ts, lay = _flatten(item)
        tensors += ts
        layouts.append((len(ts), lay))
    return tensors, (type(state).__name__, layouts)


def _unflatten(tensors, layout):
    if layout == "t":
        return tensors[0]
    if layout is None:
        return None
    kind, layouts = layout
    items, j = [], 0
    for count, lay in layouts:
        items.append(_unflatten(tensors[j : j + count], lay))
        j += count
    return tuple(items) if kind == "tuple" else items


def run(
    method,
    params: dict,
    modules: list,
    load: Callable[[ModuleRef], ModuleTasks],
    n_tasks: int,
    emit: Callable,
    progress,
    consumed: bool = False,
    patcher=None,
    passes=None,
) -> None:
    """Merges every module with `method` and hands each (ref, update) to emit, once, in the
    modules' order. consumed: emit is done with each update when it returns (it keeps no
    reference to it or its tensors), so the driver may reuse the merged rows' buffer for the
    next module (OutputPool). patcher: the consumer can rewrite entries of an emitted module's
    rows (Patcher), so that a module waiting for TIES's majority sign is emitted at once and
    patched at the end, not held. passes(space, load): where the per-module work runs (a
    Passes: LocalPasses, here, by default; knots_ext.distributed: on a Ray cluster). The memory
    the CPU kernels keep from module to module is freed when it returns."""
    try:
        _run(method, params, modules, load, n_tasks, emit, progress, consumed, patcher, passes)
    finally:
        factor_ops.release_kept_memory()


def _run(method, params, modules, load, n_tasks, emit, progress, consumed, patcher, passes) -> None:
    pool = OutputPool(consumed)
    if not getattr(method.space, "rows_verbatim", False):
        patcher = None
    space = method.space(params) if method.space is not None else None
    passes = (passes or LocalPasses)(space, load)
    if space is not None and method.rule == "ties" and params["top_k_scope"] == "task":
        dare_p, seed = (params["dare_p"], params["seed"]) if method.dare else (0.0, 0)
        try:
            _ties_global(
                space,
                params["top_k"],
                params["lam"],
                dare_p,
                seed,
                modules,
                passes,
                n_tasks,
                emit,
                progress,
                method.name,
                pool,
                patcher,
            )
        finally:
            passes.close()
        return
    for ref, update in passes.updates(modules, progress, method, params, pool):
        emit(ref, update)


def merge_module(method, space, params: dict, ref: ModuleRef, m: ModuleTasks, pool=None):
    """(update, merged rows or None) of one module with tasks merged on its own: every method but
    TIES with thresholds global per task. pool: where the merged rows' buffer comes from."""
    if space is None:
        return method.rule(m, params), None
    dare_p, seed = (params["dare_p"], params["seed"]) if method.dare else (0.0, 0)
    state = space.prepare(m)
    factors = space.row_factors(m, state)
    out = pool.take(factors) if pool is not None else None
    if method.rule == "ta":
        lam = params["lam"]
        merged = factor_ops.weighted_sum(factors, [lam] * len(factors), dare_p, seed, m.name, m.tasks, out=out)
    else:
        merged = _ties_one_module(factors, m, params["top_k"], params["lam"], dare_p, seed, out)
    return space.update(ref, merged, state), merged


class Passes:
    """Where the merge's per-module work runs; the driver keeps the order, the reductions (TIES's
    thresholds and majority sign) and the output. LocalPasses runs it here, module by module;
    knots_ext.distributed.RayPasses on a Ray cluster, with the same results to the bit."""

    def updates(self, modules, progress, method, params, pool):
        """(ref, update) per module in order: merge_module's for a module with tasks (its merged
        rows' buffer back to pool once the update is emitted), else its zero update."""
        raise NotImplementedError

    def selection(self, modules, n_tasks: int, top_k: float, progress, desc: str):
        """The MagnitudeThreshold for global TIES, every module's state made first where the
        space keeps its rows in it (rows_in_state)."""
        raise NotImplementedError

    def count(self, modules, sel, dare_p: float, seed: int, progress, desc: str) -> None:
        """One round of sel's histograms over every module's task rows."""
        raise NotImplementedError

    def apply(self, modules, thresholds, lam, dare_p, seed, pool, progress, desc):
        """(ref, merged rows, sign sum, zero-sum positions, update) per module in order: merged is
        None for a module without tasks (update: its zero update); update is None when positions
        wait for the majority sign (the module's state is then kept for factors_of and state)."""
        raise NotImplementedError

    def factors_of(self, ref, counted: set | None = None):
        """(ModuleTasks, row factors) of a module whose state is kept; counted: the caller needs
        only these tasks' rows (the others may be left out)."""
        raise NotImplementedError

    def state(self, ref, pop: bool = False):
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalPasses(Passes):
    """The work in this process: each module's factors loaded once for all passes where they fit
    (LoadCache), its space state kept between them (StateStore)."""

    def __init__(self, space, load):
        self.space, self.load = space, load
        self.states = StateStore()
        self.loaded = LoadCache(load)
        # A space whose state holds its rows' factors (rows_in_state) is loaded once: later
        # passes need only the module's tasks and scales, kept here without the factors.
        self.rows_in_state = getattr(space, "rows_in_state", False)
        self.known: dict = {}

    def updates(self, modules, progress, method, params, pool):
        for ref in progress(modules, method.name):
            m = self.load(ref)
            if not m.tasks:
                yield ref, zero_update(ref)
                continue
            update, merged = merge_module(method, self.space, params, ref, m, pool)
            yield ref, update
            if merged is not None:
                pool.give(merged)

    def factors_of(self, ref, counted: set | None = None):
        part = None if ref.name in self.loaded.kept else load_counted(self.space, self.load, ref, counted)
        if part is not None:  # (nothing of a partial load is kept)
            return part, (self.space.row_factors(part, self.space.prepare(part)) if part.tasks else None)
        m = self.known.get(ref.name) or (self.load if self.rows_in_state else self.loaded)(ref)
        if self.rows_in_state:
            self.known[ref.name] = replace(m, factors=[])
        if not m.tasks:
            return m, None
        if ref.name not in self.states:
            self.states.put(ref.name, self.space.prepare(m))
        return m, self.space.row_factors(m, self.states.get(ref.name))

    def state(self, ref, pop: bool = False):
        if pop:
            self.loaded.drop(ref.name)
            return self.states.pop(ref.name)
        return self.states.get(ref.name)

    def selection(self, modules, n_tasks, top_k, progress, desc):
        if self.rows_in_state:
            # Every module's basis before the selection's histograms exist (n_tasks x 512 KB:
            # 128 MB at n = 256), so that they are not held under the largest SVD. The passes
            # after it read only the states, as they would have anyway.
            widest = max((sum(ref.shape) for ref in modules), default=1)  # (d_out + d_in)
            self._bases(modules, progress(modules, f"{desc}: bases"), widest)
        first = next((f for f in (self.factors_of(ref)[1] for ref in modules) if f), None)
        # The thresholds in about one full pass where the kernels allow it (factors on the CPU).
        return ops.MagnitudeThreshold(n_tasks, top_k, sampled=first is not None and _on_cpu(first))

    def _bases(self, modules: list, in_order, widest: int) -> None:
        """Every module's state (as factors_of makes it, without forming its row factors), in the
        order of in_order (modules, with progress): up to the first module with tasks here, which
        sizes the others' workers (bases_workers) and threads (bases_threads); with more than one
        worker, they load and prepare the modules side by side, each at most one module ahead.
        widest: the largest d_out + d_in."""
        todo = iter(in_order)
        with torch_threads(bases_threads(modules)):
            for ref in todo:
                known, state = self._load_prepared(ref)
                self._keep_state(ref, known, state)
                if known.tasks:
                    first, nbytes = ref, cpu_state_bytes(state)
                    del state  # (the store has it: here it would outlive its spill, 84-192 MB at n = 256)
                    if nbytes is not None:  # every module's state, scaled from this one by d_out + d_in
                        per_width = nbytes / max(1, sum(first.shape))
                        self.states.check_room(int(per_width * sum(sum(r.shape) for r in modules if r.tasks)))
                    break
            else:
                return
        workers = bases_workers(first, nbytes, widest)  # (with torch's own threads)
        with torch_threads(bases_threads(modules, workers)):
            if workers == 1:
                for ref in todo:
                    self._keep_state(ref, *self._load_prepared(ref))
                return
            with ThreadPoolExecutor(workers, thread_name_prefix="knots-bases") as pool:
                pending: deque = deque()
                for ref in todo:
                    pending.append((ref, pool.submit(self._load_prepared, ref)))
                    if len(pending) > workers:
                        self._keep_state(*_done(pending))
                while pending:
                    self._keep_state(*_done(pending))

    def _load_prepared(self, ref):
        """(the module as loaded, without its factors: its state holds its rows; its state)"""
        m = self.load(ref)
        return replace(m, factors=[]), (self.space.prepare(m) if m.tasks else None)

    def _keep_state(self, ref, known, state) -> None:
        self.known[ref.name] = known
        if state is not None:
            self.states.put(ref.name, state)

    def count(self, modules, sel, dare_p, seed, progress, desc):
        counted = set(sel.counted())
        for ref in progress(modules, desc):
            if counted.isdisjoint(ref.tasks):
                continue
            m, factors = self.factors_of(ref, counted)
            if factors:
                count_rows(sel, counted, ref.name, m.tasks, factors, dare_p, seed)
            # (released before the next module is loaded and prepared: at n = 256 a 4096-wide
            # module's factors and state are ~300 MB)
            del m, factors

    def apply(self, modules, thresholds, lam, dare_p, seed, pool, progress, desc):
        for ref in progress(modules, desc):
            # (the previous module's, released before this one is loaded and merged)
            m = factors = merged = update = None
            m, factors = self.factors_of(ref)
            if not factors:
                yield ref, None, 0, [], zero_update(ref)
                continue
            own = [thresholds[t] for t in m.tasks]
            merged, signs, zero = factor_ops.ties_apply(
                factors, own, lam, dare_p, seed, ref.name, m.tasks, out=pool.take(factors)
            )
            update = None if zero else self.space.update(ref, merged, self.state(ref, pop=True))
            yield ref, merged, signs, zero, update

    def close(self) -> None:
        self.states.close()


def _ties_one_module(factors, m, top_k, lam, dare_p, seed, out=None):
    """TIES with the module's own thresholds and majority sign (top_k_scope="module")."""
    local = range(len(m.tasks))  # threshold slot of each of this module's tasks
    sel = ops.MagnitudeThreshold(len(m.tasks), top_k, sampled=_on_cpu(factors))
    while not sel.done:
        factor_ops.histogram(sel, factors, dare_p, seed, m.name, m.tasks, slots=local)
        sel.finish_round()
    thresholds = sel.thresholds()
    merged, sign_sum, zero = factor_ops.ties_apply(factors, thresholds, lam, dare_p, seed, m.name, m.tasks, out=out)
    if zero:
        majority = (sign_sum > 0) - (sign_sum < 0)
        factor_ops.ties_fix_majority(factors, merged, thresholds, zero, majority, lam, dare_p, seed, m.name, m.tasks)
    return merged


def _ties_global(space, top_k, lam, dare_p, seed, modules, passes, n_tasks, emit, progress, desc, pool, patcher):
    """TIES with per-task thresholds over all modules and one majority sign over all positions.
    Each module's space state (its KnOTS SVD) is computed once and kept for the passes."""
    sel = passes.selection(modules, n_tasks, top_k, progress, desc)
    while not sel.done:
        passes.count(modules, sel, dare_p, seed, progress, f"{desc}: thresholds, round {sel.round + 1}")
        sel.finish_round()
    thresholds = sel.thresholds()
    del sel  # (its histograms, n x 512 KB: 128 MB at n = 256, are not held under the merge pass)

    sign_sum, pending = 0, []
    applied = passes.apply(modules, thresholds, lam, dare_p, seed, pool, progress, f"{desc}: merge")
    for ref, merged, signs, zero, update in applied:
        sign_sum += signs
        if update is not None:
            emit(ref, update)
            if merged is not None:
                pool.give(merged)
            # (not held while the next module is merged: a KnOTS update's U is 64 MB at n = 256)
            update = merged = None
            continue
        # Positions whose trimmed sum is exactly 0 wait for the majority sign. A consumer that
        # can patch gets the module now (those positions 0 for the moment; the state is kept for
        # the fix), so that memory does not grow with the modules waiting; else it is held.
        update = space.update(ref, merged, passes.state(ref))
        if patcher is not None and patcher.accepts(ref, update):
            emit(ref, update)
            pending.append((ref, None, zero))
            pool.give(merged)
        else:
            pending.append((ref, merged, zero))
        del update
    majority = (sign_sum > 0) - (sign_sum < 0)
    for ref, merged, zero in pending:
        m = factors = None
        m, factors = passes.factors_of(ref)
        fixed = merged if merged is not None else torch.empty(factor_ops.shape_of(factors), dtype=torch.float32)
        factor_ops.ties_fix_majority(
            factors, fixed, [thresholds[t] for t in m.tasks], zero, majority, lam, dare_p, seed, ref.name, m.tasks
        )
        state = passes.state(ref, pop=True)
        if merged is None:  # (only the zero positions of `fixed` are written)
            patcher.apply(ref, zero, fixed.reshape(-1)[torch.as_tensor(zero, dtype=torch.int64)])
        else:
            emit(ref, space.update(ref, merged, state))
