"""The generic driver and the streaming output: knots_ext.merge_to writes each module as soon as
it is final and gives the same adapter as merge().save(); space states spilled to disk between
passes change nothing; the per-module TIES scope in every space against float64 references;
the adapter writer's files (read back by safetensors and by the test's own reader)."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors import safe_open

import knots_ext
from knots_ext import driver
from knots_ext.methods import METHODS
from merge_refs import (
    close,
    read_scaled_factors,
    read_updates,
    ref_core,
    ref_global_ties,
    ref_knots,
    write_adapter,
    write_lattice_adapter,
)
from conftest import ref_ties


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("three")
    return [
        write_adapter(d / "a", 4, 8, seed=1),
        write_adapter(d / "b", {"self_attn.q_proj": 2, "self_attn.v_proj": 6, "mlp.down_proj": 3}, 16, seed=2),
        write_adapter(d / "c", 5, 5, seed=3, dtype=torch.bfloat16, modules={"self_attn.q_proj": (24, 16)}),
    ]


def method_kwargs(method, tmp_path, adapters):
    declared = METHODS[method].param_names
    kw = {k: v for k, v in dict(top_k=0.3, dare_p=0.4, seed=9, lam=0.9).items() if k in declared}
    if "grams" in declared:
        from knots_ext.grams import save_grams

        gen = torch.Generator().manual_seed(5)
        files = []
        for i, p in enumerate(adapters):
            grams = {}
            for name, (_, A) in read_scaled_factors(p).items():
                X = torch.randn(2 * A.shape[1], A.shape[1], generator=gen, dtype=torch.float64)
                grams[name.removeprefix("base_model.model.")] = X.T @ X
            files.append(tmp_path / f"g{i}.safetensors")
            save_grams(files[-1], grams)
        kw["grams"] = files
    return kw


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merge_to_writes_what_merge_saves(three, tmp_path, method):
    kw = method_kwargs(method, tmp_path, three)
    knots_ext.merge(three, method=method, **kw).save(tmp_path / "saved")
    summary = knots_ext.merge_to(tmp_path / "streamed", three, method=method, **kw)
    saved, streamed = read_updates(tmp_path / "saved"), read_updates(tmp_path / "streamed")
    assert sorted(summary.modules) == sorted(saved) == sorted(streamed)
    for name in saved:
        assert torch.equal(saved[name], streamed[name]), name
    manifest = json.loads((tmp_path / "streamed" / "knots_merge.json").read_text())
    assert manifest["merge"]["method"] == method and manifest["merge"]["params"]["lam"] == kw["lam"]


def test_merge_to_truncates_each_module(three, tmp_path):
    res = knots_ext.merge(three, method="knots-ties", top_k=0.5)
    knots_ext.merge_to(tmp_path / "r3", three, method="knots-ties", top_k=0.5, rank=3)
    low = read_updates(tmp_path / "r3")
    for name in res.modules:
        U, S, Vh = torch.linalg.svd(res.delta(name).double())
        close(low[name], (U[:, :3] * S[:3]) @ Vh[:3], 1e-4, name)


@pytest.mark.parametrize("method", ["knots-ties", "core-dare-ties", "ties"])
def test_states_on_disk_change_nothing(three, tmp_path, monkeypatch, method):
    kw = method_kwargs(method, tmp_path, three)
    in_memory = knots_ext.merge(three, method=method, **kw)
    monkeypatch.setattr(driver, "STATE_MEMORY", 0)  # every state goes to the temporary folder
    folders = []
    real_mkdtemp = driver.tempfile.mkdtemp

    def mkdtemp(**k):
        folders.append(real_mkdtemp(**k))
        return folders[-1]

    monkeypatch.setattr(driver.tempfile, "mkdtemp", mkdtemp)
    spilled = knots_ext.merge(three, method=method, **kw)
    if method != "ties":  # the dense space has no state
        assert folders and not any(os.path.exists(f) for f in folders)  # used, then removed
    for name in in_memory.modules:
        assert torch.equal(in_memory.delta(name), spilled.delta(name)), name


@pytest.mark.parametrize("method", ["ties", "knots-ties", "core-ties"])
def test_per_module_scope_in_every_space(three, method):
    updates = [read_updates(p) for p in three]
    names = sorted(updates[0])
    if method == "ties":
        reps, back = updates, lambda n_, m: m
    elif method == "knots-ties":
        U, reps = ref_knots(updates, names)
        back = lambda n_, m: U[n_] @ m  # noqa: E731
    else:
        bases, reps = ref_core(updates, [read_scaled_factors(p) for p in three], names)
        back = lambda n_, m: bases[n_][0] @ m @ bases[n_][1].T  # noqa: E731
    res = knots_ext.merge(three, method=method, top_k=0.3, top_k_scope="module")
    for name in names:
        having = [r[name] for r in reps if name in r]
        merged = ref_ties(torch.stack([h.reshape(-1) for h in having]), 0.3, 1.0).out.reshape(having[0].shape)
        close(res.delta(name), back(name, merged), 1e-4, name)


def test_written_safetensors_is_valid(three, tmp_path):
    knots_ext.merge_to(tmp_path / "o", three, method="ties", top_k=0.5, dtype=torch.bfloat16)
    path = tmp_path / "o" / "adapter_model.safetensors"
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert (8 + header_len) % 8 == 0 and header["__metadata__"]["format"] == "pt"
    assert json.loads(header["__metadata__"]["knots_ext.recipe"])["method"] == "ties"  # (test_recipe.py)
    ends = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
    assert ends[-1][1] == len(raw) - 8 - header_len  # the data exactly fill the file
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            t = f.get_tensor(key)
            assert t.dtype == torch.bfloat16 and list(t.shape) == header[key]["shape"]
    assert sorted(read_updates(tmp_path / "o")) == sorted(set().union(*(read_updates(p) for p in three)))


def test_failed_merge_leaves_nothing(three, tmp_path, monkeypatch):
    """An error half way through a streamed merge leaves no output and no temporary folder."""
    calls = []

    def failing(ref, update):
        calls.append(ref.name)
        if len(calls) == 2:
            raise ValueError("boom")

    real_run = driver.run

    def run(method, params, modules, load, n_tasks, emit, progress, *rest):
        def both(ref, update):
            failing(ref, update)
            emit(ref, update)

        return real_run(method, params, modules, load, n_tasks, both, progress, *rest)

    monkeypatch.setattr(driver, "run", run)
    with pytest.raises(ValueError, match="boom"):
        knots_ext.merge_to(tmp_path / "o", three, method="ta")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.fixture
def spill_folder(tmp_path, monkeypatch):
    """Every state spilled, into a temporary folder of the test's own (TMPDIR's role)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(driver, "STATE_MEMORY", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_states_that_will_not_fit_fail_before_any_is_written(three, tmp_path, monkeypatch, spill_folder):
    """States clearly larger than the temporary disk's free space: an OSError naming the folder
    and TMPDIR after the first basis, before a state is written; no output is left."""
    monkeypatch.setattr(driver, "free_bytes", lambda folder: 100)
    with pytest.raises(OSError, match="temporary states need about .* 100 bytes free; TMPDIR") as e:
        knots_ext.merge_to(tmp_path / "o", three, method="knots-ties", top_k=0.3)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(spill_folder)
    assert os.listdir(spill_folder) == [] and not (tmp_path / "o").exists()


def test_full_disk_while_spilling_is_one_clear_error(three, tmp_path, monkeypatch, spill_folder):
    """A state write that fails (ENOSPC): an OSError naming the states' folder, the cause and
    TMPDIR; the folder and the output are removed."""
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(driver, "open", Full, raising=False)
    with pytest.raises(OSError, match="cannot write the merge's temporary states .*No space left on device; TMPDIR") as e:
        knots_ext.merge_to(tmp_path / "o", three, method="knots-ties", top_k=0.3)
    assert e.value.errno == errno.ENOSPC
    assert os.path.dirname(e.value.filename) == str(spill_folder)
    assert os.listdir(spill_folder) == [] and not (tmp_path / "o").exists()


def test_cli_states_that_will_not_fit_one_error_line(three, tmp_path):
    """knots-merge: the same as one line on stderr naming the folder, exit code 2, no output."""
    code = (
        "import sys; from knots_ext import driver, cli; driver.free_bytes = lambda folder: 0; driver.STATE_MEMORY = 0; "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    args = ["--method", "knots-ties", "--top-k", "0.3", "-o", tmp_path / "o", *three]
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"knots-merge: error: {tmp_path}: "), r.stderr
    assert "TMPDIR" in lines[0] and not (tmp_path / "o").exists()


def test_dense_result_saved_exactly_without_svd(three, tmp_path):
    res = knots_ext.merge(three, method="ties", top_k=0.3)
    knots_ext.merge_to(tmp_path / "o", three, method="ties", top_k=0.3)
    back = read_updates(tmp_path / "o")
    with safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), framework="pt") as f:
        for name, update in res.modules.items():
            assert torch.equal(back[name].float(), update.W), name  # (W, I) or (I, W): exact
            assert f.get_slice(name + ".lora_A.weight").get_shape()[0] == min(update.W.shape)


@pytest.mark.parametrize("room", ["announced", "too-small"])
def test_writer_header_room(tmp_path, room):
    """The header goes into the room kept for it, or (room too small) the data are moved behind it."""
    factors = {f"model.layers.{i}.q_proj": (torch.randn(6, 2), torch.randn(2, 5)) for i in range(12)}
    keys = [f"base_model.model.{m}.lora_{x}.weight" for m in factors for x in "AB"]
    writer = knots_ext.io.AdapterWriter(tmp_path / "o", base_model=None, reserve_keys=keys if room == "announced"
                                        else keys[:1])
    with writer:
        for name, (B, A) in factors.items():
            writer.add(name, B, A)
    back = read_updates(tmp_path / "o")
    for name, (B, A) in factors.items():
        assert torch.equal(back["base_model.model." + name], B.double() @ A.double())
    raw = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0 and json.loads(raw[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}
    assert sorted(os.listdir(tmp_path / "o")) == ["adapter_config.json", "adapter_model.safetensors", "knots_merge.json"]


def test_writer_finite_checks_what_conversion_may_break(tmp_path):
    """add(..., finite=True) (the caller checked the values) skips the second finiteness pass only
    when nothing is converted: float32 values too large for float16 are still refused, and without
    finite=True NaN is refused; nothing is left behind."""
    big = torch.full((4, 2), 1e6)
    with pytest.raises(knots_ext.io.AdapterError, match="overflows"):
        with knots_ext.io.AdapterWriter(tmp_path / "h", base_model=None, dtype=torch.float16) as w:
            w.add("model.q", big, torch.ones(2, 3), finite=True)
    with pytest.raises(knots_ext.io.AdapterError, match="NaN or Inf"):
        with knots_ext.io.AdapterWriter(tmp_path / "n", base_model=None) as w:
            w.add("model.q", torch.full((4, 2), float("nan")), torch.ones(2, 3))
    assert os.listdir(tmp_path) == []
    with knots_ext.io.AdapterWriter(tmp_path / "o", base_model=None) as w:
        w.add("model.q", big, torch.ones(2, 3), finite=True)
    assert torch.equal(read_updates(tmp_path / "o")["base_model.model.model.q"], big.double() @ torch.ones(2, 3).double())


@pytest.mark.parametrize("method", ["ties", "knots-ties", "dare-ta", "dare-ties", "knots-ties-module"])
def test_merge_to_reuses_merged_buffers(three, tmp_path, monkeypatch, method):
    """merge_to's writer has consumed each update when emit returns, so the driver fills the next
    module of the same shape into the same buffer (OutputPool); the output is still exactly what
    merge() (which keeps every update, so no reuse) saves."""
    scope = {}
    if method.endswith("-module"):  # TIES with per-module thresholds: the per-module driver path
        method, scope = method.removesuffix("-module"), dict(top_k_scope="module")
    kw = dict(method_kwargs(method, tmp_path, three), **scope)
    knots_ext.merge(three, method=method, **kw).save(tmp_path / "saved")
    given = []
    for name in ("ties_apply", "weighted_sum"):
        real = getattr(driver.factor_ops, name)

        def spy(*a, _real=real, **k):
            given.append(k.get("out"))
            return _real(*a, **k)

        monkeypatch.setattr(driver.factor_ops, name, spy)
    knots_ext.merge_to(tmp_path / "streamed", three, method=method, **kw)
    assert given and given[0] is None and any(out is not None for out in given)
    saved, streamed = read_updates(tmp_path / "saved"), read_updates(tmp_path / "streamed")
    for name in saved:
        assert torch.equal(saved[name], streamed[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_patch_rewrites_entries(tmp_path, dtype):
    """AdapterWriter.patch sets flat entries of a module's written B or A (converted to the output
    dtype), other modules and entries untouched; an entry past the tensor is refused in one line
    and nothing is left behind."""
    gen = torch.Generator().manual_seed(3)
    B0, A0, B1, A1 = (torch.randn(*s, generator=gen) for s in ((6, 2), (2, 5), (4, 3), (3, 5)))
    with knots_ext.io.AdapterWriter(tmp_path / "o", base_model=None, dtype=dtype) as w:
        w.add("model.a", B0, A0)
        w.add("model.b", B1, A1)
        w.patch("model.a", "A", [0, 7], torch.tensor([2.5, -1.25]))
        w.patch("model.b", "B", [11], torch.tensor([0.5]))
    A0p, B1p = A0.clone(), B1.clone()
    A0p.view(-1)[[0, 7]] = torch.tensor([2.5, -1.25])
    B1p.view(-1)[11] = 0.5
    with safe_open(str(tmp_path / "o" / "adapter_model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    prefix = "base_model.model.model."
    for key, want in (("a.lora_B", B0), ("a.lora_A", A0p), ("b.lora_B", B1p), ("b.lora_A", A1)):
        assert torch.equal(got[prefix + key + ".weight"], want.to(dtype)), key
    for module, which, at, error in (("model.a", "A", 10, "has no entry 10"), ("model.a", "W", 0, "which='B' or 'A'"),
                                     ("model.z", "A", 0, "not written yet")):
        with pytest.raises(knots_ext.io.AdapterError, match=error):
            with knots_ext.io.AdapterWriter(tmp_path / "bad", base_model=None) as w:
                w.add("model.a", B0, A0)
                w.patch(module, which, [at], torch.tensor([1.0]))
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_writer_starts_writeback_as_it_goes(tmp_path, monkeypatch):
    """Every WRITEBACK_CHUNK bytes appended, the writer asks the kernel to start writing them
    (start_writeback): the ranges asked for follow one another through the data section, and the
    file is the same, patches of ranges already written back included."""
    from knots_ext.io import save

    asked = []
    real = save.start_writeback

    def spy(fd, offset, length):
        asked.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(save, "WRITEBACK_CHUNK", 1000)
    monkeypatch.setattr(save, "start_writeback", spy)
    gen = torch.Generator().manual_seed(5)
    factors = {f"model.m{i}": (torch.randn(20, 4, generator=gen), torch.randn(4, 30, generator=gen)) for i in range(6)}
    with knots_ext.io.AdapterWriter(tmp_path / "o", base_model=None) as w:
        for name, (B, A) in factors.items():
            w.add(name, B, A)
        w.patch("model.m0", "A", [3], torch.tensor([7.5]))  # (in a range already written back)
        start = w.data_start
    size = sum((B.numel() + A.numel()) * 4 for B, A in factors.values())
    assert asked[0][0] == start and size - 1000 < sum(n for _, n in asked) <= size
    assert all(o1 == o0 + n0 for (o0, n0), (o1, _) in zip(asked, asked[1:]))
    assert all(n >= 1000 for _, n in asked)
    factors["model.m0"][1].view(-1)[3] = 7.5
    back = read_updates(tmp_path / "o")
    for name, (B, A) in factors.items():
        assert torch.equal(back["base_model.model." + name], B.double() @ A.double()), name


def test_state_store_keeps_small_states_and_spills_large_ones():
    # In memory while the budget allows and the state is at most a quarter of it; larger states
    # go to disk even with room left (they would sit under every later module's SVD).
    store = driver.StateStore(budget=1024)
    small = (torch.arange(16, dtype=torch.float64), [torch.ones(4, 2)])  # 160 bytes
    large = (torch.arange(40, dtype=torch.float64), None)  # 320 bytes > 1024 / 4
    try:
        store.put("small", small)
        store.put("large", large)
        assert "small" in store.memory and "large" in store.on_disk and store.used == 160
        back = store.pop("large")
        assert torch.equal(back[0], large[0]) and back[1] is None and "large" not in store
        assert torch.equal(store.pop("small")[1][0], small[1][0]) and store.used == 0
    finally:
        store.close()


def test_bases_side_by_side_one_thread_each(tmp_path, restore_threads):
    """Global TIES on KnOTS computes small modules' bases with one torch thread each, several
    modules at a time (driver.bases_threads): the merge's bits are then the same whatever torch's
    thread count (with threads, the float64 GEMMs of 8 rank-16 tasks of a 2048-wide module round
    differently here), the workers did run (on threads of their own), torch's setting is back
    afterwards, and the result is TIES on the dense KnOTS representations (float64 reference)."""
    import threading

    shapes = {"self_attn.o_proj": (2048, 128), "self_attn.v_proj": (96, 128)}
    paths = [write_adapter(tmp_path / f"a{i}", 16, 16, layers=2, modules=shapes, seed=i) for i in range(8)]
    where = []
    real = driver.LocalPasses._load_prepared

    def spy(self, ref):
        where.append(threading.current_thread() is threading.main_thread())
        return real(self, ref)

    driver.LocalPasses._load_prepared = spy
    memory = driver.BASES_MEMORY
    try:
        results = {}
        for threads, room in ((1, memory), (2, memory), (2, 1)):  # (room 1: no memory for a second worker)
            torch.set_num_threads(threads)
            driver.BASES_MEMORY = room
            where.clear()
            results[threads, room] = knots_ext.merge(paths, "knots-ties", top_k=0.3)
            assert torch.get_num_threads() == threads
            # (all on this thread with one worker; with 2 threads and room, the first module with
            # tasks here and the others on workers)
            assert len(where) == 4 and where[0]
            assert all(where[1:]) if threads == 1 or room == 1 else not any(where[1:])
    finally:
        driver.LocalPasses._load_prepared = real
        driver.BASES_MEMORY = memory
    one = results[1, memory]
    for other in (results[2, memory], results[2, 1]):
        for name, u in one.modules.items():
            v = other.modules[name]
            assert torch.equal(u.B, v.B) and torch.equal(u.A, v.A), name
    updates = [read_updates(p) for p in paths]
    names = sorted(updates[0])
    U, reps = ref_knots(updates, names)
    merged = ref_global_ties(reps, names, {n: tuple(reps[0][n].shape) for n in names}, 0.3, 1.0)
    for name in names:
        close(one.delta(name), U[name] @ merged[name], 1e-4, name)


def test_bases_of_many_tasks_share_the_threads(tmp_path, monkeypatch, restore_threads):
    """With more than BASES_ONE_THREAD_MAX_TASKS tasks, global TIES on KnOTS prepares the first
    module with torch's threads and the others side by side, torch's threads shared among the
    workers (2 threads: two workers of one thread each), or one at a time with all of them when
    BASES_MEMORY holds one basis only; torch's setting is back afterwards, and the result is TIES
    on the dense KnOTS representations (float64 reference) either way."""
    import threading

    from knots_ext.methods.knots import KnotsSpace

    shapes = {"self_attn.o_proj": (160, 48), "self_attn.v_proj": (40, 48)}  # (k = 72: d_out above and below)
    n = driver.BASES_ONE_THREAD_MAX_TASKS + 2
    paths = [write_adapter(tmp_path / f"a{i}", 4, 8, layers=2, modules=shapes, seed=i) for i in range(n)]
    seen = []
    real = KnotsSpace.prepare

    def spy(self, m):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return real(self, m)

    monkeypatch.setattr(KnotsSpace, "prepare", spy)
    torch.set_num_threads(2)
    updates = [read_updates(p) for p in paths]
    names = sorted(updates[0])
    U, reps = ref_knots(updates, names)
    want = ref_global_ties(reps, names, {n: tuple(reps[0][n].shape) for n in names}, 0.3, 1.0)
    for room, threads in ((driver.BASES_MEMORY, [2, 1, 1, 1]), (1, [2, 2, 2, 2])):
        monkeypatch.setattr(driver, "BASES_MEMORY", room)
        seen.clear()
        merged = knots_ext.merge(paths, "knots-ties", top_k=0.3)
        assert torch.get_num_threads() == 2
        assert [t for _, t in seen] == threads and seen[0][0]
        assert all(main for main, _ in seen) == (room == 1)
        for name in names:
            close(merged.delta(name), U[name] @ want[name], 1e-4, name)


def test_rounds_after_a_missed_window_compute_only_its_task(tmp_path, monkeypatch):
    """Global dense TIES where task 0's sampled window misses (its update is 1 on the sample
    lattice and 0 elsewhere: the sample sees only ones, top_k 0.5 puts the threshold at 0) while
    the random tasks 1 and 2 settle in the window pass: the radix rounds after it load and
    compute task 0's rows only (nothing cached: FACTOR_MEMORY 0), a module without task 0 not at
    all, and the merge is TIES with the float64 thresholds."""
    from pathlib import Path

    from knots_ext.io.adapter import Adapter

    o_proj, v_proj, (m, c) = "self_attn.o_proj", "self_attn.v_proj", (64, 256)
    shapes = {o_proj: (m, c), v_proj: (48, c)}
    lattice = write_lattice_adapter(tmp_path / "a0", o_proj, (m, c))
    paths = [lattice, *(write_adapter(tmp_path / f"a{i}", 16, 16, layers=1, modules=shapes, seed=i) for i in (1, 2))]

    events: list = []
    real_histogram, real_factors = driver.factor_ops.histogram, Adapter.merge_factors
    real_finish = knots_ext.ops.MagnitudeThreshold.finish_round

    def histogram(sel, factors, dare_p, seed, module, tasks, slots=None):
        events.append(("rows", module.split(".")[-1], list(tasks)))
        return real_histogram(sel, factors, dare_p, seed, module, tasks, slots)

    def factors(self, module):
        events.append(("load", module.split(".")[-1], Path(self.path).name))
        return real_factors(self, module)

    def finish_round(self):
        events.append(("end",))
        return real_finish(self)

    monkeypatch.setattr(driver.factor_ops, "histogram", histogram)
    monkeypatch.setattr(Adapter, "merge_factors", factors)
    monkeypatch.setattr(knots_ext.ops.MagnitudeThreshold, "finish_round", finish_round)
    monkeypatch.setattr(driver, "FACTOR_MEMORY", 0)
    merged = knots_ext.merge(paths, "ties", top_k=0.5)

    rounds: list = [[]]
    for e in events:
        rounds.append([]) if e == ("end",) else rounds[-1].append(e)
    assert len(rounds) >= 4  # sample, window (task 0 missed), radix rounds; then the merge
    for r in rounds[:2]:
        assert ("rows", "o_proj", [0, 1, 2]) in r and ("rows", "v_proj", [1, 2]) in r
    for r in rounds[2:-1]:
        assert r == [("load", "o_proj", "a0"), ("rows", "o_proj", [0])]
    updates = [read_updates(p) for p in paths]
    names = sorted(updates[1])
    want = ref_global_ties(updates, names, {n_: tuple(updates[1][n_].shape) for n_ in names}, 0.5, 1.0)
    for name in names:
        close(merged.delta(name), want[name], 1e-4, name)


def test_bases_threads_rule():
    small = [driver.ModuleRef("a", list(range(16)), (4, 4)), driver.ModuleRef("b", [0, 1], (4, 4))]
    assert driver.bases_threads(small) == 1
    many = [*small, driver.ModuleRef("c", list(range(17)), (4, 4))]
    assert driver.bases_threads(many) is None and driver.bases_threads(small, workers=3) == 1
    assert driver.bases_threads(many, workers=2) == max(1, torch.get_num_threads() // 2)


def test_error_in_a_bases_worker_is_the_merges(tmp_path, monkeypatch, restore_threads):
    """A module whose basis fails in a worker fails the merge with that error (the workers' other
    modules finished first), and torch's thread count is restored."""
    torch.set_num_threads(2)
    paths = [write_adapter(tmp_path / f"a{i}", 4, 8, layers=3, seed=i) for i in range(3)]
    from knots_ext.methods.knots import KnotsSpace

    real = KnotsSpace.prepare

    def prepare(self, m):
        if m.name.endswith("layers.2.self_attn.q_proj"):
            raise ValueError(f"no basis for {m.name}")
        return real(self, m)

    monkeypatch.setattr(KnotsSpace, "prepare", prepare)
    with pytest.raises(ValueError, match="no basis for .*layers.2.self_attn.q_proj"):
        knots_ext.merge_to(tmp_path / "o", paths, "knots-ties", top_k=0.3)
    assert torch.get_num_threads() == 2 and not (tmp_path / "o").exists()


def test_merges_leave_earlier_objects_out_of_the_collector(three, tmp_path, monkeypatch):
    """merge and merge_to freeze the objects alive before them (gc.freeze: the collector's full
    passes skip them during the merge) and unfreeze them after; a caller's own freeze is left as it
    was."""
    import gc

    seen = []
    real = driver.run

    def spy(*a, **k):
        seen.append(gc.get_freeze_count())
        return real(*a, **k)

    monkeypatch.setattr(driver, "run", spy)
    assert gc.get_freeze_count() == 0
    knots_ext.merge(three, "ties", top_k=0.3)
    knots_ext.merge_to(tmp_path / "o", three, "ties", top_k=0.3)
    assert len(seen) == 2 and all(count > 0 for count in seen) and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        knots_ext.merge(three, "ties", top_k=0.3)
        assert gc.get_freeze_count() > 0  # (not unfrozen; objects frozen and since freed leave the count)
    finally:
        gc.unfreeze()


def test_merge_pass_holds_neither_histograms_nor_earlier_updates(three, tmp_path, monkeypatch):
    """While merge_to's TIES pass merges a module, the threshold selection (its histograms are
    n x 512 KB) and the updates of the modules already written (a KnOTS update's U: 64 MB at
    n = 256) are no longer held by the driver: the merge's peak memory is one module's."""
    import weakref

    selections, written, checked = [], [], []
    select = driver.LocalPasses.selection

    def selection(self, *a, **k):
        sel = select(self, *a, **k)
        selections.append(weakref.ref(sel))
        return sel

    real_apply, real_add = driver.factor_ops.ties_apply, knots_ext.io.AdapterWriter.add

    def ties_apply(*a, **k):
        assert selections and selections[0]() is None
        assert all(ref() is None for ref in written), "an earlier module's update is still held"
        checked.append(len(written))
        return real_apply(*a, **k)

    def add(self, module, B, A, **k):
        written.append(weakref.ref(B))
        return real_add(self, module, B, A, **k)

    monkeypatch.setattr(driver.LocalPasses, "selection", selection)
    monkeypatch.setattr(driver.factor_ops, "ties_apply", ties_apply)
    monkeypatch.setattr(knots_ext.io.AdapterWriter, "add", add)
    knots_ext.merge_to(tmp_path / "out", three, "knots-ties", top_k=0.3)
    assert len(checked) >= 3 and checked[-1] >= 2  # (modules merged after others were written)
