"""Adapter weights and per-module weights (knots_ext.weights): adapter i's update of module M is
scaled by weights[i] x (first matching module rule) before the method runs. Checked against float64
references on materialised, weighted updates (tests/merge_refs.py), and against the same merge of
adapters whose lora_alpha was multiplied by the weight."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import knots_ext
from knots_ext.cli import main as cli_main
from knots_ext.grams import save_grams
from merge_refs import F64, SHAPES, close, ref_global_ties, ref_knots, read_updates, write_adapter

WEIGHTS = [1.0, -0.5, 2.0]
RULES = [r"layers\.1\.self_attn=0.5", "down_proj=0"]


def module_weight(name: str) -> float:
    """RULES written out by hand for the names write_adapter makes."""
    if ".layers.1.self_attn." in name:
        return 0.5
    if name.endswith("down_proj"):
        return 0.0
    return 1.0


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return [write_adapter(root / f"a{i}", 4, 8, seed=10 + i) for i in range(3)]


def weighted(paths, weights, rules=True):
    """Each adapter's float64 updates times its weight (and the module's), zero updates left out."""
    out = []
    for p, w in zip(paths, weights):
        ups = {}
        for name, dW in read_updates(p).items():
            f = w * (module_weight(name) if rules else 1.0)
            if f != 0.0:
                ups[name] = f * dW
        out.append(ups)
    return out


def all_names(paths):
    return sorted(read_updates(paths[0]))


def check(res, want, names, what):
    for name in names:
        if name in want:
            close(res.delta(name), want[name], 1e-4, f"{what} {name}")
        else:  # every adapter's update of this module weighted to zero
            assert not res.delta(name).any(), f"{what} {name}: a module weighted 0 must be a zero update"


@pytest.mark.parametrize("rules", [False, True])
def test_task_arithmetic(adapters, rules):
    ups = weighted(adapters, WEIGHTS, rules)
    res = knots_ext.merge(adapters, "ta", lam=0.7, weights=WEIGHTS, module_weights=RULES if rules else None)
    names = all_names(adapters)
    want = {n: 0.7 * sum(u[n] for u in ups if n in u) for n in names if any(n in u for u in ups)}
    check(res, want, names, "ta")


@pytest.mark.parametrize("method", ["ties", "knots-ties"])
@pytest.mark.parametrize("rules", [False, True])
def test_ties_and_knots_ties(adapters, method, rules):
    ups = weighted(adapters, WEIGHTS, rules)
    names = all_names(adapters)
    live = [n for n in names if any(n in u for u in ups)]
    res = knots_ext.merge(adapters, method, top_k=0.4, weights=WEIGHTS, module_weights=RULES if rules else None)
    if method == "ties":
        want = ref_global_ties(ups, live, {n: tuple(ups[0][n].shape) for n in live}, 0.4, 1.0)
    else:
        U, reps = ref_knots(ups, live)
        merged = ref_global_ties(reps, live, {n: tuple(reps[0][n].shape) for n in live}, 0.4, 1.0)
        want = {n: U[n] @ merged[n] for n in live}
    check(res, want, names, method)


def test_regmean(adapters, tmp_path):
    names = all_names(adapters)
    gen = torch.Generator().manual_seed(3)
    grams, files = [], []
    for i in range(len(adapters)):
        g = {}
        for name in names:
            d_in = SHAPES[name.split(".", 5)[-1]][1]
            X = torch.randn(3 * d_in, d_in, generator=gen, dtype=F64)
            g[name[len("base_model.model.") :]] = X.T @ X
        grams.append(g)
        files.append(tmp_path / f"g{i}.safetensors")
        save_grams(files[-1], g)
    ups = weighted(adapters, WEIGHTS)
    res = knots_ext.merge(adapters, "regmean", grams=files, weights=WEIGHTS, module_weights=RULES)
    want = {}
    for name in names:
        rel = name[len("base_model.model.") :]
        tasks = [i for i, u in enumerate(ups) if name in u]  # a zero-weighted task leaves with its Gram
        if not tasks:
            continue
        Gt = [0.9 * grams[i][rel] + 0.1 * torch.diag(torch.diag(grams[i][rel])) for i in tasks]
        want[name] = sum(ups[i][name] @ G for i, G in zip(tasks, Gt)) @ torch.linalg.inv(sum(Gt))
    check(res, want, names, "regmean")


def with_alpha(path, out, factor):
    """A copy of the adapter with lora_alpha multiplied by factor."""
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((path / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= factor
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("method", ["ta", "ties", "knots-ties", "dare-ties"])
def test_weight_is_a_lora_alpha_factor(adapters, tmp_path, method):
    """weights=[w_i] gives the merge of the adapters with lora_alpha x w_i (up to the rounding of
    alpha*w/r vs alpha/r*w in float64)."""
    params = {"top_k": 0.5} if "ties" in method else {}
    if method.startswith("dare"):
        params["dare_p"] = 0.3
    scaled = [with_alpha(p, tmp_path / f"s{i}", w) for i, (p, w) in enumerate(zip(adapters, WEIGHTS))]
    a = knots_ext.merge(adapters, method, weights=WEIGHTS, **params)
    b = knots_ext.merge(scaled, method, **params)
    for name in a.modules:
        close(a.delta(name), b.delta(name).double(), 1e-5, f"{method} {name}")


def test_unit_weights_change_nothing(adapters):
    a = knots_ext.merge(adapters, "knots-ties", top_k=0.3)
    b = knots_ext.merge(adapters, "knots-ties", top_k=0.3, weights=[1, 1, 1], module_weights={"nothing_matches": 2.0})
    for name in a.modules:
        assert torch.equal(a.delta(name), b.delta(name))


def test_first_matching_rule_wins(adapters):
    """Both rules match the layer-1 down_proj: the first one listed decides."""
    first = knots_ext.merge(adapters[:1], "ta", module_weights=[("layers\\.1\\.mlp", 3.0), ("down_proj", 0.0)])
    name = "base_model.model.model.layers.1.mlp.down_proj"
    close(first.delta(name), 3.0 * read_updates(adapters[0])[name], 1e-5, "first rule")
    assert not first.delta("base_model.model.model.layers.0.mlp.down_proj").any()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weights": [1.0, 2.0]}, "weights has 2 values for 3 adapters"),
        ({"weights": [1.0, float("nan"), 1.0]}, "weights[1] must be a finite number"),
        ({"weights": [1.0, True, 1.0]}, "weights[1] must be a finite number"),
        ({"weights": "1 2 3"}, "weights must be a list of numbers"),
        ({"module_weights": ["q_proj"]}, "is not REGEX=WEIGHT"),
        ({"module_weights": ["q_proj=x"]}, "'x' is not a finite number"),
        ({"module_weights": ["(q=1"]}, "is not a valid regular expression"),
        ({"module_weights": ["(a+)+$=1"]}, "slow to match"),
        ({"module_weights": "q=1"}, "got one string"),
        ({"module_weights": {"q": float("inf")}}, "must be a finite number"),
    ],
)
def test_bad_weights(adapters, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        knots_ext.merge(adapters, "ta", **kwargs)


def test_cli_weights(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_main(
        [*map(str, adapters), "-o", str(out), "--method", "ta", "--quiet", "--weights", "1", "-0.5", "2",
         "--module-weights", RULES[0], RULES[1]]
    )
    assert rc == 0, capsys.readouterr().err
    res = knots_ext.merge(adapters, "ta", weights=WEIGHTS, module_weights=RULES)
    from safetensors.torch import load_file

    t = load_file(str(out / "adapter_model.safetensors"))
    for name in res.modules:
        B, A = t[name + ".lora_B.weight"].double(), t[name + ".lora_A.weight"].double()
        close(B @ A, res.delta(name).double(), 1e-6, name)
    manifest = json.loads((out / "knots_merge.json").read_text())["merge"]
    assert manifest["weights"] == WEIGHTS
    assert manifest["module_weights"] == [[r"layers\.1\.self_attn", 0.5], ["down_proj", 0.0]]


@pytest.mark.parametrize(
    "flags,message", [(["--weights", "1", "2"], "weights has 2 values for 3 adapters"),
                      (["--module-weights", "nothing"], "is not REGEX=WEIGHT")]
)
def test_cli_bad_weights(adapters, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    rc = cli_main([*map(str, adapters), "-o", str(out), "--method", "ta", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_negation_cancels(adapters):
    """An adapter merged with its own negation (weights 1, -1) under TA is a zero update."""
    res = knots_ext.merge([adapters[0], adapters[0]], "ta", weights=[1.0, -1.0])
    for name in res.modules:
        assert math.isclose(float(res.delta(name).abs().max()), 0.0, abs_tol=1e-6)


def test_readme_command_runs(tmp_path, capsys):
    """The README's weights / --rank-energy command, on the bundled example adapters."""
    import glob
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text.split("### Weights, output rank, progress", 1)[1].split("```", 2)[1]
    args = shlex.split(block.replace("\\\n", " "))
    assert args[0] == "knots-merge"
    argv = []
    for a in args[1:]:
        argv += sorted(glob.glob(str(root / a))) if "*" in a else [a]
    argv[argv.index("-o") + 1] = str(tmp_path / "out")
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "truncation (--rank-energy 0.99) costs a relative error" in err
    manifest = json.loads((tmp_path / "out" / "knots_merge.json").read_text())["merge"]
    assert manifest["weights"] == [1.0, 0.5, -0.25] and manifest["rank_energy"] == 0.99
