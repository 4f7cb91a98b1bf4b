"""merge(..., executor="ray") (knots_ext.distributed) on a local Ray with 2 CPUs started here:
the same bits as the single-process engine for every method (same thresholds, DARE masks and
signs), written files included; a worker killed mid-merge is replaced and the result unchanged;
one clear line for each way it cannot run. The threshold counts it sums across processes are
checked against the tests' own float64 reference threshold."""
from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import load_file

import knots_ext
from knots_ext import cli, distributed, factor_ops, ops
from knots_ext.methods import METHODS
from knots_ext.io.memory import MemoryAdapter
from knots_ext.methods.spaces import FactoredUpdate
from conftest import ref_threshold
from merge_refs import PREFIX, SHAPES, write_adapter, write_lattice_adapter, write_random_grams


@pytest.fixture(scope="module")
def crash_marker(tmp_path_factory):
    """The path whose absence makes the next merge task's worker exit (distributed's test hook):
    present (no crash) unless a test removes it."""
    marker = tmp_path_factory.mktemp("ray") / "crashed"
    marker.touch()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"KNOTS_EXT_RAY_CRASH_ONCE": str(marker), "OMP_NUM_THREADS": "1"}})
    yield marker
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, crash_marker):
    root = tmp_path_factory.mktemp("adapters")
    paths = [write_adapter(root / "a0", 4, 8, seed=1),
             write_adapter(root / "a1", {"self_attn.q_proj": 2, "self_attn.v_proj": 6, "mlp.down_proj": 3}, 16,
                           seed=2, rslora=True),
             write_adapter(root / "a2", 8, 8, seed=3, dtype=torch.bfloat16),
             write_adapter(root / "a3", 4, 8, seed=4, zero=True)]  # a zero update: no votes anywhere
    grams = [root / f"g{i}.safetensors" for i in range(len(paths))]
    for i, g in enumerate(grams):
        write_random_grams(g, 2, SHAPES, 20 + i)
    return paths, grams


def params_of(method, grams):
    params = {"regmean": {"grams": grams}}.get(method, {})
    if "dare" in method:
        params = {**params, "dare_p": 0.4, "seed": 7}
    if "ties" in method:
        params = {**params, "top_k": 0.3}
    return params


def assert_same_bits(a, b):
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        x, y = a.modules[name], b.modules[name]
        assert type(x) is type(y), name
        parts = ((x.B, y.B), (x.A, y.A)) if isinstance(x, FactoredUpdate) else ((x.W, y.W),)
        for p, q in parts:
            assert p.shape == q.shape and p.dtype == q.dtype, name
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), f"{name}: bits differ"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_same_bits_as_one_process(inputs, method):
    paths, grams = inputs
    kw = params_of(method, grams)
    local = knots_ext.merge(paths, method, **kw)
    remote = knots_ext.merge(paths, method, executor="ray", **kw)
    assert_same_bits(local, remote)
    assert any(float(local.delta(n).abs().max()) > 0 for n in local.modules)  # (a merge, not zeros)


@pytest.mark.parametrize("method", ["ties", "dare-ties", "knots-ties"])
def test_module_scope_and_majority_signs(inputs, method):
    """Per-module thresholds, and top_k small enough that positions wait for the majority sign."""
    paths, grams = inputs
    for kw in ({"top_k_scope": "module"}, {"top_k": 0.05}):
        kw = {**params_of(method, grams), **kw}
        assert_same_bits(knots_ext.merge(paths, method, **kw), knots_ext.merge(paths, method, executor="ray", **kw))


def test_tasks_run_with_the_drivers_threads(tmp_path, crash_marker, restore_threads):
    """torch's float64 GEMMs of the KnOTS basis round differently with another thread count (8
    rank-16 tasks of a 2048-wide module: they do on the 2-core machines here), so every Ray task
    runs torch with the driver's threads: the bits of the merge in one process with as many."""
    shapes = {"self_attn.o_proj": (2048, 2048)}
    paths = [write_adapter(tmp_path / f"a{i}", 16, 16, layers=1, modules=shapes, seed=i) for i in range(8)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        local = knots_ext.merge(paths, "knots-ties", top_k=0.3)
        assert_same_bits(local, knots_ext.merge(paths, "knots-ties", top_k=0.3, executor="ray"))


def test_bases_of_many_tasks_with_the_threads_of_one_process(tmp_path, crash_marker, restore_threads):
    """With more than 16 tasks a process computes its bases side by side, torch's threads shared
    among them after the first module (driver.bases_threads): the Ray tasks follow the same
    rule, so the bits are those of the merge in one process with as many threads."""
    from knots_ext import driver

    shapes = {"self_attn.o_proj": (2048, 256), "self_attn.v_proj": (256, 256)}
    n = driver.BASES_ONE_THREAD_MAX_TASKS + 2
    paths = [write_adapter(tmp_path / f"a{i}", 16, 16, layers=2, modules=shapes, seed=i) for i in range(n)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        local = knots_ext.merge(paths, "knots-ties", top_k=0.3)
        assert_same_bits(local, knots_ext.merge(paths, "knots-ties", top_k=0.3, executor="ray"))


def test_rounds_after_a_missed_window(tmp_path, crash_marker):
    """A task whose sampled window misses (merge_refs.write_lattice_adapter): the rounds after the
    window pass count its rows only, on the workers as in one process; the same bits."""
    o_proj = "self_attn.o_proj"
    shapes = {o_proj: (64, 256), "self_attn.v_proj": (48, 256)}
    paths = [write_lattice_adapter(tmp_path / "a0", o_proj, shapes[o_proj])]
    paths += [write_adapter(tmp_path / f"a{i}", 16, 16, layers=1, modules=shapes, seed=i) for i in (1, 2)]
    for method in ("ties", "knots-ties"):
        local = knots_ext.merge(paths, method, top_k=0.5)
        assert_same_bits(local, knots_ext.merge(paths, method, top_k=0.5, executor="ray"))


def test_merge_to_writes_the_same_file(inputs, tmp_path):
    paths, _ = inputs
    knots_ext.merge_to(tmp_path / "local", paths, "ties", top_k=0.2)
    assert cli.main([*map(str, paths), "-o", str(tmp_path / "ray"), "--method", "ties", "--top-k", "0.2",
                     "--ray", "--quiet"]) == 0
    a = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ray" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 2 * 2 * len(SHAPES)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_worker_killed_mid_merge_is_retried(inputs, crash_marker):
    paths, grams = inputs
    kw = params_of("knots-dare-ties", grams)
    local = knots_ext.merge(paths, "knots-dare-ties", **kw)
    crash_marker.unlink()  # armed: the first merge task's worker process exits
    remote = knots_ext.merge(paths, "knots-dare-ties", executor="ray", **kw)
    assert crash_marker.exists(), "no worker was killed"
    assert_same_bits(local, remote)


def one_line_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_clear_errors(inputs, monkeypatch):
    paths, _ = inputs
    one_line_error(lambda: knots_ext.merge(paths, "ta", executor="spark"), "executor must be 'local' or 'ray'")
    # (merge refuses cuda first where there is no GPU: the executor's own check, directly)
    one_line_error(lambda: distributed.check_executor("ray", "cuda:0", []), "device must be 'cpu'")
    B, A = torch.randn(24, 4), torch.randn(4, 16)
    memory = [MemoryAdapter(f"<m{i}>", {f"{PREFIX}.0.self_attn.q_proj": (B, A)}, 1.0) for i in range(2)]
    one_line_error(lambda: knots_ext.merge(memory, "ta", executor="ray"), "<m0> is an adapter held in memory, not a path the workers can read")
    # no Ray connected here and nothing listening at the address
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    one_line_error(lambda: knots_ext.merge(paths, "ta", executor="ray", ray_address="127.0.0.1:9"),
                   "cannot reach the Ray cluster at 127.0.0.1:9")
    one_line_error(lambda: knots_ext.merge(paths, "ta", executor="ray", ray_address="nowhere"), "is not host:port")
    monkeypatch.setitem(sys.modules, "ray", None)  # not installed
    one_line_error(lambda: knots_ext.merge(paths, "ta", executor="ray"), "pip install 'knots-ext[ray]'")


def test_cli_error_line(inputs, tmp_path, capsys, monkeypatch):
    paths, _ = inputs
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    out = tmp_path / "out"
    assert cli.main([*map(str, paths), "-o", str(out), "--ray", "127.0.0.1:9", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray cluster at 127.0.0.1:9" in err[0], err
    assert not out.exists()  # no half-written output


# ---------------------------------------------------------------------------------------------
# The counts summed across processes: counting copies, pickled, against the float64 reference


@pytest.mark.parametrize("sampled", [False, True])
def test_counting_copies_give_the_reference_thresholds(sampled):
    gen = torch.Generator().manual_seed(3)
    n, top_k = 3, 0.3

    def ints(*shape):  # small integers: every entry exact whatever the summation order
        return torch.randint(-8, 9, shape, generator=gen).float()

    modules = [[(ints(m, r), ints(r, c), [0.5, 1.0, 2.0][t]) for t, r in enumerate((2, 5, 3))]
               for m, c in ((40, 70), (33, 129), (64, 64), (7, 300))]
    sel = ops.MagnitudeThreshold(n, top_k, sampled=sampled)
    while not sel.done:
        for i, factors in enumerate(modules):
            copy = pickle.loads(pickle.dumps(sel.counting_copy()))  # as Ray sends it to a worker and back
            name = f"m{i}"
            if sampled:
                factor_ops.histogram(copy, factors, 0.0, 0, name, list(range(n)))
            else:
                for t, (P, Q, s) in enumerate(factors):
                    copy.update(t, (s * P @ Q).float(), module=name)
            sel.add_counts(pickle.loads(pickle.dumps(copy)))
        sel.finish_round()
    got = sel.thresholds()
    for t in range(n):
        rows = torch.cat([(f[t][2] * f[t][0].double() @ f[t][1].double()).float().reshape(-1) for f in modules])
        want = ref_threshold(rows, top_k)
        assert np.float32(got[t]) == np.float32(want), (t, got[t], want)


def test_counts_of_another_pass_are_refused():
    a = ops.MagnitudeThreshold(2, 0.5)
    b = ops.MagnitudeThreshold(3, 0.5)
    with pytest.raises(ValueError, match="another selection or another pass"):
        a.add_counts(b.counting_copy())
    sel = a.counting_copy().selector
    state = sel.__getstate__()
    for bad in (state[:-12], state + b"\0"):
        with pytest.raises(ValueError, match="truncated|corrupt"):
            type(sel).__new__(type(sel)).__setstate__(bad)
