"""TIES on task rows, with the trim threshold global per task over all modules (the KnOTS
reference flattens every module of a task into one vector) or per module.

Global scope streams: the thresholds come from MagnitudeThreshold over every module's rows
(one or two rounds), then each module is merged with ties_apply; the majority sign for
positions whose trimmed sum is exactly 0 is global too, so those few positions are fixed at
the end."""
from __future__ import annotations

from .. import ops


def global_thresholds(modules, rows_of, n_tasks: int, top_k: float, dare_p: float, seed: int, progress):
    sel = ops.MagnitudeThreshold(n_tasks, top_k)
    while not sel.done:
        for ref in progress(modules, f"TIES thresholds, round {sel.round + 1}"):
            m, rows, _ = rows_of(ref)
            if rows and rows[0].numel():
                sel.update_rows(rows, dare_p, seed, module=m.name, tasks=m.tasks)
        sel.finish_round()
    return sel.thresholds()


def ties_module(rows, m, thresholds, lam: float, dare_p: float, seed: int):
    """Merged row of one module with global thresholds: (row, sign_sum, zero-sum positions)."""
    return ops.ties_apply(rows, [thresholds[t] for t in m.tasks], lam, dare_p, seed, module=m.name, tasks=m.tasks)


def fix_majority(rows, m, merged_row, thresholds, positions, majority: int, lam: float, dare_p: float, seed: int):
    ops.ties_fix_majority(rows, merged_row, [thresholds[t] for t in m.tasks], positions, majority, lam, dare_p,
                          seed, module=m.name, tasks=m.tasks)


def ties_per_module(rows, m, top_k: float, lam: float, dare_p: float, seed: int):
    return ops.ties_merge(rows, top_k, lam, dare_p, seed, module=m.name, tasks=m.tasks)
