"""knots_ext.analysis (linear CKA between LoRA task updates, KnOTS Figure 2) against float64
references written here independently: the kernel form of linear CKA with an explicit centring
matrix H (the package uses the feature-space form), dense updates dW_i = s_i B_i A_i, and the
dense SVD of [dW_1 | ... | dW_n] for the KnOTS coordinates."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from knots_ext.analysis import adapter_cka, linear_cka, pairwise_cka, update_cka
from knots_ext.io import load_adapter

F64 = torch.float64
RTOL = 1e-10


# ------------------------------------------------------------------ references


def ref_cka(X, Y):
    """tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = X X^T, L = Y Y^T, H = I - 11^T / N."""
    X, Y = X.to(F64), Y.to(F64)
    N = X.shape[0]
    H = torch.eye(N, dtype=F64) - torch.ones(N, N, dtype=F64) / N
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda a, b: torch.trace(a @ H @ b @ H)  # noqa: E731
    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def ref_matrix(outs):
    n = len(outs)
    return torch.tensor([[ref_cka(outs[i], outs[j]) for j in range(n)] for i in range(n)], dtype=F64)


def rand_factors(gen, d_out, d_in, ranks):
    Bs = [torch.randn(d_out, r, generator=gen, dtype=F64) for r in ranks]
    As = [torch.randn(r, d_in, generator=gen, dtype=F64) for r in ranks]
    return Bs, As


def dense_updates(Bs, As, scales):
    return [s * (B.to(F64) @ A.to(F64)) for B, A, s in zip(Bs, As, scales)]


def ref_knots_outputs(Bs, As, scales, X, tol=1e-5, scaled=False):
    """X V_i (or X V_i diag(S)) from the dense SVD of the concatenated dense updates."""
    dWs = dense_updates(Bs, As, scales)
    _, S, Vh = torch.linalg.svd(torch.cat(dWs, dim=1), full_matrices=False)
    k = int((S > tol).sum())
    S, Vh = S[:k], Vh[:k]
    d_in = As[0].shape[1]
    outs = [X.to(F64) @ Vh[:, i * d_in:(i + 1) * d_in].T for i in range(len(dWs))]
    return [o * S for o in outs] if scaled else outs, S


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The matrices here are tiny: one intra-op thread avoids seconds of spinning when the
    machine's cores are busy with something else."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def layer():
    """Three tasks of different ranks on a non-square layer (d_out 24, d_in 40), N = 50 inputs."""
    gen = torch.Generator().manual_seed(0)
    Bs, As = rand_factors(gen, 24, 40, [2, 3, 4])
    X = torch.randn(50, 40, generator=gen, dtype=F64)
    return Bs, As, [0.5, 2.0, 1.25], X


# ------------------------------------------------------------------ linear_cka


@pytest.mark.parametrize("N,p,q", [(50, 7, 3), (100, 1, 4), (5, 2, 9), (12, 30, 45)])
def test_linear_cka_matches_kernel_form(N, p, q):
    gen = torch.Generator().manual_seed(N * 1000 + p * 10 + q)
    X = torch.randn(N, p, generator=gen, dtype=F64)
    # Y shares part of X's structure so CKA is not near zero.
    Y = X @ torch.randn(p, q, generator=gen, dtype=F64) + 0.5 * torch.randn(N, q, generator=gen, dtype=F64)
    got, want = linear_cka(X, Y), ref_cka(X, Y)
    assert 0.0 < want <= 1.0
    assert math.isclose(got, want, rel_tol=RTOL), (got, want)
    assert math.isclose(linear_cka(Y, X), want, rel_tol=RTOL)


def test_linear_cka_float32_input_is_computed_in_float64():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 6, generator=gen)
    Y = torch.randn(30, 5, generator=gen)
    assert math.isclose(linear_cka(X, Y), ref_cka(X.double(), Y.double()), rel_tol=RTOL)


def test_linear_cka_self_is_one():
    gen = torch.Generator().manual_seed(2)
    for shape in [(40, 8), (6, 20)]:
        X = torch.randn(*shape, generator=gen, dtype=F64) + 3.0
        assert math.isclose(linear_cka(X, X), 1.0, rel_tol=1e-12)


def test_linear_cka_invariances():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(60, 8, generator=gen, dtype=F64)
    Y = X[:, :5] @ torch.randn(5, 6, generator=gen, dtype=F64) + torch.randn(60, 6, generator=gen, dtype=F64)
    base = linear_cka(X, Y)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=F64))
    assert math.isclose(linear_cka(X @ Q, Y), base, rel_tol=1e-10)
    assert math.isclose(linear_cka(X, 7.5 * Y), base, rel_tol=1e-10)
    assert math.isclose(linear_cka(X + 4.0, Y - 2.0), base, rel_tol=1e-10)  # centring
    aniso = torch.linspace(0.1, 10.0, 8, dtype=F64)
    changed = linear_cka(X * aniso, Y)
    assert math.isclose(changed, ref_cka(X * aniso, Y), rel_tol=RTOL)
    assert abs(changed - base) > 1e-3, (changed, base)


def test_linear_cka_zero_is_zero_not_nan():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(10, 3, generator=gen, dtype=F64)
    assert linear_cka(X, torch.zeros(10, 4, dtype=F64)) == 0.0
    assert linear_cka(torch.full((10, 2), 3.0, dtype=F64), X) == 0.0  # constant: zero once centred
    assert linear_cka(torch.zeros(10, 2), torch.zeros(10, 2)) == 0.0


def test_linear_cka_errors():
    X = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(X, torch.randn(11, 3))
    with pytest.raises(ValueError, match="at least 2"):
        linear_cka(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(torch.randn(10), X)


def test_pairwise_cka_matches_pairs():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(25, 4, generator=gen, dtype=F64)
    reps = [base @ torch.randn(4, p, generator=gen, dtype=F64) + torch.randn(25, p, generator=gen, dtype=F64)
            for p in (3, 6, 1)] + [torch.zeros(25, 2, dtype=F64)]
    M = pairwise_cka(reps)
    assert M.dtype == F64 and M.shape == (4, 4)
    assert torch.equal(M, M.T)
    assert torch.allclose(torch.diagonal(M)[:3], torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    assert torch.all(M[3] == 0) and torch.all(M[:, 3] == 0)
    assert torch.allclose(M[:3, :3], ref_matrix(reps[:3]), rtol=RTOL, atol=0)
    with pytest.raises(ValueError, match="representation 1 has N=24"):
        pairwise_cka([reps[0], reps[1][:-1]])


# ------------------------------------------------------------------ update_cka


def test_update_cka_raw_matches_dense(layer):
    Bs, As, scales, X = layer
    dWs = dense_updates(Bs, As, scales)
    want = ref_matrix([X @ dW.T for dW in dWs])
    got = update_cka(Bs, As, scales, X)
    assert got.shape == (3, 3)
    assert torch.allclose(got, want, rtol=RTOL, atol=1e-14)
    # float32 factors give the same values (computed in float64 from the rounded factors).
    got32 = update_cka([B.float() for B in Bs], [A.float() for A in As], scales, X.float())
    want32 = ref_matrix([X.float().double() @ dW.T for dW in
                         dense_updates([B.float() for B in Bs], [A.float() for A in As], scales)])
    assert torch.allclose(got32, want32, rtol=RTOL, atol=1e-14)


def test_update_cka_knots_matches_dense_svd(layer):
    Bs, As, scales, X = layer
    want_outs, S = ref_knots_outputs(Bs, As, scales, X)
    # Distinct singular values: the dense SVD's V is then unique up to one sign per direction,
    # shared by all tasks' blocks, and linear CKA is invariant to that common sign flip.
    assert S.numel() == 9
    assert float((S[:-1] - S[1:]).min()) > 1e-3 * float(S[0])
    want = ref_matrix(want_outs)
    got = update_cka(Bs, As, scales, X, space="knots")
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    # The aligned comparison is a different quantity from the raw one.
    raw = update_cka(Bs, As, scales, X)
    assert (got - raw).abs().max() > 1e-3


def test_update_cka_knots_scaled_equals_raw(layer):
    Bs, As, scales, X = layer
    raw = update_cka(Bs, As, scales, X)
    scaled = update_cka(Bs, As, scales, X, space="knots-scaled")
    assert torch.allclose(scaled, raw, rtol=1e-9, atol=1e-12)
    want_outs, _ = ref_knots_outputs(Bs, As, scales, X, scaled=True)
    assert torch.allclose(scaled, ref_matrix(want_outs), rtol=1e-9, atol=1e-12)


def test_update_cka_small_N_uses_same_values():
    """N smaller than the feature counts (the Gram-matrix path)."""
    gen = torch.Generator().manual_seed(6)
    Bs, As = rand_factors(gen, 64, 48, [5, 7])
    X = torch.randn(6, 48, generator=gen, dtype=F64)
    want = ref_matrix([X @ dW.T for dW in dense_updates(Bs, As, [1.0, 3.0])])
    assert torch.allclose(update_cka(Bs, As, [1.0, 3.0], X), want, rtol=RTOL, atol=1e-14)
    kn, _ = ref_knots_outputs(Bs, As, [1.0, 3.0], X)
    assert torch.allclose(update_cka(Bs, As, [1.0, 3.0], X, space="knots"), ref_matrix(kn), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("space", ["raw", "knots", "knots-scaled"])
def test_update_cka_zero_adapter(layer, space):
    Bs, As, scales, X = layer
    Bz = [Bs[0], torch.zeros_like(Bs[1]), Bs[2]]
    got = update_cka(Bz, As, scales, X, space=space)
    assert torch.isfinite(got).all()
    assert torch.all(got[1] == 0) and torch.all(got[:, 1] == 0)
    # The other two tasks are compared as if the zero one were absent.
    two = update_cka([Bs[0], Bs[2]], [As[0], As[2]], [scales[0], scales[2]], X, space=space)
    assert torch.allclose(got[[0, 2]][:, [0, 2]], two, rtol=1e-9, atol=1e-12)
    assert got[0, 2] > 0


def test_update_cka_errors(layer):
    Bs, As, scales, X = layer
    with pytest.raises(ValueError, match="at least 2"):
        update_cka(Bs, As, scales, X[:1])
    with pytest.raises(ValueError, match="d_in=40 columns but X has 39"):
        update_cka(Bs, As, scales, X[:, :39])
    with pytest.raises(ValueError, match="space must be one of"):
        update_cka(Bs, As, scales, X, space="dense")
    with pytest.raises(ValueError, match="task 1: B .* do not chain"):
        update_cka([Bs[0], Bs[1][:20]], As[:2], scales[:2], X)
    with pytest.raises(ValueError, match="one B, A and scale per task"):
        update_cka(Bs, As[:2], scales, X)


# ------------------------------------------------------------------ adapter_cka


def write_peft_adapter(path, modules, r, alpha, gen, fan_in_fan_out=False):
    """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors with keys
    base_model.model.<module>.lora_{A,B}.weight (float32). Returns {module: (B, A)}."""
    path.mkdir()
    tensors, factors = {}, {}
    for name, (d_out, d_in) in modules.items():
        B = torch.randn(d_out, r, generator=gen)
        A = torch.randn(r, d_in, generator=gen)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
        factors[name] = (B, A)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=r, lora_alpha=alpha, target_modules=sorted({n.split(".")[-1] for n in modules}),
                  base_model_name_or_path="tiny-test-model", fan_in_fan_out=fan_in_fan_out)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


def test_adapter_cka_matches_update_cka(tmp_path):
    gen = torch.Generator().manual_seed(7)
    q, v = "layer.q", "layer.v"
    specs = [(2, 4.0, {q: (24, 40), v: (16, 40)}, False),
             (3, 16.0, {q: (24, 40), v: (16, 40)}, True),
             (4, 2.0, {q: (24, 40)}, False)]  # no layer.v: that module is skipped
    paths, facs, scales = [], [], []
    for i, (r, alpha, mods, fifo) in enumerate(specs):
        paths.append(tmp_path / f"a{i}")
        facs.append(write_peft_adapter(paths[-1], mods, r, alpha, gen, fan_in_fan_out=fifo))
        scales.append(alpha / r)
    X = torch.randn(50, 40, generator=gen, dtype=F64)
    inputs = {f"base_model.model.{q}": X, f"base_model.model.{v}": X, "base_model.model.layer.k": X}

    for space in ("raw", "knots"):
        got = adapter_cka(paths, inputs, space=space)
        assert list(got) == [f"base_model.model.{q}"]
        want = update_cka([f[q][0] for f in facs], [f[q][1] for f in facs], scales, X, space=space)
        assert torch.allclose(got[f"base_model.model.{q}"], want, rtol=1e-12, atol=1e-14)
    # Against the dense reference too, with the scales alpha / r written by hand.
    dWs = dense_updates([f[q][0] for f in facs], [f[q][1] for f in facs], [2.0, 16.0 / 3, 0.5])
    assert torch.allclose(adapter_cka(paths, inputs)[f"base_model.model.{q}"],
                          ref_matrix([X @ dW.T for dW in dWs]), rtol=1e-9, atol=1e-12)

    # Loaded Adapter objects, and module names without the PEFT prefix.
    ads = [load_adapter(p) for p in paths[:2]]
    got = adapter_cka(ads, {q: X, v: X[:20]})
    assert list(got) == [q, v]
    want_v = update_cka([f[v][0] for f in facs[:2]], [f[v][1] for f in facs[:2]], scales[:2], X[:20])
    assert torch.allclose(got[v], want_v, rtol=1e-12, atol=1e-14)
    assert got[q].shape == (2, 2)


def test_adapter_cka_no_common_module(tmp_path):
    gen = torch.Generator().manual_seed(8)
    write_peft_adapter(tmp_path / "a", {"layer.q": (8, 6)}, 2, 2.0, gen)
    write_peft_adapter(tmp_path / "b", {"layer.v": (8, 6)}, 2, 2.0, gen)
    with pytest.raises(ValueError, match="present in every adapter"):
        adapter_cka([tmp_path / "a", tmp_path / "b"], {"layer.q": torch.randn(5, 6)})
