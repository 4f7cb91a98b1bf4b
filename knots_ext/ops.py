"""The merge kernels as array functions. Inputs are torch tensors (CPU, or CUDA when the
CUDA kernels are built), numpy arrays or CuPy arrays, in float32, float16 or bfloat16; outputs
come back in the input's library, device and dtype (math is done in float32).

Task inputs `x` are either a 2-D array (n_tasks, P), one row per task, or a sequence of
n arrays of P elements each (any shapes). DARE's mask for row r is a pure function of
(seed, tasks[r], module, element index), DESIGN.md §1: `tasks` defaults to 0..n-1 and
`module` (a name or a 64-bit id) to "".

CUDA inputs run on `stream` (a stream handle; default: the current stream of the input's
library), ordered against that library's current stream, where inputs are copied, outputs
allocated and read (_arrays.KernelStream); the kernels' device scratch comes from the same
library's allocator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import _C
from ._arrays import Flat, KernelStream, empty_like_rows, flat, out_view, rows_of

__all__ = [
    "MagnitudeThreshold",
    "dare",
    "magnitude_threshold",
    "module_id",
    "task_arithmetic",
    "ties_apply",
    "ties_fix_majority",
    "ties_merge",
]


def module_id(module: str | int) -> int:
    """The 64-bit id of a module name (FNV-1a), as used in DARE's random stream."""
    if isinstance(module, str):
        return _C.module_id(module)
    if isinstance(module, int) and 0 <= module < 2**64:
        return module
    raise TypeError(f"module must be a name or a 64-bit id, got {module!r}")


def _check_dare_p(value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:  # NaN too
        raise ValueError(f"dare_p must be in [0, 1), got {value}")
    return value


def _check_top_k(value: float) -> float:
    top_k = float(value)
    if not 0.0 < top_k <= 1.0:  # NaN too
        raise ValueError(f"top_k must be in (0, 1], got {value!r} (top_k is a fraction: 20% is 0.2)")
    return top_k


def _check_scale(name: str, value: float) -> float:
    """A multiplier the kernels take as float32: finite there too."""
    value = float(value)
    with np.errstate(over="ignore"):
        if not (math.isfinite(value) and np.isfinite(np.float32(value))):
            raise ValueError(f"{name} must be a finite float32 number, got {value}")
    return value


def _task_indices(n: int, tasks, seed: int, what: str = "rows") -> list[int]:
    """The DARE task index of each of n inputs (default 0..n-1), checked with the seed."""
    tasks = list(range(n)) if tasks is None else [int(t) for t in tasks]
    if len(tasks) != n:
        raise ValueError(f"tasks has {len(tasks)} entries for {n} {what}")
    if any(t < 0 for t in tasks):
        raise ValueError("task indices must be >= 0")
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    return tasks


def _kernel_input(
    rows: list[Flat], dare_p: float, seed: int, tasks, module, elem_offset: int, on: KernelStream
) -> _C.Input:
    """The rows as _C takes them, for a call made inside `on` (its stream and scratch)."""
    tasks = _task_indices(len(rows), tasks, seed)
    ref = rows[0]
    return _C.Input(
        [r.ptr for r in rows],
        ref.numel,
        ref.stride,
        ref.dtype,
        ref.device,
        on.ptr,
        _check_dare_p(dare_p),
        int(seed),
        tasks,
        module_id(module),
        int(elem_offset),
        on.scratch,
    )


def _output(ref: Flat, out) -> Flat:
    """`out` checked against the rows (_arrays.out_view), or a new array. Passing out= saves the
    allocation, which on some machines costs as much as the kernel (first-touch page faults of a
    fresh buffer)."""
    return out_view(empty_like_rows(ref, (ref.numel,)) if out is None else out, ref)


def _rows_and_out(x, out=None, what="x"):
    rows = rows_of(x, what)
    return rows, _output(rows[0], out)


def ties_merge(
    x,
    top_k: float,
    lam: float = 1.0,
    dare_p: float = 0.0,
    seed: int = 0,
    *,
    module: str | int = "",
    tasks: Sequence[int] | None = None,
    elem_offset: int = 0,
    stream: int | None = None,
    return_thresholds: bool = False,
    out=None,
):
    """Fused TIES over the n task rows of x: per-row trim to the top_k fraction by magnitude,
    sign election, disjoint mean, times lam; with dare_p > 0, DARE is applied first.
    Returns the merged (P,) array, written into `out` if given (and the per-row thresholds if
    asked). On CUDA, long rows are read once where a sample brackets every threshold (else the
    exact rounds run; the same bits either way); the environment variable
    KNOTS_EXT_CUDA_TIES_PATH=exact or =read-once forces one path (read-once: an error where it
    does not apply or missed)."""
    top_k, lam = _check_top_k(top_k), _check_scale("lam", lam)
    rows, out = _rows_and_out(x, out)
    with KernelStream(rows[0], stream) as on:
        inp = _kernel_input(rows, dare_p, seed, tasks, module, elem_offset, on)
        thresholds = _C.ties_merge(inp, top_k, lam, out.ptr)
    return (out.array, thresholds) if return_thresholds else out.array


def ties_apply(
    x,
    thresholds: Sequence[float],
    lam: float = 1.0,
    dare_p: float = 0.0,
    seed: int = 0,
    *,
    module: str | int = "",
    tasks=None,
    elem_offset: int = 0,
    stream=None,
    out=None,
):
    """TIES with given per-row thresholds (e.g. global over many arrays, from
    MagnitudeThreshold). Positions whose trimmed sum is exactly 0 need the majority sign,
    which may span many arrays: they are written 0 and returned for ties_fix_majority.
    Returns (out, sign_sum, zero_sum_positions)."""
    lam = _check_scale("lam", lam)
    rows, out = _rows_and_out(x, out)
    with KernelStream(rows[0], stream) as on:
        inp = _kernel_input(rows, dare_p, seed, tasks, module, elem_offset, on)
        sign_sum, positions = _C.ties_apply(inp, [float(t) for t in thresholds], lam, out.ptr)
    return out.array, sign_sum, positions


def ties_fix_majority(
    x,
    out,
    thresholds: Sequence[float],
    positions: Sequence[int],
    majority: int,
    lam: float = 1.0,
    dare_p: float = 0.0,
    seed: int = 0,
    *,
    module: str | int = "",
    tasks=None,
    elem_offset: int = 0,
    stream=None,
):
    """Rewrites out at `positions` (from ties_apply) with the elected sign `majority`."""
    lam = _check_scale("lam", lam)
    rows, o = _rows_and_out(x, out)
    majority = (majority > 0) - (majority < 0)
    with KernelStream(rows[0], stream) as on:
        inp = _kernel_input(rows, dare_p, seed, tasks, module, elem_offset, on)
        _C.ties_fix_majority(inp, [float(t) for t in thresholds], lam, majority, list(positions), o.ptr)
    return out


class MagnitudeThreshold:
    """Streaming exact TIES thresholds: per task, the magnitude t such that entries with
    |x| >= t are the top_k fraction of all entries that task sends, over any number of arrays.

        sel = MagnitudeThreshold(n_tasks, top_k)
        while not sel.done:
            for task, array in chunks():      # every chunk, in any order, each round
                sel.update(task, array)
            sel.finish_round()
        sel.thresholds()                     # list of n floats

    At most two rounds (radix select on the float bits); one when top_k >= 1 or the data are
    bf16. Chunks sent with DARE settings are thresholded after DARE.

    sampled=True (rows given as factors on the CPU only: knots_ext.factor_ops.histogram): round
    0 looks at a 1/16 sample of each task's entries and places a narrow key window around its
    threshold, round 1 counts every entry once and finds the exact key inside the window; a task
    whose window missed takes two more rounds. The same thresholds, in about one full pass
    instead of two."""

    def __init__(self, n_tasks: int, top_k: float, sampled: bool = False):
        if int(n_tasks) < 1:
            raise ValueError("n_tasks must be >= 1")
        self._sel = _C.MagnitudeSelect(int(n_tasks), _check_top_k(top_k), bool(sampled))
        self.n_tasks = int(n_tasks)

    @property
    def sampled(self) -> bool:
        return self._sel.sampled

    @property
    def missed(self) -> int:
        """Tasks whose sampled window missed their threshold (each took two more rounds)."""
        return self._sel.missed

    def _rows_allowed(self) -> None:
        if self._sel.sampled:
            raise ValueError("a sampled MagnitudeThreshold takes factored rows on the CPU only (factor_ops.histogram)")

    @property
    def done(self) -> bool:
        return self._sel.done

    def counted(self) -> list[int]:
        """The tasks whose entries the open round counts: entries of the others may be sent
        and change nothing (their thresholds are settled), so they need not be computed."""
        return self._sel.counted()

    @property
    def selector(self) -> _C.MagnitudeSelect:
        """The kernels' selection state (knots_ext.factor_ops adds factored rows to it)."""
        return self._sel

    @property
    def round(self) -> int:
        return self._sel.round

    def counting_copy(self) -> MagnitudeThreshold:
        """This selection's open round with nothing counted yet (picklable), to count part of the
        entries in another process; add_counts adds what it counted. Counts are integer sums, so
        any split of the entries gives the same thresholds."""
        copy = MagnitudeThreshold.__new__(MagnitudeThreshold)
        copy._sel, copy.n_tasks = self._sel.counting_copy(), self.n_tasks
        return copy

    def add_counts(self, copy: MagnitudeThreshold) -> None:
        self._sel.add_counts(copy._sel)

    def update(
        self,
        task: int,
        array,
        dare_p: float = 0.0,
        seed: int = 0,
        *,
        module: str | int = "",
        elem_offset: int = 0,
        stream=None,
    ):
        if not 0 <= int(task) < self.n_tasks:
            raise ValueError(f"task {task} out of range for {self.n_tasks} tasks")
        self._rows_allowed()
        row = flat(array, "array")
        with KernelStream(row, stream) as on:
            self._sel.histogram(_kernel_input([row], dare_p, seed, [task], module, elem_offset, on), [int(task)])

    def update_rows(
        self,
        x,
        dare_p: float = 0.0,
        seed: int = 0,
        *,
        module: str | int = "",
        tasks=None,
        elem_offset: int = 0,
        stream=None,
        slots=None,
    ):
        """Adds every row of x, row r to task slots[r]; slots default to tasks (the rows' DARE
        task indices), which default to 0..n-1."""
        self._rows_allowed()
        rows = rows_of(x)
        if slots is None:
            slots = range(len(rows)) if tasks is None else tasks
        with KernelStream(rows[0], stream) as on:
            inp = _kernel_input(rows, dare_p, seed, tasks, module, elem_offset, on)
            self._sel.histogram(inp, [int(t) for t in slots])

    def finish_round(self):
        """Closes the round; raises ValueError if any value sent was NaN or Inf."""
        self._sel.finish_round()

    def total(self, task: int) -> int:
        """How many entries the task sent (known after the first round)."""
        return self._sel.total(int(task))

    def thresholds(self) -> list[float]:
        return self._sel.thresholds()


def magnitude_threshold(
    x,
    top_k: float,
    dare_p: float = 0.0,
    seed: int = 0,
    *,
    module: str | int = "",
    tasks=None,
    elem_offset: int = 0,
    stream=None,
) -> list[float]:
    """Per-row TIES thresholds of an in-memory (n, P) input (MagnitudeThreshold, all rounds)."""
    n = len(rows_of(x))
    sel = MagnitudeThreshold(n, top_k)
    while not sel.done:  # row r is threshold slot r; `tasks` only names the rows' DARE streams
        sel.update_rows(
            x, dare_p, seed, module=module, tasks=tasks, elem_offset=elem_offset, stream=stream, slots=range(n)
        )
        sel.finish_round()
    return sel.thresholds()


def _weighted_sum(rows, weights, dare_p, seed, tasks, module, elem_offset, stream, out=None):
    out = _output(rows[0], out)
    with KernelStream(rows[0], stream) as on:
        inp = _kernel_input(rows, dare_p, seed, tasks, module, elem_offset, on)
        finite = _C.weighted_sum(inp, [float(w) for w in weights], out.ptr)
    if not finite:
        raise ValueError("input contains NaN or Inf")
    return out.array


def task_arithmetic(
    x,
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    dare_p: float = 0.0,
    seed: int = 0,
    *,
    module: str | int = "",
    tasks=None,
    elem_offset: int = 0,
    stream=None,
    out=None,
):
    """lam * sum_r weights[r] * dare(x[r]) (weights default to 1): Task Arithmetic, and
    DARE-TA with dare_p > 0. Returns the (P,) result (written into `out` if given)."""
    rows = rows_of(x)
    lam = _check_scale("lam", lam)
    weights = [1.0] * len(rows) if weights is None else list(weights)
    if len(weights) != len(rows):
        raise ValueError(f"weights has {len(weights)} entries for {len(rows)} rows")
    scaled = [
        _check_scale(f"lam * weights[{i}]", lam * _check_scale(f"weights[{i}]", w)) for i, w in enumerate(weights)
    ]
    return _weighted_sum(rows, scaled, dare_p, seed, tasks, module, elem_offset, stream, out)


def dare(x, p: float, seed: int = 0, *, task: int = 0, module: str | int = "", elem_offset: int = 0, stream=None):
    """DARE on one array (any shape): each element is dropped with probability p, the kept
    ones are scaled by 1/(1-p). Element i of x is element elem_offset + i of the module, so a
    module processed in chunks gets the same mask as in one piece."""
    row = flat(x, "x")
    out = _weighted_sum([row], [1.0], p, seed, [task], module, elem_offset, stream)
    return out.reshape(tuple(x.shape))
