"""knots_ext.adaptive against float64 references on materialised matrices: the merged forward is
base + sum_i c_i dW_i (per adapter and per adapter and module), the coefficients' gradients match
central finite differences, the random pool keeps every factor's shape and norm, retrieval ranks
by each adapter's own loss, Adam recovers known coefficients, and the saved adapter holds the
merged update."""
from __future__ import annotations

import json
import sys
from pathlib import Path  # noqa: F401 (the CLI test's task file uses it)

import pytest
import torch

import knots_ext
from knots_ext import adapt_cli
from knots_ext.adaptive import Pool, learn_coefficients, retrieve, search_coefficients, train_lora
from merge_refs import F64, SHAPES, read_scaled_factors, read_updates, write_adapter

LAYERS = 2


class TinyModel(torch.nn.Module):
    """Linear modules named as the test adapters' (model.layers.L.self_attn.q_proj, ...); the
    forward is each module on its own fixed input."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        self.inputs = {}
        for layer in range(LAYERS):
            block = torch.nn.Module()
            block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
            for mod, (d_out, d_in) in SHAPES.items():
                parent, leaf = mod.split(".")
                lin = torch.nn.Linear(d_in, d_out, dtype=dtype)
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(d_out, d_in, generator=gen))
                    lin.bias.copy_(torch.randn(d_out, generator=gen))
                setattr(getattr(block, parent), leaf, lin)
                self.inputs[f"model.layers.{layer}.{mod}"] = torch.randn(5, d_in, generator=gen, dtype=dtype)
            self.model.layers.append(block)

    def forward(self):
        return {name: self.get_submodule(name)(x) for name, x in self.inputs.items()}


@pytest.fixture
def paths(tmp_path):
    return [write_adapter(tmp_path / "a0", 4, 8, layers=LAYERS, seed=1),
            write_adapter(tmp_path / "a1", {"self_attn.q_proj": 2, "self_attn.v_proj": 6, "mlp.down_proj": 3}, 16,
                          layers=LAYERS, seed=2, rslora=True),
            write_adapter(tmp_path / "a2", 8, 8, layers=LAYERS, seed=3, dtype=torch.bfloat16)]


def reference_outputs(model, updates, coef_of):
    """float64: each module's x W^T + b + x (sum_i c_i dW_i)^T, c_i = coef_of(i, module)."""
    out = {}
    with torch.no_grad():
        for name, x in model.inputs.items():
            lin = model.get_submodule(name)
            dW = sum(coef_of(i, name) * u[f"base_model.model.{name}"] for i, u in enumerate(updates))
            out[name] = x.to(F64) @ (lin.weight.to(F64) + dW).T + lin.bias.to(F64)
    return out


@pytest.mark.parametrize("per_module", [False, True])
def test_merged_forward_is_base_plus_weighted_updates(paths, per_module):
    model = TinyModel()
    pool = Pool.load(paths)
    coefs = pool.coefficients(per_module)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        coefs.values.copy_(torch.randn(coefs.values.shape, generator=gen, dtype=F64))
    updates = [read_updates(p) for p in paths]
    column = {f"{m[len('base_model.model.'):]}": j for j, m in enumerate(pool.modules)}

    def coef_of(i, name):
        return float(coefs.values.detach()[i, column[name] if per_module else 0])

    want = reference_outputs(model, updates, coef_of)
    with pool.attached(model, coefs):
        got = model()
    for name in want:
        scale = float(want[name].abs().max())
        assert float((got[name].detach().to(F64) - want[name]).abs().max()) <= 1e-5 * scale, name
    plain = model()  # hooks removed on exit: the base model again
    for name, x in model.inputs.items():
        lin = model.get_submodule(name)
        assert torch.equal(plain[name], lin(x))


@pytest.mark.parametrize("per_module", [False, True])
def test_gradients_match_finite_differences(paths, per_module):
    model = TinyModel(dtype=torch.float64)
    pool = Pool.load(paths)
    target = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
              for k, v in model().items()}

    def loss_fn(m):
        return sum(((y - target[k]) ** 2).mean() for k, y in m().items())

    coefs = pool.coefficients(per_module, init=0.3)
    with pool.attached(model, coefs):
        loss_fn(model).backward()
    grad = coefs.values.grad.clone()
    eps = 1e-6
    for idx in [(i, j) for i in range(pool.size) for j in range(coefs.values.shape[1])]:
        losses = []
        for sign in (1, -1):
            probe = pool.coefficients(per_module, init=0.3)
            with torch.no_grad():
                probe.values[idx] += sign * eps
            with pool.attached(model, probe), torch.no_grad():
                losses.append(float(loss_fn(model)))
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert abs(fd - float(grad[idx])) <= 1e-6 * max(1.0, abs(fd)), (idx, fd, float(grad[idx]))


def test_random_pool_keeps_shapes_and_norms(paths):
    pool = Pool.load(paths)
    rand, again, other = pool.random_like(seed=1), pool.random_like(seed=1), pool.random_like(seed=2)
    real = [read_scaled_factors(p) for p in paths]  # float64 (s_i B_i, A_i) per module
    for name in pool.modules:
        B, A, owner = rand.factors(name)
        assert B.shape == pool.factors(name)[0].shape and A.shape == pool.factors(name)[1].shape
        assert torch.equal(owner, pool.factors(name)[2])
        assert torch.equal(B, again.factors(name)[0]) and not torch.equal(B, other.factors(name)[0])
        for i, factors in enumerate(real):
            sB, sA = factors[name]
            cols = (owner == i).nonzero().reshape(-1)
            assert float(B[:, cols].to(F64).norm()) == pytest.approx(float(sB.norm()), rel=1e-5)
            assert float(A[cols].to(F64).norm()) == pytest.approx(float(sA.norm()), rel=1e-5)
            assert not torch.allclose(B[:, cols].to(F64), sB)


def test_retrieval_ranks_by_each_adapters_own_loss(paths):
    model = TinyModel()
    pool = Pool.load(paths)
    updates = [read_updates(p) for p in paths]
    # the target: adapter 2's model plus a little of adapter 0's
    want = reference_outputs(model, updates, lambda i, name: {2: 1.0, 0: 0.25}.get(i, 0.0))

    def loss_fn(m):
        return sum(((y.to(F64) - want[k]) ** 2).sum() for k, y in m().items())

    order, losses = retrieve(pool, model, loss_fn)
    ref = []
    for i in range(pool.size):
        alone = reference_outputs(model, updates, lambda j, name, i=i: 1.0 if j == i else 0.0)
        ref.append(sum(float(((alone[k] - want[k]) ** 2).sum()) for k in want))
    assert order == sorted(range(pool.size), key=lambda i: ref[i]) and order[0] == 2
    assert losses == pytest.approx([ref[i] for i in order], rel=1e-4)
    assert retrieve(pool, model, loss_fn, top=2)[0] == order[:2]
    sub = pool.subset(order[:2])
    assert sub.size == 2 and [a.path for a in sub.adapters] == [pool.adapters[i].path for i in order[:2]]


@pytest.mark.parametrize("per_module", [False, True])
def test_adam_recovers_known_coefficients(paths, per_module):
    model = TinyModel()
    pool = Pool.load(paths)
    updates = [read_updates(p) for p in paths]
    truth = [0.8, -0.4, 0.5]
    want = reference_outputs(model, updates, lambda i, name: truth[i])

    def loss_fn(m):
        return sum(((y.to(F64) - want[k]) ** 2).mean() for k, y in m().items())

    coefs, history = learn_coefficients(pool, model, loss_fn, per_module=per_module, steps=300, lr=5e-2)
    assert len(history) == 300 and history[-1] < 1e-3 * history[0]
    assert torch.allclose(coefs.values, torch.tensor(truth, dtype=F64)[:, None].expand_as(coefs.values), atol=0.05)
    assert not coefs.values.requires_grad
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags restored


def test_saved_adapter_holds_the_merged_update(paths, tmp_path):
    pool = Pool.load(paths)
    coefs = pool.coefficients(per_module=True)
    with torch.no_grad():
        coefs.values.copy_(torch.linspace(-1, 1, coefs.values.numel(), dtype=F64).reshape(coefs.values.shape))
    pool.save(tmp_path / "out", coefs)
    merged = read_updates(tmp_path / "out")
    updates = [read_updates(p) for p in paths]
    for j, name in enumerate(pool.modules):
        want = sum(float(coefs.values[i, j]) * u[name] for i, u in enumerate(updates))
        assert float((merged[name] - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
    manifest = json.loads((tmp_path / "out" / "knots_merge.json").read_text())
    assert manifest["merge"]["coefficients"]["per_module"] and len(manifest["merge"]["coefficients"]["values"]) == 3
    assert sorted(knots_ext.io.load_adapter(tmp_path / "out").modules) == pool.modules


def test_model_without_the_module_is_one_clear_error(paths):
    model = TinyModel()
    del model.model.layers[1].mlp.down_proj
    pool = Pool.load(paths)
    with pytest.raises(ValueError, match="no module 'model.layers.1.mlp.down_proj'"):
        with pool.attached(model, pool.coefficients()):
            pass
    assert not model.model.layers[0].self_attn.q_proj._forward_hooks  # nothing left attached


def fit_problem(paths, truth=(0.8, -0.4, 0.5)):
    """The tiny model, the pool and a target made by known coefficients; the loss and its float64
    reference as a function of the coefficients (one per adapter)."""
    model = TinyModel()
    pool = Pool.load(paths)
    updates = [read_updates(p) for p in paths]
    want = reference_outputs(model, updates, lambda i, name: truth[i])

    def loss_fn(m):
        return sum(((y.to(F64) - want[k]) ** 2).mean() for k, y in m().items())

    def ref_loss(c):
        out = reference_outputs(model, updates, lambda i, name: float(c[i]))
        return sum(float(((out[k] - want[k]) ** 2).mean()) for k in want)

    return model, pool, loss_fn, ref_loss, want


def test_gradient_free_search_lowers_the_objective(paths):
    model, pool, loss_fn, ref_loss, _ = fit_problem(paths)
    coefs, history = search_coefficients(pool, model, loss_fn, budget=40, seed=3)
    assert len(history) == 40 and coefs.values.shape == (3, 1)
    best = coefs.values[:, 0].tolist()
    assert all(abs(c) <= 1.5 for c in best)
    start = [1 / 3] * 3
    objective = lambda c: ref_loss(c) + 0.05 * sum(abs(x) for x in c)  # noqa: E731
    assert objective(best) < objective(start)
    again, _ = search_coefficients(pool, model, loss_fn, budget=40, seed=3)
    assert torch.equal(again.values, coefs.values)  # seeded


def test_gradient_free_search_needs_nevergrad(paths, monkeypatch):
    model, pool, loss_fn, _, _ = fit_problem(paths)
    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(ValueError, match=r"pip install 'knots-ext\[adapt\]'"):
        search_coefficients(pool, model, loss_fn)


def test_new_lora_control_trains_from_zero(paths):
    model, pool, loss_fn, ref_loss, want = fit_problem(paths)
    factors, history = train_lora(pool, model, loss_fn, rank=4, steps=150, lr=1e-2, seed=1)
    assert len(history) == 150
    assert history[0] == pytest.approx(ref_loss([0.0, 0.0, 0.0]), rel=1e-5)  # B starts at zero: the base model
    for name in pool.modules:
        B, A = factors[name]
        d_out, d_in = pool.factors(name)[0].shape[0], pool.factors(name)[1].shape[1]
        assert B.shape == (d_out, 4) and A.shape == (4, d_in) and not B.requires_grad
    # the trained LoRA's loss, recomputed in float64 from its factors
    with torch.no_grad():
        trained = 0.0
        for name, x in model.inputs.items():
            lin = model.get_submodule(name)
            B, A = factors[f"base_model.model.{name}"]
            y = x.to(F64) @ (lin.weight.to(F64) + B.to(F64) @ A.to(F64)).T + lin.bias.to(F64)
            trained += float(((y - want[name]) ** 2).mean())
    assert trained < 0.5 * history[0]


def test_concatenated_pools_are_their_adapters_in_turn(paths):
    pool = Pool.load(paths)
    both = Pool.concat([pool, pool.random_like(seed=5)])
    assert both.size == 6 and both.modules == pool.modules
    coefs = both.coefficients()
    with torch.no_grad():
        coefs.values.zero_()
        coefs.values[1] = 1.0  # adapter 1 of the first pool alone
    updates = read_updates(paths[1])
    merged = both.merged_factors(coefs)
    for name in pool.modules:
        B, A = merged[name]
        assert float((B.double() @ A.double() - updates[name]).abs().max()) <= 1e-5 * float(updates[name].abs().max())


# ---------------------------------------------------------------------------------------------
# knots-adapt (knots_ext.adapt_cli), in this process: the task file builds the tiny model and the
# target of known coefficients


TASK_FILE = """
import test_adaptive as t
PATHS = {paths!r}
_model = t.TinyModel()
_updates = [t.read_updates(t.Path(p)) for p in PATHS]
_want = t.reference_outputs(_model, _updates, lambda i, name: (0.8, -0.4, 0.5)[i])

def model():
    return _model

def loss(m):
    return sum(((y.to(t.F64) - _want[k]) ** 2).mean() for k, y in m().items())
"""


def test_knots_adapt_learns_and_writes_the_merged_adapter(paths, tmp_path, capsys):
    task = tmp_path / "task.py"
    task.write_text(TASK_FILE.format(paths=[str(p) for p in paths]))
    out = tmp_path / "out"
    assert adapt_cli.main([*map(str, paths), "-o", str(out), "--task", str(task), "--steps", "300"]) == 0
    assert "adam: loss" in capsys.readouterr().out
    manifest = json.loads((out / "knots_merge.json").read_text())["merge"]
    coefs = manifest["coefficients"]["values"]
    assert not manifest["coefficients"]["per_module"]
    assert [round(c[0], 1) for c in coefs] == [0.8, -0.4, 0.5]
    merged, updates = read_updates(out), [read_updates(p) for p in paths]
    for name in merged:
        want = sum(c[0] * u[name] for c, u in zip(coefs, updates))
        assert float((merged[name] - want).abs().max()) <= 1e-5 * float(want.abs().max()), name
    # --top 2: the two adapters with the lowest loss alone are kept, in that order
    out2 = tmp_path / "out2"
    assert adapt_cli.main([*map(str, paths), "-o", str(out2), "--task", str(task), "--top", "2", "--steps", "5"]) == 0
    kept = json.loads((out2 / "knots_merge.json").read_text())["merge"]["adapters"]
    assert len(kept) == 2 and kept[0] == str(paths[0])  # adapter 0 (coefficient 0.8) fits the target best alone


@pytest.mark.parametrize("content,needle", [
    (None, "no such task file"),
    ("def model(): pass\n", "defines no loss()"),
    ("raise RuntimeError('boom')\n", "RuntimeError: boom"),
])
def test_knots_adapt_bad_task_file_is_one_line(paths, tmp_path, capsys, content, needle):
    task = tmp_path / "task.py"
    if content is not None:
        task.write_text(content)
    out = tmp_path / "out"
    assert adapt_cli.main([*map(str, paths), "-o", str(out), "--task", str(task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(task) in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("call,needle", [
    (lambda pool, model, loss: learn_coefficients(pool, model, loss, steps=0), "steps must be an integer >= 1"),
    (lambda pool, model, loss: learn_coefficients(pool, model, loss, lr=float("nan")), "lr must be a finite number > 0"),
    (lambda pool, model, loss: search_coefficients(pool, model, loss, budget=2.5), "budget must be an integer >= 1"),
    (lambda pool, model, loss: search_coefficients(pool, model, loss, l1=-0.1), "l1 must be a finite number >= 0"),
    (lambda pool, model, loss: search_coefficients(pool, model, loss, bound=0), "bound must be a finite number > 0"),
    (lambda pool, model, loss: train_lora(pool, model, loss, rank=0), "rank must be an integer >= 1"),
    (lambda pool, model, loss: retrieve(pool, model, loss, top=0), "top must be an integer >= 1"),
])
def test_settings_out_of_range_are_one_line(paths, call, needle):
    model, pool, loss_fn, _, _ = fit_problem(paths)
    with pytest.raises(ValueError) as e:
        call(pool, model, loss_fn)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag,value,needle", [("--steps", "0", "steps must be"), ("--lr", "-1", "lr must be"),
                                               ("--top", "0", "top must be"), ("--budget", "0", "budget must be")])
def test_knots_adapt_refuses_bad_settings(paths, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "out"
    assert adapt_cli.main([*map(str, paths), "-o", str(out), "--task", "missing.py", flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()
