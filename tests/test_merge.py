"""The merge engine (knots_ext.merge) against the float64 references of merge_refs.py (materialised
matrices): every method, several shapes, mixed ranks, rslora, bf16 storage, a zero adapter,
duplicated adapters, n = 1, modules only some adapters have, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import knots_ext
from knots_ext import ops
from conftest import ref_ties
from merge_refs import (F64, SHAPES, close, read_scaled_factors, read_updates, ref_core, ref_global_ties, ref_knots,
                        ref_tsv_m, write_adapter, write_random_grams)


@pytest.fixture
def adapters(tmp_path):
    paths = [write_adapter(tmp_path / "a0", 4, 8, seed=1),
             write_adapter(tmp_path / "a1", {"self_attn.q_proj": 2, "self_attn.v_proj": 6, "mlp.down_proj": 3}, 16,
                           seed=2, rslora=True),
             write_adapter(tmp_path / "a2", 8, 8, seed=3, dtype=torch.bfloat16)]
    return paths


def test_ta_is_exact_sum(adapters):
    updates = [read_updates(p) for p in adapters]
    res = knots_ext.merge(adapters, method="ta", lam=0.7)
    for name in updates[0]:
        close(res.delta(name), 0.7 * sum(u[name] for u in updates), 1e-5, name)


def test_knots_ta_equals_ta(adapters):
    a = knots_ext.merge(adapters, method="ta", lam=0.5)
    b = knots_ext.merge(adapters, method="knots-ta", lam=0.5)
    for name in a.modules:
        close(b.delta(name), a.delta(name).double(), 1e-5, name)


@pytest.mark.parametrize("top_k,lam", [(1.0, 1.0), (0.3, 1.0), (0.1, -0.5)])
def test_ties_global_threshold(adapters, top_k, lam):
    updates = [read_updates(p) for p in adapters]
    names = sorted(updates[0])
    shapes = {n: tuple(updates[0][n].shape) for n in names}
    want = ref_global_ties(updates, names, shapes, top_k, lam)
    res = knots_ext.merge(adapters, method="ties", top_k=top_k, lam=lam)
    for name in names:
        close(res.delta(name), want[name], 1e-5, name)


@pytest.mark.parametrize("top_k,lam", [(1.0, 1.0), (0.4, 1.0), (0.2, 1.3)])
def test_knots_ties(adapters, top_k, lam):
    updates = [read_updates(p) for p in adapters]
    names = sorted(updates[0])
    U, reps = ref_knots(updates, names)
    shapes = {n: tuple(reps[0][n].shape) for n in names}
    merged = ref_global_ties(reps, names, shapes, top_k, lam)
    res = knots_ext.merge(adapters, method="knots-ties", top_k=top_k, lam=lam)
    for name in names:
        close(res.delta(name), U[name] @ merged[name], 1e-4, name)


def test_ties_per_module_scope(adapters):
    updates = [read_updates(p) for p in adapters]
    res = knots_ext.merge(adapters, method="ties", top_k=0.25, top_k_scope="module")
    for name in updates[0]:
        ref = ref_ties(torch.stack([u[name].reshape(-1) for u in updates]), 0.25, 1.0)
        close(res.delta(name), ref.out.reshape(updates[0][name].shape), 1e-5, name)


@pytest.mark.parametrize("method", ["dare-ties", "knots-dare-ties", "dare-ta", "knots-dare-ta"])
def test_dare_methods(adapters, method):
    updates = [read_updates(p) for p in adapters]
    names = sorted(updates[0])
    p, seed = 0.4, 7
    if method.startswith("knots"):
        U, rows = ref_knots(updates, names)
    else:
        U, rows = None, updates
    # DARE on each task's rows with the mask of (seed, task, module): ops.dare is tested on its own
    dared = [{n: ops.dare(r[n].float(), p, seed, task=i, module=n).double() for n in names}
             for i, r in enumerate(rows)]
    shapes = {n: tuple(dared[0][n].shape) for n in names}
    if method.endswith("ta"):
        want = {n: sum(d[n] for d in dared) for n in names}
    else:
        want = ref_global_ties(dared, names, shapes, 0.5, 1.0)
    kw = dict(top_k=0.5) if method.endswith("ties") else {}
    res = knots_ext.merge(adapters, method=method, dare_p=p, seed=seed, **kw)
    for name in names:
        expected = want[name] if U is None else U[name] @ want[name]
        close(res.delta(name), expected, 1e-4, name)


def test_zero_duplicate_and_single(tmp_path):
    a = write_adapter(tmp_path / "a", 4, 8, seed=1)
    z = write_adapter(tmp_path / "z", 4, 8, seed=2, zero=True)
    d = write_adapter(tmp_path / "d", 4, 8, seed=1)  # the same as a
    updates = [read_updates(p) for p in (a, z, d)]
    names = sorted(updates[0])
    U, reps = ref_knots(updates, names)
    for name in names:  # duplicates and zeros leave rank 4 in the concatenation
        assert U[name].shape[1] == 4
    shapes = {n: tuple(reps[0][n].shape) for n in names}
    merged = ref_global_ties(reps, names, shapes, 0.5, 1.0)
    res = knots_ext.merge([a, z, d], method="knots-ties", top_k=0.5)
    for name in names:
        assert res.modules[name].B.shape[1] == 4
        close(res.delta(name), U[name] @ merged[name], 1e-4, name)
    single = knots_ext.merge([a], method="knots-ties", top_k=1.0)
    for name in names:  # n = 1 with top_k = 1: the adapter itself
        close(single.delta(name), updates[0][name], 1e-5, name)


def test_partial_modules(tmp_path):
    a = write_adapter(tmp_path / "a", 4, 8, seed=1)
    b = write_adapter(tmp_path / "b", 2, 4, seed=2, modules={"self_attn.q_proj": (24, 16)})
    updates = [read_updates(p) for p in (a, b)]
    names = sorted(updates[0])
    U, reps = ref_knots(updates, names)
    shapes = {n: tuple(reps[0][n].shape) for n in names}
    merged = ref_global_ties(reps, names, shapes, 0.3, 1.0)
    res = knots_ext.merge([a, b], method="knots-ties", top_k=0.3)
    assert sorted(res.modules) == names
    for name in names:
        close(res.delta(name), U[name] @ merged[name], 1e-4, name)


def test_save_roundtrip_and_rank(adapters, tmp_path):
    res = knots_ext.merge(adapters, method="knots-ties", top_k=0.5)
    out = tmp_path / "merged"
    res.save(out)
    back = read_updates(out)
    for name in res.modules:
        close(back[name], res.delta(name).double(), 1e-5, name)
    res.save(tmp_path / "r2", rank=2)
    low = read_updates(tmp_path / "r2")
    for name in res.modules:
        full = res.delta(name).double()
        U, S, Vh = torch.linalg.svd(full)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        close(low[name], best, 1e-4, name)


def test_bad_arguments(adapters):
    with pytest.raises(ValueError, match="unknown method"):
        knots_ext.merge(adapters, method="nope")
    with pytest.raises(ValueError, match="dare_p"):
        knots_ext.merge(adapters, method="dare-ties")
    with pytest.raises(ValueError, match="dare_p"):
        knots_ext.merge(adapters, method="ties", dare_p=0.3)


def test_cli(adapters, tmp_path):
    out = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "knots_ext.cli", *map(str, adapters), "-o", str(out), "--method", "knots-ties",
           "--top-k", "0.5", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    res = knots_ext.merge(adapters, method="knots-ties", top_k=0.5)
    back = read_updates(out)
    for name in res.modules:
        close(back[name], res.delta(name).double(), 1e-5, name)
    bad = subprocess.run([sys.executable, "-m", "knots_ext.cli", str(tmp_path / "missing"), "-o", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "missing" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_non_lora_tensors_dropped_or_averaged(tmp_path):
    from safetensors.torch import load_file

    paths = []
    heads = []
    for i in range(2):
        p = write_adapter(tmp_path / f"h{i}", 4, 8, seed=i)
        t = load_file(str(p / "adapter_model.safetensors"))
        head = torch.randn(10, 16, generator=torch.Generator().manual_seed(10 + i))
        t["base_model.model.score.weight"] = head
        save_file(t, str(p / "adapter_model.safetensors"))
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg["modules_to_save"] = ["score"]
        (p / "adapter_config.json").write_text(json.dumps(cfg))
        paths.append(p)
        heads.append(head)
    dropped = knots_ext.merge(paths, method="ta")
    assert dropped.dropped_extra == ["base_model.model.score.weight"] and not dropped.extra
    averaged = knots_ext.merge(paths, method="ta", extra="average")
    torch.testing.assert_close(averaged.extra["base_model.model.score.weight"], (heads[0] + heads[1]) / 2)
    averaged.save(tmp_path / "with-head")
    saved = load_file(str(tmp_path / "with-head" / "adapter_model.safetensors"))
    torch.testing.assert_close(saved["base_model.model.score.weight"], (heads[0] + heads[1]) / 2)
    dropped.save(tmp_path / "no-head")
    assert "base_model.model.score.weight" not in load_file(str(tmp_path / "no-head" / "adapter_model.safetensors"))


def test_core_ta_equals_ta(adapters):
    a = knots_ext.merge(adapters, method="ta", lam=0.6)
    b = knots_ext.merge(adapters, method="core-ta", lam=0.6)
    for name in a.modules:
        close(b.delta(name), a.delta(name).double(), 1e-5, name)


@pytest.mark.parametrize("method,top_k,p", [("core-ties", 0.3, 0.0), ("core-ties", 1.0, 0.0),
                                            ("core-dare-ties", 0.5, 0.3)])
def test_core_space_ties(adapters, method, top_k, p):
    updates = [read_updates(q) for q in adapters]
    factors = [read_scaled_factors(q) for q in adapters]
    names = sorted(updates[0])
    bases, cores = ref_core(updates, factors, names)
    if p:
        cores = [{n: ops.dare(c[n].float(), p, 5, task=i, module=n).double() for n in names}
                 for i, c in enumerate(cores)]
    shapes = {n: tuple(cores[0][n].shape) for n in names}
    merged = ref_global_ties(cores, names, shapes, top_k, 1.0)
    dare = dict(dare_p=p, seed=5) if p else {}
    res = knots_ext.merge(adapters, method=method, top_k=top_k, **dare)
    for name in names:
        U_B, V_A = bases[name]
        close(res.delta(name), U_B @ merged[name] @ V_A.T, 1e-4, name)


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_iso_c(adapters, lam):
    updates = [read_updates(q) for q in adapters]
    res = knots_ext.merge(adapters, method="iso-c", lam=lam)
    for name in updates[0]:
        total = sum(u[name] for u in updates)
        U, S, Vh = torch.linalg.svd(total, full_matrices=False)
        keep = S > 1e-5  # the numerical rank: a rank-k sum of d x d has d - k zero singular values
        want = lam * S[keep].mean() * U[:, keep] @ Vh[keep]
        close(res.delta(name), want, 1e-5, name)
        assert res.modules[name].B.shape[1] == int(keep.sum())


@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_tsv_m(adapters, tmp_path, lam):
    # a fourth adapter of rank 8 makes 4 * per-task ranks exceed min(d)/n for the v_proj (12 x 16)
    paths = [*adapters, write_adapter(tmp_path / "a3", 8, 8, seed=4)]
    updates = [read_updates(q) for q in paths]
    res = knots_ext.merge(paths, method="tsv-m", lam=lam)
    for name in updates[0]:
        close(res.delta(name), ref_tsv_m([u[name] for u in updates], lam), 1e-4, name)


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_regmean_end_to_end(adapters, tmp_path, alpha):
    updates = [read_updates(q) for q in adapters]
    grams = [write_random_grams(tmp_path / f"g{i}.safetensors", 2, SHAPES, 20 + i) for i in range(len(adapters))]
    res = knots_ext.merge(adapters, method="regmean", grams=[tmp_path / f"g{i}.safetensors" for i in range(3)],
                          regmean_alpha=alpha, lam=1.0)
    for name in updates[0]:
        key = name.removeprefix("base_model.model.")
        shrunk = [alpha * g[key] + (1 - alpha) * torch.diag(torch.diag(g[key])) for g in grams]
        want = sum(u[name] @ g for u, g in zip(updates, shrunk)) @ torch.linalg.inv(sum(shrunk))
        close(res.delta(name), want, 1e-4, name)
    # from the CLI, and refused without Grams
    out = tmp_path / "rm"
    ok = subprocess.run([sys.executable, "-m", "knots_ext.cli", *map(str, adapters), "-o", str(out), "--method",
                         "regmean", "--regmean-alpha", str(alpha), "--quiet", "--grams",
                         *[str(tmp_path / f"g{i}.safetensors") for i in range(3)]], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "knots_ext.cli", *map(str, adapters), "-o", str(tmp_path / "no"),
                          "--method", "regmean", "--grams", str(tmp_path / "g0.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Gram" in bad.stderr
    assert not (tmp_path / "no").exists()


def test_iso_cts_through_merge(adapters):
    c = knots_ext.merge(adapters, method="iso-c", lam=0.8)
    full = knots_ext.merge(adapters, method="iso-cts", lam=0.8, common_fraction=1.0)
    for name in c.modules:  # all of the rank common: Iso-CTS is Iso-C
        close(full.delta(name), c.delta(name).double(), 1e-5, name)
    default = knots_ext.merge(adapters, method="iso-cts", lam=0.8)
    assert sorted(default.modules) == sorted(c.modules)


def test_linear_is_the_mean_over_the_adapters_that_have_the_module(tmp_path):
    a = write_adapter(tmp_path / "a", 4, 8, seed=1)
    b = write_adapter(tmp_path / "b", 2, 4, seed=2, modules={"self_attn.q_proj": (24, 16)})
    c = write_adapter(tmp_path / "c", 3, 6, seed=3)
    updates = [read_updates(p) for p in (a, b, c)]
    res = knots_ext.merge([a, b, c], method="linear", lam=0.9)
    for name in updates[0]:
        having = [u[name] for u in updates if name in u]
        close(res.delta(name), 0.9 * sum(having) / len(having), 1e-5, name)
