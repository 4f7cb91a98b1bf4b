"""Edge semantics of the merge (DESIGN.md §1), each against a float64 reference written in the
tests (merge_refs.py) or against the same merge without the input that must not count:
zero updates are absent ones for every method, TIES's global majority sign reaches every space,
the singular-vector sign convention makes a merge independent of threads and memory layout,
and parameters that would silently mean something else are refused with one line."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import knots_ext
from knots_ext.linalg import knots_svd, truncated_factors
from knots_ext.methods import METHODS
from knots_ext.methods.core_space import CoreSpace
from knots_ext.methods.spaces import ModuleTasks
from merge_refs import (F64, close, read_scaled_factors, read_updates, ref_core, ref_global_ties, ref_knots,
                        ref_tsv_m, write_adapter)

X = "base_model.model.model.layers.0.self_attn.q_proj"  # the module the tests zero or negate


def edited(src, dst, edit, config=None):
    """A copy of adapter src with its tensors passed through edit(dict) (and config fields set)."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(str(src / "adapter_model.safetensors")))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def zero_b(module):
    def edit(t):
        t[module + ".lora_B.weight"] = torch.zeros_like(t[module + ".lora_B.weight"])
        return t
    return edit


def without(module):
    return lambda t: {k: v for k, v in t.items() if not k.startswith(module + ".")}


def negated_b(keep_only=None):
    def edit(t):
        t = {k: (-v if ".lora_B." in k else v) for k, v in t.items()}
        return t if keep_only is None else {k: v for k, v in t.items() if k.startswith(keep_only + ".")}
    return edit


def random_grams(path, adapter, seed):
    from knots_ext.grams import save_grams

    gen = torch.Generator().manual_seed(seed)
    grams = {}
    for name, (_, A) in read_scaled_factors(adapter).items():
        d_in = A.shape[1]
        Xs = torch.randn(3 * d_in, d_in, generator=gen, dtype=F64)
        grams[name.removeprefix("base_model.model.")] = Xs.T @ Xs
    save_grams(path, grams)
    return path


def merge_kwargs(method):
    """Non-default values of the parameters the method takes."""
    kw = dict(top_k=0.4, dare_p=0.3, seed=3, lam=0.8)
    return {k: v for k, v in kw.items() if k in METHODS[method].param_names}


# ---------------------------------------------------------------------------------- zero updates


@pytest.fixture(scope="module")
def zero_case(tmp_path_factory):
    """(with_zeros, without, grams_with, grams_without): a, b where b's module X is zero in one
    version and missing in the other, then three all-zero adapters (B = 0 with A random, A = 0,
    lora_alpha = 0) that the first version has and the second does not."""
    d = tmp_path_factory.mktemp("zeros")
    a = write_adapter(d / "a", 4, 8, seed=1)
    b = write_adapter(d / "b", {"self_attn.q_proj": 3, "self_attn.v_proj": 5, "mlp.down_proj": 2}, 12, seed=2)
    b_zero = edited(b, d / "b_zero", zero_b(X))
    b_missing = edited(b, d / "b_missing", without(X))
    z_b = write_adapter(d / "z_b", 4, 8, seed=5, zero=True)
    z_a = edited(write_adapter(d / "src", 6, 8, seed=6), d / "z_a",
                 lambda t: {k: (torch.zeros_like(v) if ".lora_A." in k else v) for k, v in t.items()})
    z_s = edited(write_adapter(d / "src2", 2, 8, seed=7), d / "z_s", lambda t: t, config={"lora_alpha": 0})
    with_zeros = [a, b_zero, z_b, z_a, z_s]
    grams = [random_grams(d / f"g{i}.safetensors", p, 30 + i) for i, p in enumerate(with_zeros)]
    return with_zeros, [a, b_missing], grams, grams[:2]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_update_is_an_absent_one(zero_case, method):
    with_zeros, plain, grams, grams_plain = zero_case
    kw = merge_kwargs(method)
    if method == "regmean":
        kw = dict(kw, grams=grams)
    got = knots_ext.merge(with_zeros, method=method, **kw)
    if method == "regmean":
        kw = dict(kw, grams=grams_plain)
    want = knots_ext.merge(plain, method=method, **kw)
    assert sorted(got.modules) == sorted(want.modules)
    for name in want.modules:
        assert torch.equal(got.delta(name), want.delta(name)), f"{method} {name}"


@pytest.mark.parametrize("method", ["knots-ties", "core-ties", "tsv-m", "ties"])
def test_zero_adapter_against_reference(zero_case, method):
    """The methods the zero adapter used to throw off, against float64 references on a, b only."""
    with_zeros, plain, _, _ = zero_case
    updates = [read_updates(p) for p in plain]
    factors = [read_scaled_factors(p) for p in plain]
    names = sorted(updates[0])
    res = knots_ext.merge(with_zeros, method=method, **({"top_k": 0.4} if method.endswith("ties") else {}))
    if method == "knots-ties":
        U, reps = ref_knots(updates, names)
        shapes = {n: tuple(reps[0][n].shape) for n in names}
        merged = ref_global_ties(reps, names, shapes, 0.4, 1.0)
        want = {n: U[n] @ merged[n] for n in names}
    elif method == "core-ties":
        bases, cores = ref_core(updates, factors, names)
        shapes = {n: tuple(cores[0][n].shape) for n in names}
        merged = ref_global_ties(cores, names, shapes, 0.4, 1.0)
        want = {n: bases[n][0] @ merged[n] @ bases[n][1].T for n in names}
    elif method == "ties":
        shapes = {n: tuple(updates[0][n].shape) for n in names}
        want = ref_global_ties(updates, names, shapes, 0.4, 1.0)
    else:
        want = {n: ref_tsv_m([u[n] for u in updates if n in u], 1.0) for n in names}
    for name in names:
        close(res.delta(name), want[name], 1e-4, f"{method} {name}")


def test_zero_rank_component_leaves_no_basis_direction(tmp_path):
    """A LoRA component with a zero column of B (its row of A random) adds nothing to dW_i and
    must add nothing to Core Space's bases either."""
    a = write_adapter(tmp_path / "a", 4, 8, seed=1)
    b = write_adapter(tmp_path / "b", 4, 8, seed=2)

    def zero_column(t):
        for k in t:
            if ".lora_B." in k:
                t[k][:, 1] = 0.0
        return t

    b0 = edited(b, tmp_path / "b0", zero_column)
    updates = [read_updates(p) for p in (a, b0)]
    factors = [read_scaled_factors(p) for p in (a, b0)]
    for name in factors[1]:  # the reference sees the rank-3 factors
        sB, A = factors[1][name]
        keep = [0, 2, 3]
        factors[1][name] = (sB[:, keep], A[keep])
    names = sorted(updates[0])
    bases, cores = ref_core(updates, factors, names)
    shapes = {n: tuple(cores[0][n].shape) for n in names}
    merged = ref_global_ties(cores, names, shapes, 0.3, 1.0)
    res = knots_ext.merge([a, b0], method="core-ties", top_k=0.3)
    for name in names:
        assert res.modules[name].A.shape[0] == 7
        close(res.delta(name), bases[name][0] @ merged[name] @ bases[name][1].T, 1e-4, name)


def test_module_zero_in_every_adapter_is_a_zero_update(tmp_path):
    a = edited(write_adapter(tmp_path / "a0", 4, 8, seed=1), tmp_path / "a", zero_b(X))
    b = edited(write_adapter(tmp_path / "b0", 4, 8, seed=2), tmp_path / "b", zero_b(X))
    for method in ("knots-ties", "ties", "ta", "core-ties"):
        res = knots_ext.merge([a, b], method=method, **({"top_k": 0.5} if method.endswith("ties") else {}))
        assert torch.count_nonzero(res.delta(X)) == 0
        B, A = res.factors()[X]
        assert B.shape[1] == A.shape[0] == 1 and not B.any()  # saved as a rank-1 zero LoRA


# ---------------------------------------------------------------------------------- majority sign


@pytest.fixture(scope="module")
def opposite_case(tmp_path_factory):
    """a (modules X and others), n = -a on module X only, c on the other modules: every kept
    position of X has trimmed sum exactly 0 and takes the majority sign, which the other
    modules decide."""
    d = tmp_path_factory.mktemp("opposite")
    a = write_adapter(d / "a", 4, 8, seed=1)
    n = edited(a, d / "n", negated_b(keep_only=X))
    c = edited(write_adapter(d / "c0", 4, 8, seed=3), d / "c", without(X))
    return [a, n, c]


@pytest.fixture(scope="module")
def cancelled_case(tmp_path_factory):
    """a, n = -a on every module (equal thresholds, so every kept entry of a cancels n's), and c
    on every module but X: X's merged rows are all zero until the majority sign, which the other
    modules decide, fills them."""
    d = tmp_path_factory.mktemp("cancelled")
    a = write_adapter(d / "a", 4, 8, seed=1)
    c = edited(write_adapter(d / "c0", 4, 8, seed=3), d / "c", without(X))
    return [a, edited(a, d / "n", negated_b()), c]


@pytest.mark.parametrize("case", ["opposite_case", "cancelled_case"])
@pytest.mark.parametrize("method", ["ties", "knots-ties", "core-ties"])
def test_streamed_majority_sign_reaches_every_space(request, tmp_path, method, case):
    """merge_to where modules wait for the majority sign (written at once and patched, or, where
    the rows are not written verbatim, e.g. a dense update still all zero, held until the sign is
    known): the output equals what merge() + save() writes."""
    adapters = request.getfixturevalue(case)
    knots_ext.merge_to(tmp_path / "streamed", adapters, method=method, top_k=0.5)
    knots_ext.merge(adapters, method=method, top_k=0.5).save(tmp_path / "saved")
    streamed, saved = (read_updates(tmp_path / f) for f in ("streamed", "saved"))
    assert streamed.keys() == saved.keys() and saved[X].abs().max() > 0
    for name in saved:
        assert torch.equal(streamed[name], saved[name]), name


@pytest.fixture(scope="module")
def partly_opposite(tmp_path_factory):
    """a, n = -a on module X only, and c on every module: positions of X where c is trimmed and a
    and n survive have trimmed sum exactly 0 (they take the majority sign); the others do not, so
    X's merged rows are nonzero before the majority is known."""
    d = tmp_path_factory.mktemp("partly_opposite")
    a = write_adapter(d / "a", 4, 8, seed=1)
    return [a, edited(a, d / "n", negated_b(keep_only=X)), write_adapter(d / "c", 4, 8, seed=3)]


@pytest.mark.parametrize("method", ["ties", "knots-ties"])
def test_streamed_merge_patches_majority_positions(partly_opposite, tmp_path, monkeypatch, method):
    """merge_to writes a module waiting for the majority sign at once and rewrites those entries
    in the file at the end (not holding the module): the output equals the float64 reference, and
    in bfloat16 what merge() + save() writes."""
    patched = []
    real_patch = knots_ext.io.AdapterWriter.patch

    def patch(self, module, *args):
        patched.append(module)
        return real_patch(self, module, *args)

    monkeypatch.setattr(knots_ext.io.AdapterWriter, "patch", patch)
    updates = [read_updates(p) for p in partly_opposite]
    names = sorted(updates[0])
    if method == "ties":
        reps, back = updates, lambda n_, m: m
    else:
        U, reps = ref_knots(updates, names, round_to=torch.float32)
        back = lambda n_, m: U[n_] @ m  # noqa: E731
    want = ref_global_ties(reps, names, {n_: tuple(reps[0][n_].shape) for n_ in names}, 0.5, 1.0)
    knots_ext.merge_to(tmp_path / "f32", partly_opposite, method=method, top_k=0.5)
    assert X in patched
    got = read_updates(tmp_path / "f32")
    for name in names:
        close(got[name], back(name, want[name]), 1e-4, f"{method} {name}")
    knots_ext.merge_to(tmp_path / "bf16", partly_opposite, method=method, top_k=0.5, dtype=torch.bfloat16)
    knots_ext.merge(partly_opposite, method=method, top_k=0.5).save(tmp_path / "saved", dtype=torch.bfloat16)
    streamed, saved = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("bf16", "saved"))
    assert streamed.keys() == saved.keys()
    for key in saved:
        assert torch.equal(streamed[key], saved[key]), key


@pytest.mark.parametrize("method", ["ties", "knots-ties", "core-ties"])
def test_majority_sign_reaches_every_space(opposite_case, method):
    updates = [read_updates(p) for p in opposite_case]
    factors = [read_scaled_factors(p) for p in opposite_case]
    names = sorted(updates[0])
    if method == "ties":
        reps, back = updates, lambda n_, m: m
    elif method == "knots-ties":
        U, reps = ref_knots(updates, names, round_to=torch.float32)
        back = lambda n_, m: U[n_] @ m  # noqa: E731
    else:
        bases, reps = ref_core(updates, factors, names, round_to=torch.float32)
        back = lambda n_, m: bases[n_][0] @ m @ bases[n_][1].T  # noqa: E731
    shapes = {n_: tuple(reps[0][n_].shape) for n_ in names}
    want = ref_global_ties(reps, names, shapes, 0.5, 1.0)
    assert want[X].abs().max() > 0  # X is decided by the majority sign alone
    res = knots_ext.merge(opposite_case, method=method, top_k=0.5)
    for name in names:
        close(res.delta(name), back(name, want[name]), 1e-4, f"{method} {name}")


# ---------------------------------------------------------------------------------- sign convention


@pytest.fixture(scope="module")
def negation_case(tmp_path_factory):
    """a, its negation and b at sizes where LAPACK's results depend on the thread count."""
    d = tmp_path_factory.mktemp("negation")
    mods = {"self_attn.q_proj": (384, 256), "mlp.down_proj": (192, 520)}
    a = write_adapter(d / "a", 16, 16, seed=1, modules=mods, layers=1)
    n = edited(a, d / "n", negated_b())
    b = write_adapter(d / "b", 16, 16, seed=3, modules=mods, layers=1)
    return [a, n, b]


@pytest.mark.parametrize("method", ["knots-ties", "core-ties"])
def test_same_merge_for_any_thread_count(negation_case, method):
    updates = [read_updates(p) for p in negation_case]
    names = sorted(updates[0])
    if method == "knots-ties":
        U, reps = ref_knots(updates, names, round_to=torch.float32)
        back = lambda n_, m: U[n_] @ m  # noqa: E731
    else:
        bases, reps = ref_core(updates, [read_scaled_factors(p) for p in negation_case], names,
                               round_to=torch.float32)
        back = lambda n_, m: bases[n_][0] @ m @ bases[n_][1].T  # noqa: E731
    shapes = {n_: tuple(reps[0][n_].shape) for n_ in names}
    want = ref_global_ties(reps, names, shapes, 0.5, 1.0)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(knots_ext.merge(negation_case, method=method, top_k=0.5))
    finally:
        torch.set_num_threads(before)
    for name in names:
        for res in results:
            close(res.delta(name), back(name, want[name]), 1e-4, f"{method} {name}")


def _layouts(t):
    """t as stored row-major and as a column-major view of the same values."""
    return [t.contiguous(), t.T.contiguous().T]


def test_bases_do_not_depend_on_memory_layout():
    gen = torch.Generator().manual_seed(0)
    Bs = [torch.randn(40, r, generator=gen) for r in (3, 5)]
    As = [torch.randn(r, 30, generator=gen) for r in (3, 5)]
    Bs[1] = -Bs[0].clone().repeat(1, 2)[:, :5]  # partly the negation of task 0
    svds = [knots_svd([L(B) for B in Bs], [L(A) for A in As], [1.0, 0.5])
            for L in (lambda t: _layouts(t)[0], lambda t: _layouts(t)[1])]
    for U in (svds[0].U, svds[1].U):  # the convention itself: largest |entry| of each column > 0
        idx = U.abs().argmax(0)
        assert bool((U[idx, torch.arange(U.shape[1])] > 0).all())
    assert torch.allclose(svds[0].U, svds[1].U, atol=1e-12)
    for c0, c1 in zip(svds[0].coef, svds[1].coef):
        assert torch.allclose(c0, c1, atol=1e-10)
    P, Q = torch.randn(50, 6, generator=gen, dtype=F64), torch.randn(6, 20, generator=gen, dtype=F64)
    (B0, A0), (B1, A1) = (truncated_factors(L[0], L[1], rank=4) for L in zip(_layouts(P), _layouts(Q)))
    assert torch.allclose(B0, B1, atol=1e-12) and torch.allclose(A0, A1, atol=1e-12)
    cores = []
    for i in range(2):
        m = ModuleTasks("m", [0, 1], [(_layouts(B)[i], _layouts(A)[i]) for B, A in zip(Bs, As)], [1.0, 0.5], (40, 30))
        cores.append(CoreSpace().prepare(m))
    for x, y in zip(cores[0][:2], cores[1][:2]):
        assert torch.allclose(x, y, atol=1e-6)


# ---------------------------------------------------------------------------------- parameters


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    return [write_adapter(d / "a", 4, 8, seed=1), write_adapter(d / "b", 4, 8, seed=2)]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "knots_ext.cli", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def assert_one_line_refusal(done, *words, out=None):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for w in words:
        assert w in lines[0], lines[0]
    if out is not None:
        assert not out.exists()


@pytest.mark.parametrize("top_k", [20, 0.0, -0.1, 1.5, math.nan, math.inf])
def test_top_k_is_a_fraction(two, tmp_path, top_k):
    with pytest.raises(ValueError, match="top_k") as e:
        knots_ext.merge(two, method="ties", top_k=top_k)
    assert "20% is 0.2" in str(e.value)
    out = tmp_path / "o"
    assert_one_line_refusal(run_cli(*two, "-o", out, "--method", "ties", "--top-k", top_k), "top_k", "0.2", out=out)


def test_top_k_one_keeps_everything(two):
    """top_k = 1 keeps every entry: TIES is then elect + disjoint mean on the whole updates."""
    updates = [read_updates(p) for p in two]
    names = sorted(updates[0])
    shapes = {n: tuple(updates[0][n].shape) for n in names}
    want = ref_global_ties(updates, names, shapes, 1.0, 1.0)
    res = knots_ext.merge(two, method="ties", top_k=1.0)
    for name in names:
        close(res.delta(name), want[name], 1e-5, name)


BAD_PARAMS = [
    ("tol", math.nan), ("tol", math.inf), ("tol", -1e-3), ("lam", math.nan), ("lam", math.inf),
    ("lam", -math.inf), ("seed", -1), ("seed", 2**64), ("regmean_alpha", math.nan), ("common_fraction", 1.5),
]
# (method, other parameters it needs) for each parameter tested
PARAM_HOME = {"seed": ("knots-dare-ties", {"dare_p": 0.5}), "regmean_alpha": ("regmean", {}),
              "common_fraction": ("iso-cts", {})}


@pytest.mark.parametrize("name,value", BAD_PARAMS)
def test_bad_numbers_refused(two, tmp_path, name, value):
    method, others = PARAM_HOME.get(name, ("knots-ties", {}))
    with pytest.raises(ValueError, match=name):
        knots_ext.merge(two, method=method, **others, **{name: value})
    out = tmp_path / "o"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**others, name: value}.items()]
    assert_one_line_refusal(run_cli(*two, "-o", out, "--method", method, *flags), name, out=out)


def test_parameter_of_another_method_refused(two):
    with pytest.raises(ValueError, match="top_k does not apply to ta"):
        knots_ext.merge(two, method="ta", top_k=0.2)
    with pytest.raises(ValueError, match="dare_p does not apply to knots-ties"):
        knots_ext.merge(two, method="knots-ties", dare_p=0.2)
    with pytest.raises(ValueError, match="unknown parameter 'topk'"):
        knots_ext.merge(two, method="ties", topk=0.2)
    knots_ext.merge(two, method="ta", top_k=1.0)  # the default is no claim: accepted


@pytest.mark.parametrize("rank", [0, -1, True, 1.5])
def test_save_rank_refused(two, tmp_path, rank):
    res = knots_ext.merge(two, method="ta")
    with pytest.raises(ValueError, match="rank"):
        res.save(tmp_path / "o", rank=rank)
    assert not (tmp_path / "o").exists()


def test_one_path_instead_of_a_list(two):
    with pytest.raises(ValueError, match="list"):
        knots_ext.merge(str(two[0]), method="ta")
    with pytest.raises(ValueError, match="list"):
        knots_ext.merge(two[0], method="ta")


@pytest.mark.parametrize("device", ["gpu0", "meta", "cuda", "cuda:7"], ids=["gpu0", "meta", "no-gpu", "bad-index"])
def test_unusable_device(two, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > (7 if ":" in device else 0):
        pytest.skip("this machine has the device")
    with pytest.raises(ValueError, match="device"):
        knots_ext.merge(two, method="knots-ties", device=device)
    out = tmp_path / "o"
    assert_one_line_refusal(run_cli(*two, "-o", out, "--device", device), "device", out=out)


def test_overflow_names_lam(two, tmp_path):
    with pytest.raises(ValueError, match=r"lam=1e\+38") as e:
        knots_ext.merge(two, method="ta", lam=1e38)
    assert "overflows float32" in str(e.value) and str(two[0]) in str(e.value)
    out = tmp_path / "o"
    assert_one_line_refusal(run_cli(*two, "-o", out, "--method", "ta", "--lam", "1e38"), "lam=1e+38", out=out)


def test_overflowing_update_names_the_adapter(two, tmp_path):
    """Finite factors whose scaled update overflows float32 in the dense rows."""
    big = edited(two[1], tmp_path / "big", lambda t: {k: v * 1e18 for k, v in t.items()},
                 config={"lora_alpha": 8e6})
    with pytest.raises(ValueError, match="overflows float32") as e:
        knots_ext.merge([two[0], big], method="ties", top_k=0.5)
    assert str(big) in str(e.value)


def test_extra_average_with_mismatched_shapes(two, tmp_path):
    heads = []
    for i, (p, shape) in enumerate(zip(two, [(10, 16), (12, 16)])):
        heads.append(edited(p, tmp_path / f"h{i}", lambda t, s=shape: {**t, "base_model.model.score.weight":
                                                                       torch.ones(s)},
                            config={"modules_to_save": ["score"]}))
    with pytest.raises(ValueError, match="score.weight") as e:
        knots_ext.merge(heads, method="ta", extra="average")
    assert str(heads[1]) in str(e.value)
    out = tmp_path / "o"
    assert_one_line_refusal(run_cli(*heads, "-o", out, "--method", "ta", "--extra", "average"), "score.weight",
                            out=out)


@pytest.mark.parametrize("flags", [["--top-k", "abc"], ["--method", "nope"], ["--seed", "1.5"], ["--lam"]])
def test_bad_flags_get_one_line(two, tmp_path, flags):
    out = tmp_path / "o"
    assert_one_line_refusal(run_cli(*two, "-o", out, *flags), "knots-merge: error:", out=out)
