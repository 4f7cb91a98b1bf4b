"""The merge kernels on task rows given as factors: task i's row (an m x c matrix, flattened
row-major: element a * c + b) is s_i * P_i @ Q_i with P_i (m x r_i), Q_i (r_i x c), and is
never stored: the fused kernels (csrc/cpu/factored.cpp, csrc/cuda/factored.cu) recompute each
tile of every task's entries from the factors. Thresholds, DARE masks (keyed by that element
index) and results are those of the row kernels in knots_ext.ops on the materialised rows, with
each entry computed as s_i * (a chain of fused multiply-adds over k = 0 .. r_i-1), rounded
once per step (csrc/common/factor_math.h): the same bits on every CPU path and on the GPU.

`factors` is a sequence of (P, Q, s) per task: torch tensors (any float dtype, any layout; they
are made float32 and contiguous on the device of the first P, once per call: they are small)
and a scale s (a number). Outputs are float32 (m, c) tensors on that device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _C, ops
from ._arrays import F32, Flat, KernelStream, out_view


def shape_of(factors) -> tuple[int, int]:
    """(m, c) of the rows."""
    P, Q, _ = factors[0]
    return int(P.shape[0]), int(Q.shape[1])


class _Factors:
    """The factors as the kernels read them (float32, contiguous, one device), kept alive while
    a kernel runs."""

    def __init__(self, factors):
        if len(factors) == 0:
            raise ValueError("no task factors given")
        self.device = torch.as_tensor(factors[0][0]).device
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"factors: device {self.device} is not supported (cpu or cuda)")
        self.m, self.c = shape_of(factors)
        self.P: list[torch.Tensor] = []
        self.Q: list[torch.Tensor] = []
        self.scales: list[float] = []
        for i, (P, Q, s) in enumerate(factors):
            P = torch.as_tensor(P).to(device=self.device, dtype=torch.float32).contiguous()
            Q = torch.as_tensor(Q).to(device=self.device, dtype=torch.float32).contiguous()
            if P.dim() != 2 or Q.dim() != 2 or P.shape[1] != Q.shape[0]:
                raise ValueError(
                    f"factors[{i}]: P {tuple(P.shape)} and Q {tuple(Q.shape)} are not (m x r) and (r x c) factors"
                )
            if (P.shape[0], Q.shape[1]) != (self.m, self.c):
                raise ValueError(
                    f"factors[{i}]: the row is {P.shape[0]} x {Q.shape[1]}, task 0's is {self.m} x {self.c}"
                )
            self.P.append(P)
            self.Q.append(Q)
            self.scales.append(ops._check_scale(f"factors[{i}] scale", float(s)))
        if self.device.type == "cuda" and not _C.build_info()["cuda_compiled"]:
            raise RuntimeError("CUDA factors were given but knots_ext was built without CUDA")
        index = -1 if self.device.type == "cpu" else self.device.index
        self.ref = Flat(
            None, 0, self.m * self.c, 1, F32, torch.cuda.current_device() if index is None else index, "torch"
        )

    def kernel_input(self, dare_p: float, seed: int, module, tasks, on: KernelStream) -> _C.FactorInput:
        """The factors as _C takes them, for a call made inside `on` (its stream and scratch)."""
        tasks = ops._task_indices(len(self.P), tasks, seed, "tasks' factors")
        return _C.FactorInput(
            [p.data_ptr() for p in self.P],
            [q.data_ptr() for q in self.Q],
            [int(p.shape[1]) for p in self.P],
            self.scales,
            self.m,
            self.c,
            self.ref.device,
            on.ptr,
            ops._check_dare_p(dare_p),
            int(seed),
            tasks,
            ops.module_id(module),
            0,
            on.scratch,
        )

    def empty(self) -> torch.Tensor:
        return torch.empty(self.m, self.c, dtype=torch.float32, device=self.device)

    def out(self, out) -> Flat:
        """`out` checked: an (m x c) float32 contiguous array on the factors' device."""
        return out_view(out, self.ref)


def histogram(
    sel: ops.MagnitudeThreshold,
    factors,
    dare_p: float,
    seed: int,
    module: str,
    tasks: Sequence[int],
    slots: Sequence[int] | None = None,
) -> None:
    """Adds every task's row magnitudes (after DARE) to sel's current round, task r to slot slots[r]
    (slots default to tasks)."""
    f = _Factors(factors)
    if sel.sampled and f.device.type != "cpu":
        raise ValueError("a sampled MagnitudeThreshold takes factors on the CPU only")
    with KernelStream(f.ref) as on:
        inp = f.kernel_input(dare_p, seed, module, tasks, on)
        sel.selector.factored_histogram(inp, [int(t) for t in (tasks if slots is None else slots)])


def _thresholds(thresholds, n: int) -> list[float]:
    values = [float(t) for t in thresholds]
    if len(values) != n:
        raise ValueError(f"thresholds has {len(values)} entries for {n} tasks")
    return values


def ties_apply(
    factors,
    thresholds: Sequence[float],
    lam: float,
    dare_p: float,
    seed: int,
    module: str,
    tasks: Sequence[int],
    *,
    out: torch.Tensor | None = None,
):
    """TIES with given per-task thresholds: (merged (m x c) float32, sign_sum, zero-sum positions),
    the positions (flat indices a * c + b, sorted) written 0 until ties_fix_majority. `out`, if
    given ((m x c) float32, contiguous, on the factors' device), is written and returned."""
    lam = ops._check_scale("lam", lam)
    f = _Factors(factors)
    result = f.empty() if out is None else out
    o = f.out(result)
    with KernelStream(f.ref) as on:
        inp = f.kernel_input(dare_p, seed, module, tasks, on)
        sign_sum, positions = _C.factored_ties_apply(inp, _thresholds(thresholds, len(f.P)), lam, o.ptr)
    return result, sign_sum, positions


def ties_fix_majority(
    factors,
    out: torch.Tensor,
    thresholds: Sequence[float],
    positions: Sequence[int],
    majority: int,
    lam: float,
    dare_p: float,
    seed: int,
    module: str,
    tasks: Sequence[int],
) -> None:
    """Rewrites out's zero-sum positions (from ties_apply) with the elected sign `majority`."""
    lam = ops._check_scale("lam", lam)
    f = _Factors(factors)
    o = f.out(out)
    majority = (majority > 0) - (majority < 0)
    with KernelStream(f.ref) as on:
        inp = f.kernel_input(dare_p, seed, module, tasks, on)
        _C.factored_ties_fix_majority(inp, _thresholds(thresholds, len(f.P)), lam, majority, list(positions), o.ptr)


def weighted_sum(
    factors,
    weights: Sequence[float],
    dare_p: float,
    seed: int,
    module: str,
    tasks: Sequence[int],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_i weights[i] * dare(row_i), (m x c) float32 (each product rounded, then added, in task
    order), written into `out` if given. Raises ValueError if a row has NaN or Inf."""
    f = _Factors(factors)
    w = [ops._check_scale(f"weights[{i}]", v) for i, v in enumerate(weights)]
    if len(w) != len(f.P):
        raise ValueError(f"weights has {len(w)} entries for {len(f.P)} tasks")
    result = f.empty() if out is None else out
    o = f.out(result)
    with KernelStream(f.ref) as on:
        finite = _C.factored_weighted_sum(f.kernel_input(dare_p, seed, module, tasks, on), w, o.ptr)
    if not finite:
        raise ValueError("input contains NaN or Inf")
    return result


def is_finite(task_factors) -> bool:
    """Whether one task's row (P, Q, s) is finite in float32 (one histogram pass over its tiles:
    nothing of the row's size is allocated)."""
    f = _Factors([task_factors])
    sel = _C.MagnitudeSelect(1, 1.0)
    with KernelStream(f.ref) as on:
        sel.factored_histogram(f.kernel_input(0.0, 0, "", [0], on), [0])
    return not sel.nonfinite


def release_kept_memory() -> None:
    """Frees the memory the CPU kernels keep from call to call in the calling thread (their copy
    of the Q factors, reused from module to module: fresh pages each time were a quarter of a
    large merge's page faults). The merge driver calls it when a merge ends."""
    _C.release_kept_floats()


def release_free_heap() -> bool:
    """Returns the C heap's free memory to the system (glibc's malloc_trim; elsewhere nothing is
    done): whether any was returned. Memory that glibc keeps after one module's medium-sized
    arrays would otherwise sit under the next module's largest allocation."""
    return bool(_C.release_free_heap())
