"""The merge kernels on task rows given as factors: task i's row (an m x c matrix, flattened
row-major: element a * c + b) is s_i * P_i @ Q_i with P_i (m x r_i), Q_i (r_i x c), and is
never stored whole. Thresholds, DARE masks (keyed by that element index) and results are those
of the row kernels in knots_ext.ops on the materialised rows.

Rows are rebuilt in blocks of whole matrix rows, sized so that all n tasks' blocks together
stay under BLOCK_ELEMENTS floats: memory is flat in n and in the module size."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops

BLOCK_ELEMENTS = 1 << 21  # floats of all tasks' rebuilt rows at a time (8 MB)


def shape_of(factors) -> tuple[int, int]:
    """(m, c) of the rows."""
    P, Q, _ = factors[0]
    return int(P.shape[0]), int(Q.shape[1])


def _ranges(factors):
    """Blocks (a0, a1) of the rows' matrix rows."""
    m, c = shape_of(factors)
    step = max(1, BLOCK_ELEMENTS // max(1, len(factors) * c))
    return [(a0, min(m, a0 + step)) for a0 in range(0, m, step)]


def _rows(factors, a0: int, a1: int) -> list:
    """Every task's rows a0..a1 (flattened, float32)."""
    return [(float(s) * (P[a0:a1].float() @ Q.float())).reshape(-1) for P, Q, s in factors]


def _blocks(factors):
    for a0, a1 in _ranges(factors):
        yield a0, a1, _rows(factors, a0, a1)


def histogram(
    sel: ops.MagnitudeThreshold,
    factors,
    dare_p: float,
    seed: int,
    module: str,
    tasks: Sequence[int],
    slots: Sequence[int] | None = None,
) -> None:
    """Adds every task's row magnitudes (after DARE) to sel's current round, task r to slot slots[r]."""
    c = shape_of(factors)[1]
    for a0, _, rows in _blocks(factors):
        sel.update_rows(
            rows, dare_p, seed, module=module, tasks=tasks, elem_offset=a0 * c, slots=tasks if slots is None else slots
        )


def ties_apply(
    factors, thresholds: Sequence[float], lam: float, dare_p: float, seed: int, module: str, tasks: Sequence[int]
):
    """TIES with given per-task thresholds: (merged (m x c) float32, sign_sum, zero-sum positions),
    the positions (flat indices) written 0 until ties_fix_majority."""
    m, c = shape_of(factors)
    out = torch.empty(m, c, dtype=torch.float32, device=factors[0][0].device)
    sign_sum, positions = 0, []  # type: int, list[int]
    for a0, a1, rows in _blocks(factors):
        _, signs, zero = ops.ties_apply(
            rows,
            thresholds,
            lam,
            dare_p,
            seed,
            module=module,
            tasks=tasks,
            elem_offset=a0 * c,
            out=out[a0:a1].reshape(-1),
        )
        sign_sum += signs
        positions.extend(a0 * c + p for p in zero)
    return out, sign_sum, positions


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
    c = shape_of(factors)[1]
    todo = sorted(positions)
    q = 0
    for a0, a1 in _ranges(factors):
        lo = q
        while q < len(todo) and todo[q] < a1 * c:
            q += 1
        if q > lo:  # only the blocks holding positions are rebuilt
            ops.ties_fix_majority(
                _rows(factors, a0, a1),
                out[a0:a1].reshape(-1),
                thresholds,
                [p - a0 * c for p in todo[lo:q]],
                majority,
                lam,
                dare_p,
                seed,
                module=module,
                tasks=tasks,
                elem_offset=a0 * c,
            )


def weighted_sum(
    factors, weights: Sequence[float], dare_p: float, seed: int, module: str, tasks: Sequence[int]
) -> torch.Tensor:
    """sum_i weights[i] * dare(row_i), (m x c) float32."""
    m, c = shape_of(factors)
    out = torch.empty(m, c, dtype=torch.float32, device=factors[0][0].device)
    for a0, a1, rows in _blocks(factors):
        ops.task_arithmetic(
            rows, 1.0, weights, dare_p, seed, module=module, tasks=tasks, elem_offset=a0 * c, out=out[a0:a1].reshape(-1)
        )
    return out


def is_finite(task_factors) -> bool:
    """Whether one task's row (P, Q, s) is finite in float32, checked block by block."""
    return all(bool(torch.isfinite(_rows([task_factors], a0, a1)[0]).all()) for a0, a1 in _ranges([task_factors]))
