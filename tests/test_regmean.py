"""RegMean (knots_ext.methods.regmean) against a float64 reference on materialised matrices, and
the Gram collection / file round trip and checks (knots_ext.grams)."""
from __future__ import annotations

import os

import pytest
import torch

from knots_ext.grams import GramError, collect_grams, load_grams, save_grams
from knots_ext.methods.regmean import module_grams, regmean
from knots_ext.methods.spaces import ModuleTasks

F64 = torch.float64


def rand_gram(d_in, rows, gen):
    X = torch.randn(rows, d_in, generator=gen, dtype=F64) * torch.rand(d_in, generator=gen, dtype=F64).add(0.2)
    return X, X.T @ X


def make_tasks(d_out, d_in, ranks, gen, name="base_model.model.layers.0.q_proj"):
    factors, scales = [], []
    for r in ranks:
        factors.append((torch.randn(d_out, r, generator=gen) * 0.3, torch.randn(r, d_in, generator=gen) * 0.3))
        scales.append(16.0 / r)
    return ModuleTasks(name, list(range(len(ranks))), factors, scales, (d_out, d_in))


def dense_updates(m):
    return [s * (B.double() @ A.double()) for (B, A), s in zip(m.factors, m.scales)]


def reference(m, grams, alpha, lam=1.0):
    """dW* = lam (sum dW_i G~_i)(sum G~_i)^-1, materialised, float64."""
    Gt = [alpha * G + (1 - alpha) * torch.diag(torch.diag(G)) for G in grams]
    num = sum(dW @ G for dW, G in zip(dense_updates(m), Gt))
    return lam * num @ torch.linalg.inv(sum(Gt))


def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("d_out,d_in,ranks", [
    (16, 16, [4, 4]),
    (24, 40, [2, 8, 5]),
    (48, 12, [3, 1]),
    (33, 20, [6, 6, 6, 2, 1]),
])
@pytest.mark.parametrize("alpha", [0.9, 1.0, 0.0])
def test_matches_dense_reference(d_out, d_in, ranks, alpha):
    gen = torch.Generator().manual_seed(d_out * 100 + d_in + len(ranks))
    m = make_tasks(d_out, d_in, ranks, gen)
    grams = [rand_gram(d_in, 3 * d_in, gen)[1] for _ in ranks]
    out = regmean(m, grams, alpha=alpha, lam=0.7)
    assert out.B.dtype == torch.float32 and out.A.dtype == torch.float32
    assert out.B.shape == (d_out, sum(ranks)) and out.A.shape == (sum(ranks), d_in)
    assert rel_err(out.dense(), reference(m, grams, alpha, lam=0.7)) < 1e-5


def test_equal_grams_give_the_average():
    gen = torch.Generator().manual_seed(1)
    m = make_tasks(20, 30, [4, 2, 7], gen)
    _, G = rand_gram(30, 100, gen)
    out = regmean(m, [G, G, G], alpha=0.9)
    avg = sum(dense_updates(m)) / 3
    assert rel_err(out.dense(), avg) < 1e-5


def test_single_task_is_identity():
    gen = torch.Generator().manual_seed(2)
    m = make_tasks(10, 14, [3], gen)
    out = regmean(m, [rand_gram(14, 50, gen)[1]])
    assert rel_err(out.dense(), dense_updates(m)[0]) < 1e-5


def test_minimises_regression_objective():
    """alpha = 1: W0 + dW* minimises sum_i ||X_i W^T - X_i W_i^T||^2 with W_i = W0 + dW_i."""
    gen = torch.Generator().manual_seed(3)
    d_out, d_in = 18, 22
    m = make_tasks(d_out, d_in, [3, 5, 2], gen)
    Xs = [rand_gram(d_in, 40, gen)[0] for _ in range(3)]
    out = regmean(m, [X.T @ X for X in Xs], alpha=1.0)
    W0 = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    Ws = [W0 + dW for dW in dense_updates(m)]

    def objective(W):
        return sum(((X @ W.T - X @ Wi.T) ** 2).sum() for X, Wi in zip(Xs, Ws))

    W = (W0 + out.B.double() @ out.A.double()).requires_grad_(True)
    objective(W).backward()
    # The gradient scale at a generic point, e.g. at the plain average.
    Wa = (W0 + sum(dense_updates(m)) / 3).requires_grad_(True)
    objective(Wa).backward()
    assert float(W.grad.norm()) < 1e-5 * float(Wa.grad.norm())
    with torch.no_grad():
        assert float(objective(W)) < float(objective(Wa))


def test_singular_sum_falls_back_to_pinv(monkeypatch):
    """alpha = 1 with fewer input vectors than d_in, and a feature no task ever sees: the sum is
    singular; the result is the minimum-norm solution dW* = num @ pinv(sum G)."""
    gen = torch.Generator().manual_seed(4)
    d_out, d_in = 12, 16
    m = make_tasks(d_out, d_in, [2, 3], gen)
    grams = []
    for _ in range(2):
        X = torch.randn(5, d_in, generator=gen, dtype=F64)
        X[:, 7] = 0.0
        grams.append(X.T @ X)
    calls = []
    real_pinv = torch.linalg.pinv
    monkeypatch.setattr(torch.linalg, "pinv", lambda *a, **k: calls.append(1) or real_pinv(*a, **k))
    out = regmean(m, grams, alpha=1.0)
    assert calls  # the fallback ran
    monkeypatch.undo()
    num = sum(dW @ G for dW, G in zip(dense_updates(m), grams))
    ref = num @ torch.linalg.pinv(sum(grams), hermitian=True)
    assert torch.isfinite(out.A).all()
    assert rel_err(out.dense(), ref) < 1e-5
    assert float(out.dense()[:, 7].abs().max()) < 1e-6
    # With alpha < 1 only the dead feature makes it singular.
    out9 = regmean(m, grams, alpha=0.9)
    Gt = [0.9 * G + 0.1 * torch.diag(torch.diag(G)) for G in grams]
    ref9 = sum(dW @ G for dW, G in zip(dense_updates(m), Gt)) @ torch.linalg.pinv(sum(Gt), hermitian=True)
    assert rel_err(out9.dense(), ref9) < 1e-5


def test_bad_arguments():
    gen = torch.Generator().manual_seed(5)
    m = make_tasks(8, 6, [2, 2], gen)
    G = rand_gram(6, 20, gen)[1]
    with pytest.raises(ValueError, match="alpha"):
        regmean(m, [G, G], alpha=1.5)
    with pytest.raises(ValueError, match="1 Grams for 2 tasks"):
        regmean(m, [G])
    with pytest.raises(ValueError, match="expected 6 x 6"):
        regmean(m, [G, torch.eye(5, dtype=F64)])


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 10)
        self.act = torch.nn.GELU()
        self.block = torch.nn.ModuleDict({"down": torch.nn.Linear(10, 4, bias=False)})
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, scale=1.0):
        return self.block["down"](self.dropout(self.act(self.up(x * scale))))


def captured_inputs(model, batches):
    seen = {"up": [], "block.down": []}
    hooks = [model.up.register_forward_pre_hook(lambda mod, a: seen["up"].append(a[0].reshape(-1, 6).double())),
             model.block["down"].register_forward_pre_hook(
                 lambda mod, a: seen["block.down"].append(a[0].reshape(-1, 10).double()))]
    model.eval()
    with torch.no_grad():
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_collect_grams_matches_hand_computed():
    torch.manual_seed(0)
    model = TwoLayer().train()
    batches = [torch.randn(3, 5, 6), {"x": torch.randn(2, 7, 6), "scale": 2.0}, torch.randn(4, 6)]
    grams = collect_grams(model, batches)
    assert model.training  # the mode is restored
    assert not model.up._forward_pre_hooks and not model.block["down"]._forward_pre_hooks
    X = captured_inputs(model, batches)
    assert set(grams) == {"up", "block.down"}
    for k, x in X.items():
        assert grams[k].dtype == F64 and grams[k].device.type == "cpu"
        torch.testing.assert_close(grams[k], x.T @ x, rtol=1e-12, atol=1e-10)
        assert grams.num_vectors[k] == x.shape[0] == 15 + 14 + 4
    only = collect_grams(model, batches, module_names=["base_model.model.block.down"])
    assert set(only) == {"block.down"}
    torch.testing.assert_close(only["block.down"], grams["block.down"])
    with pytest.raises(ValueError, match="nope"):
        collect_grams(model, batches, module_names=["nope"])


def test_collect_grams_on_a_tiny_llama():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    ids = [torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (2, 5))]
    grams = collect_grams(model, [{"input_ids": i} for i in ids])
    assert "model.layers.0.self_attn.q_proj" in grams and "model.layers.0.mlp.down_proj" in grams
    assert "lm_head" in grams
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, 24)))
    with torch.no_grad():
        for i in ids:
            model(input_ids=i)
    h.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(grams["model.layers.0.mlp.down_proj"], x.T @ x, rtol=1e-12, atol=1e-10)
    assert grams.num_vectors["model.layers.0.mlp.down_proj"] == 19


def test_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(6)
    grams = {"model.layers.0.q_proj": rand_gram(8, 20, gen)[1],
             "base_model.model.model.layers.0.o_proj": rand_gram(5, 20, gen)[1].float()}
    path = tmp_path / "task0.grams.safetensors"
    save_grams(path, grams, num_vectors=20)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left
    g = load_grams(path)
    assert g.modules == ["model.layers.0.o_proj", "model.layers.0.q_proj"]
    assert g.num_vectors == 20
    q = g.get("base_model.model.model.layers.0.q_proj", 8)
    assert q.dtype == F64 and torch.equal(q, grams["model.layers.0.q_proj"])  # float64 kept bit-exact
    torch.testing.assert_close(g.get("model.layers.0.o_proj", 5),
                               grams["base_model.model.model.layers.0.o_proj"].double())
    # Overwrite in place; num_vectors from collect_grams' result.
    model = TwoLayer()
    collected = collect_grams(model, [torch.randn(2, 6)])
    save_grams(path, collected)
    g = load_grams(path)
    assert g.modules == ["block.down", "up"] and g.num_vectors == {"block.down": 2, "up": 2}
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_regmean_from_files(tmp_path):
    gen = torch.Generator().manual_seed(7)
    m = make_tasks(9, 11, [2, 3], gen, name="base_model.model.layers.0.q_proj")
    grams = [rand_gram(11, 30, gen)[1] for _ in range(2)]
    files = []
    for j, G in enumerate(grams):
        save_grams(tmp_path / f"t{j}.safetensors", {"layers.0.q_proj": G})
        files.append(load_grams(tmp_path / f"t{j}.safetensors"))
    out = regmean(m, module_grams(files, m))
    assert rel_err(out.dense(), reference(m, grams, 0.9)) < 1e-5


def write_raw(path, tensors):
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    return path


def test_gram_errors(tmp_path):
    sym = torch.eye(4, dtype=F64) * 2
    asym = sym.clone()
    asym[0, 1] = 1e-3
    nan = sym.clone()
    nan[2, 2] = float("nan")
    rect = torch.ones(4, 3, dtype=F64)
    neg = -sym
    path = write_raw(tmp_path / "g.safetensors", {"a": sym, "asym": asym, "nan": nan, "rect": rect, "neg": neg})
    g = load_grams(path)
    name = "g\\.safetensors"
    with pytest.raises(GramError, match=f"{name}: module missing: no Gram"):
        g.get("base_model.model.missing", 4)
    with pytest.raises(GramError, match=f"{name}: module a: Gram is 4 x 4, the module's input size is 5"):
        g.get("a", 5)
    with pytest.raises(GramError, match=f"{name}: module asym: Gram is not symmetric"):
        g.get("asym", 4)
    with pytest.raises(GramError, match=f"{name}: module nan: Gram holds NaN"):
        g.get("nan", 4)
    with pytest.raises(GramError, match=f"{name}: module rect: Gram is not square"):
        g.get("rect", 4)
    with pytest.raises(GramError, match=f"{name}: module neg: Gram has a negative diagonal"):
        g.get("neg", 4)
    # A tiny relative asymmetry (float rounding) is accepted.
    ok = sym.clone()
    ok[0, 1] = 1e-9
    write_raw(tmp_path / "ok.safetensors", {"a": ok})
    load_grams(tmp_path / "ok.safetensors").get("a", 4)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GramError, match="corrupt\\.safetensors: not a readable safetensors file"):
        load_grams(corrupt)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(GramError, match="trunc\\.safetensors: "):
        load_grams(truncated).get("a", 4)
    with pytest.raises(GramError, match="nope\\.safetensors: no such file"):
        load_grams(tmp_path / "nope.safetensors")
    pickled = tmp_path / "p.safetensors"
    torch.save({"a": sym}, pickled)
    with pytest.raises(GramError, match="p\\.safetensors: not a readable safetensors file"):
        load_grams(pickled)
    write_raw(tmp_path / "int.safetensors", {"a": torch.ones(3, 3, dtype=torch.int64)})
    with pytest.raises(GramError, match="int\\.safetensors: module a: unsupported dtype"):
        load_grams(tmp_path / "int.safetensors")


def test_save_errors(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(GramError, match="out\\.safetensors: module a: holds NaN"):
        save_grams(out, {"a": torch.full((2, 2), float("nan"), dtype=F64)})
    with pytest.raises(GramError, match="out\\.safetensors: module a: a Gram must be a non-empty square"):
        save_grams(out, {"a": torch.ones(2, 3)})
    with pytest.raises(GramError, match="out\\.safetensors: module x is given twice"):
        save_grams(out, {"x": torch.eye(2), "base_model.model.x": torch.eye(2)})
    assert os.listdir(tmp_path) == []
