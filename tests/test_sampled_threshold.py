"""The sampled magnitude selection (ops.MagnitudeThreshold(sampled=True), csrc/common/magnitude_select.h)
on factored rows (knots_ext.factor_ops.histogram on the CPU): a 1/16 lattice sample brackets each
task's threshold, one full pass finds it exactly, a missed bracket falls back to the radix rounds.
Every threshold is compared with the float64 k-th smallest magnitude of the materialised rows,
over rows sent as several modules (the threshold is global per task), for brackets counted key by
key (large rows), listed (small rows) and missed (rows whose sample misleads)."""
import math
import struct

import pytest
import torch

import knots_ext
from knots_ext import factor_ops, ops

from conftest import F64, assert_thresholds_equal, dare_ref32, gen, ref_threshold
from merge_refs import lattice_factors
from test_factor_ops import rows32  # the independent float32 model of the kernels' entries

MODULES = ["model.layers.0.q", "model.layers.0.v", "model.layers.1.q"]


def module_factors(shapes, ranks, seed):
    """Per module (m, c): continuous factors, a different magnitude per task and module."""
    g = gen(seed)
    out = []
    for m, c in shapes:
        f = []
        for i, r in enumerate(ranks):
            P = torch.randn(m, r, generator=g) * math.exp(torch.randn(1, generator=g).item())
            f.append((P, torch.randn(r, c, generator=g) / math.sqrt(r), (0.5 + i) * (-1) ** i))
        out.append(f)
    return out


def select(modules, top_k, sampled, dare_p=0.0, seed=0):
    """(thresholds, passes, missed) over every module's factors, task i of each module in slot i."""
    n = len(modules[0])
    sel = ops.MagnitudeThreshold(n, top_k, sampled=sampled)
    passes = 0
    while not sel.done:
        for name, factors in zip(MODULES, modules):
            factor_ops.histogram(sel, factors, dare_p, seed, name, list(range(n)))
        sel.finish_round()
        passes += 1
    return sel.thresholds(), passes, sel.missed if sampled else 0


def reference(modules, top_k, dare_p=0.0, seed=0) -> list:
    """Per task, the float64 k-th smallest magnitude of its float32 entries (the fma-chain model
    of test_factor_ops) over all modules, after DARE when dare_p > 0."""
    rows = [rows32(factors) for factors in modules]
    out = []
    for t in range(len(modules[0])):
        parts = [dare_ref32(r[t], dare_p, seed, t, name) if dare_p else r[t] for name, r in zip(MODULES, rows)]
        out.append(ref_threshold(torch.cat(parts), top_k))
    return out


@pytest.mark.parametrize(
    "shapes,top_k",
    [
        ([(37, 131), (8, 200), (64, 64)], 0.2),  # small rows: a listed bracket
        ([(640, 1024), (256, 1024), (640, 1024)], 0.2),  # large rows: a bracket counted key by key
        ([(640, 1024), (256, 1024), (640, 1024)], 0.01),
        ([(3, 5), (1, 1), (2, 17)], 0.5),  # rows smaller than one sample block
    ],
)
def test_sampled_thresholds_are_exact(shapes, top_k):
    modules = module_factors(shapes, [16, 4, 1], seed=len(shapes) + shapes[0][0])
    want = reference(modules, top_k)
    got, passes, missed = select(modules, top_k, sampled=True)
    assert_thresholds_equal(got, want, "sampled")
    assert select(modules, top_k, sampled=False)[0] == got
    if shapes[0][0] >= 37:  # a representative sample: one full pass after it, no task missed
        assert (passes, missed) == (2, 0)


def test_sampled_with_dare():
    modules = module_factors([(96, 300), (33, 300)], [16, 8, 2], seed=3)
    p, seed = 0.4, 2**33 + 5
    want = reference(modules, 0.3, p, seed)
    got, _, _ = select(modules, 0.3, sampled=True, dare_p=p, seed=seed)
    assert_thresholds_equal(got, want, "sampled, DARE")


def lattice_mask(m, c) -> torch.Tensor:
    """The sampled entries: blocks of 4 rows x 16 columns, in row block ib the column blocks
    jb = (5 ib) mod 16 + 16 j (csrc/common/magnitude_select.h: sample_first_block)."""
    ib = torch.arange(m)[:, None] // 4
    jb = torch.arange(c)[None, :] // 16
    return (jb % 16) == (5 * ib) % 16


@pytest.mark.parametrize("m", [64, 200])  # (200: sampled blocks 64 rows apart, taken two at a time on avx512)
def test_lattice_is_the_documented_one(m):
    """A row that is 1 on the lattice and 0 elsewhere: top_k = 1/16 of the entries is exactly the
    lattice, and the sample sees only ones, so its bracket (near 1) misses a threshold of 0."""
    c = 256
    mask = lattice_mask(m, c)
    assert int(mask.sum()) * 16 == m * c
    P, Q = lattice_factors(m, c)  # (the tests' shared adapter of the lattice: checked here)
    assert torch.equal((P @ Q).bool(), mask) and torch.equal((P @ Q).unique(), torch.tensor([0.0, 1.0]))
    modules = [[(P, Q, 1.0)]]
    for top_k in (0.5, 1 / 16, 0.01):
        got, passes, missed = _select_one(modules, top_k)
        assert got == [ref_threshold((P @ Q).reshape(-1), top_k)]
        if top_k == 0.5:  # the sample (all ones) misleads: the radix rounds decide
            assert missed == 1 and passes == 3


def _select_one(modules, top_k):
    sel = ops.MagnitudeThreshold(1, top_k, sampled=True)
    passes = 0
    while not sel.done:
        factor_ops.histogram(sel, modules[0], 0.0, 0, MODULES[0], [0])
        sel.finish_round()
        passes += 1
    return sel.thresholds(), passes, sel.missed


def test_misleading_sample_falls_back():
    """Continuous values on the lattice and a constant elsewhere, placed at the sample's own
    quantile: the bracket holds 15/16 of the entries (its list outgrows its bound, or the rank is
    outside it), the task falls back to the radix rounds, the threshold is still exact."""
    m, c = 512, 512
    mask = lattice_mask(m, c)
    g = gen(7)
    dense = torch.where(mask, torch.randn(m, c, generator=g, dtype=F64), torch.full((m, c), 0.8416, dtype=F64))
    # as factors: P = dense (m x c), Q = I (c x c): each entry is exactly dense's float32 value
    P, Q = dense.float(), torch.eye(c)
    for top_k in (0.2, 0.9):
        got, passes, missed = _select_one([[(P, Q, 1.0)]], top_k)
        assert got == [ref_threshold(P.reshape(-1), top_k)]
        assert missed == 1 and passes == 4, (top_k, passes, missed)  # sample, bracket, rounds 0 and 1


def test_keep_everything_and_zero_rows():
    modules = module_factors([(40, 70)], [4, 4], seed=9)
    modules[0][1] = (torch.zeros(40, 4), modules[0][1][1], 1.0)  # an all-zero row: threshold 0
    for top_k in (1.0, 0.3):
        got, passes, _ = select(modules, top_k, sampled=True)
        assert_thresholds_equal(got, reference(modules, top_k), f"top_k {top_k}")
        assert passes <= 2


def test_nonfinite_rows_are_detected():
    modules = module_factors([(40, 70), (8, 70)], [4, 2], seed=10)
    P = modules[1][0][0].clone()
    P[5, 1] = float("inf")
    modules[1][0] = (P, modules[1][0][1], 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        select(modules, 0.2, sampled=True)


def test_thread_count_does_not_change_thresholds(restore_threads):
    modules = module_factors([(301, 257), (64, 257)], [16, 3, 1], seed=11)
    results = []
    for threads in (1, 2):
        knots_ext.set_num_threads(threads)
        results.append(select(modules, 0.25, sampled=True))
    assert results[0] == results[1]


def test_sampled_selection_takes_factors_on_the_cpu_only():
    sel = ops.MagnitudeThreshold(1, 0.2, sampled=True)
    assert sel.sampled
    with pytest.raises(ValueError, match="factored rows on the CPU only"):
        sel.update(0, torch.randn(100))
    with pytest.raises(ValueError, match="factored rows on the CPU only"):
        sel.update_rows(torch.randn(1, 100))
    assert not ops.MagnitudeThreshold(1, 0.2).sampled


def histogram_counts(sel, n_tasks) -> torch.Tensor:
    """(n_tasks, 65536) counts of a selection's open pass, read from its serialized state
    (MagnitudeSelect::serialize: n, top_k, sampled, round, done, nonfinite, missed, then the
    nonzero bins of the flat n x 65536 histograms as (index, count) pairs)."""
    state = sel.selector.__getstate__()
    (nonzero,) = struct.unpack_from("<Q", state, struct.calcsize("<qd?i??q"))
    pairs = struct.unpack_from(f"<{2 * nonzero}Q", state, struct.calcsize("<qd?i??qQ"))
    counts = torch.zeros(n_tasks * 65536, dtype=torch.int64)
    counts[torch.tensor(pairs[0::2], dtype=torch.int64)] = torch.tensor(pairs[1::2], dtype=torch.int64)
    return counts.view(n_tasks, 65536)


@pytest.mark.parametrize(
    "m,c,ranks,slots,dare_p",
    [
        (70, 300, [4, 2, 3], [0, 1, 2], 0.0),
        (130, 40, [5, 5], [1, 0], 0.4),  # c not a whole number of sample blocks; DARE
        (5, 7, [3], [0], 0.0),  # smaller than one sample block
        (600, 1000, [6], [0], 0.0),  # one row, its column blocks shared by the threads
        (600, 1000, [3, 4, 2, 6], [0, 1, 2, 3], 0.3),  # rows taken whole by the threads
        (600, 1000, [3, 4, 2], [0, 1, 0], 0.0),  # two rows counted into one slot
    ],
)
def test_sample_pass_counts_the_lattice(m, c, ranks, slots, dare_p):
    """The sample pass's histograms hold exactly the top 16 bits of the lattice entries' keys (the
    float32 entries of the kernels' model, after DARE), per slot: whichever way the threads split
    the rows and columns."""
    g = gen(m + c)
    factors = [(torch.randn(m, r, generator=g), torch.randn(r, c, generator=g), 0.5 + i) for i, r in enumerate(ranks)]
    n_slots, seed = max(slots) + 1, 11
    sel = ops.MagnitudeThreshold(n_slots, 0.2, sampled=True)
    factor_ops.histogram(sel, factors, dare_p, seed, MODULES[0], list(range(len(ranks))), slots=slots)
    want = torch.zeros(n_slots, 65536, dtype=torch.int64)
    lattice = lattice_mask(m, c).reshape(-1)
    for t, row in enumerate(rows32(factors)):
        values = dare_ref32(row, dare_p, seed, t, MODULES[0]) if dare_p else row
        keys = (values[lattice].view(torch.int32) & 0x7FFFFFFF) >> 15
        want[slots[t]] += torch.bincount(keys.to(torch.int64), minlength=65536)
    assert int(want.sum()) == len(ranks) * int(lattice.sum())
    assert torch.equal(histogram_counts(sel, n_slots), want)
