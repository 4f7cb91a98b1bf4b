"""knots_ext.peft.add_weighted_adapter on a live PeftModel (a tiny Llama built from a config, three
LoRA adapters of different ranks, targets and scalings with random factors): the added adapter's
B @ A and the model's logits with it active equal the base model plus the merged update of the
float64 references (merge_refs.py / conftest.py, on updates the test computes from the factors and
the configs it wrote), weights included; PEFT's names mapped; bad input refused with nothing added."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import dare_ref32  # noqa: E402
from merge_refs import F64, close, ref_global_ties, ref_knots  # noqa: E402

from knots_ext import io  # noqa: E402
from knots_ext.peft import adapter_from_peft, add_weighted_adapter, combination  # noqa: E402

# name: (r, lora_alpha, target modules, use_rslora)
CONFIGS = {
    "math": (4, 8, ["q_proj", "v_proj"], False),
    "code": (8, 8, ["q_proj", "v_proj", "k_proj"], True),
    "chat": (2, 4, ["q_proj", "v_proj"], False),
}
WEIGHTS = [1.0, -0.5, 2.0]


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def lora_config(name, **kw):
    r, alpha, targets, rslora = CONFIGS[name]
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, **kw)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture
def model(base):
    names = list(CONFIGS)
    model = peft.get_peft_model(copy.deepcopy(base), lora_config(names[0]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(name))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def scaled_factors(model, name):
    """{module key: (s * B, A)} in float64, read from the parameters by name, with the scale
    from the config this test wrote (not the layers' own scaling)."""
    r, alpha, _, rslora = CONFIGS[name]
    s = alpha / math.sqrt(r) if rslora else alpha / r
    params = dict(model.named_parameters())
    out = {}
    for key, A in params.items():
        if key.endswith(f".lora_A.{name}.weight"):
            module = key[: -len(f".lora_A.{name}.weight")]
            out[module] = (s * params[f"{module}.lora_B.{name}.weight"].detach().to(F64), A.detach().to(F64))
    return out


def weighted_updates(model, weights):
    return [{m: w * sB @ A for m, (sB, A) in scaled_factors(model, name).items()}
            for name, w in zip(CONFIGS, weights)]


def module_names(updates):
    return sorted(set().union(*updates))


def shapes_of(reps):
    return {n: tuple(r[n].shape) for r in reversed(reps) for n in r}


def ref_ta(updates):
    return {n: sum(u[n] for u in updates if n in u) for n in module_names(updates)}


def ref_dared(updates, p, seed):
    """Each task's update with DARE's mask of (seed, task, module) (conftest's own Philox), in float64."""
    return [{n: dare_ref32(u[n], p, seed, task=i, module=n).to(F64).reshape(u[n].shape) for n in u}
            for i, u in enumerate(updates)]


def ref_knots_ties(updates, top_k):
    names = module_names(updates)
    U, reps = ref_knots(updates, names)
    merged = ref_global_ties(reps, names, shapes_of(reps), top_k, 1.0)
    return {n: U[n] @ merged[n] for n in names}


def ref_truncated(dW, rank):
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def reference(combination_type, updates, density):
    names = module_names(updates)
    shapes = shapes_of(updates)
    if combination_type in ("cat", "linear"):
        return ref_ta(updates)
    if combination_type == "ties":
        return ref_global_ties(updates, names, shapes, density, 1.0)
    if combination_type == "dare_linear":
        return ref_ta(ref_dared(updates, 1 - density, 0))
    if combination_type == "dare_ties":  # PEFT's dare_ties: DARE, then sign election with no trim
        return ref_global_ties(ref_dared(updates, 1 - density, 0), names, shapes, 1.0, 1.0)
    if combination_type == "knots_ties":
        return ref_knots_ties(updates, density)
    raise AssertionError(combination_type)


def added_update(model, adapter, module):
    layer = model.get_submodule(module)
    return layer.scaling[adapter] * (layer.lora_B[adapter].weight.to(F64) @ layer.lora_A[adapter].weight.to(F64))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_added(model, base, adapter, want):
    """The adapter's B @ A equals `want` per module, and the model with it active computes the
    base model with W + want (added by hand to a copy of the base)."""
    assert set(want) == {m for m, layer in model.named_modules() if hasattr(layer, "lora_A") and adapter in layer.lora_A}
    for module, dW in want.items():
        close(added_update(model, adapter, module), dW, 1e-4, module)
    by_hand = copy.deepcopy(base)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for module, dW in want.items():
            params[module.removeprefix("base_model.model.") + ".weight"] += dW.float()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.set_adapter(adapter)
    got = logits(model, ids)
    assert (got - logits(base, ids)).abs().max() > 1e-3  # the merged adapter does something
    torch.testing.assert_close(got, logits(by_hand, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("combination_type,density", [("cat", 0.2), ("linear", 0.2), ("ties", 0.3),
                                                      ("dare_linear", 0.6), ("dare_ties", 0.5),
                                                      ("knots_ties", 0.4)])
def test_added_adapter_is_base_plus_merged_update(model, base, combination_type, density):
    updates = weighted_updates(model, WEIGHTS)
    res = add_weighted_adapter(model, list(CONFIGS), WEIGHTS, "merged", combination_type=combination_type,
                               density=density)
    assert "merged" in model.peft_config and set(res.modules) == set(module_names(updates))
    check_added(model, base, "merged", reference(combination_type, updates, density))


def test_svd_truncates_to_the_largest_adapter_rank_or_svd_rank(model, base):
    ta = ref_ta(weighted_updates(model, WEIGHTS))
    add_weighted_adapter(model, list(CONFIGS), WEIGHTS, "svd", combination_type="svd")
    add_weighted_adapter(model, list(CONFIGS), WEIGHTS, "svd3", combination_type="svd", svd_rank=3)
    for adapter, rank in (("svd", max(r for r, *_ in CONFIGS.values())), ("svd3", 3)):
        for module, dW in ta.items():
            assert model.get_submodule(module).r[adapter] == rank
            close(added_update(model, adapter, module), ref_truncated(dW, rank), 1e-4, module)


def test_weights_honoured(model, base):
    """A zero weight leaves the adapter out (DESIGN: a zero update is an absent one, so the
    reference merges the other two); weights None are all 1; a negative one negates."""
    updates = weighted_updates(model, [0.0, 1.0, -1.0])[1:]
    add_weighted_adapter(model, list(CONFIGS), [0, 1, -1], "w", combination_type="knots-ties", density=0.5)
    check_added(model, base, "w", ref_knots_ties(updates, 0.5))
    add_weighted_adapter(model, list(CONFIGS), None, "ones", combination_type="cat")
    check_added(model, base, "ones", ref_ta(weighted_updates(model, [1, 1, 1])))


def test_knots_ext_parameters_pass_through(model, base):
    """density is top_k where the method trims; lam and the other declared parameters pass through."""
    updates = weighted_updates(model, WEIGHTS)
    add_weighted_adapter(model, ["math", "code"], WEIGHTS[:2], "lam", combination_type="TA", lam=0.5)
    check_added(model, base, "lam", {n: 0.5 * dW for n, dW in ref_ta(updates[:2]).items()})


def test_names_map():
    assert combination("dare-ties") == combination("dare_ties") == combination("DARE_TIES")
    assert combination("linear").method == combination("cat").method == "ta"  # PEFT's linear: the weighted sum
    assert combination("knots-dare-ties").method == "knots-dare-ties"
    assert combination("tsv_m").method == "tsv-m" and combination("tsv_m").density is None
    assert combination("ties_svd").svd and not combination("ties").svd


def test_adapter_from_peft_reads_the_model(model):
    a = adapter_from_peft(model, "code")
    want = scaled_factors(model, "code")
    assert a.path == "<peft:code>" and sorted(a.modules) == sorted(want)
    for module, (sB, A) in want.items():
        B_got, A_got = a.factors(module)
        close(a.scale(module) * B_got, sB, 1e-6, module)
        close(A_got, A, 1e-6, module)
        assert a.rank(module) == 8 and a.shape(module) == tuple(sB.shape[:1]) + tuple(A.shape[1:])
    B_got.zero_()  # a copy: the model's factors are untouched
    assert model.get_submodule(module).lora_B["code"].weight.abs().max() > 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(adapters=["math", "nope"]), "adapter 'nope' does not exist"),
    (dict(adapter_name="code"), "'code' already exists"),
    (dict(combination_type="average"), "unknown combination_type 'average'"),
    (dict(combination_type="magnitude_prune"), "magnitude_prune"),
    (dict(weights=[1.0, 1.0]), "weights has 2 values for 3 adapters"),
    (dict(weights=[1.0, float("nan"), 1.0]), "weights"),
    (dict(majority_sign_method="frequency"), "majority_sign_method"),
    (dict(svd_clamp=0.99), "svd_clamp"),
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(svd_rank=0), "rank must be an integer >= 1"),
    (dict(combination_type="ta", top_k=0.5), "top_k does not apply to ta"),
    (dict(combination_type="dare_ties", dare_p=1.0), "dare_p"),
])
def test_bad_input_is_refused_and_nothing_added(model, kwargs, message):
    args = dict(adapters=list(CONFIGS), weights=None, adapter_name="new", combination_type="knots_ties")
    args.update(kwargs)
    before = set(model.peft_config)
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(model, **args)
    assert set(model.peft_config) == before
    assert not any("new" in key for key, _ in model.named_parameters())


def test_unreadable_adapters_are_named(model, base):
    with pytest.raises(ValueError, match="must be a peft.PeftModel"):
        add_weighted_adapter(base, ["math"], None, "new")
    model.peft_config["math"].target_parameters = ["mlp.experts.gate_up_proj"]
    with pytest.raises(ValueError, match=r"<peft:math>: LoRA on nn.Parameter targets"):
        add_weighted_adapter(model, ["math", "code"], None, "new")
    model.peft_config["math"].target_parameters = None
    model.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"<peft:dora>: module .*q_proj: DoRA"):
        add_weighted_adapter(model, ["math", "dora"], None, "new")
    with torch.no_grad():
        model.get_submodule("base_model.model.model.layers.1.self_attn.v_proj").lora_A["chat"].weight[0, 0] = math.inf
    with pytest.raises(io.AdapterError, match=r"<peft:chat>: module .*layers\.1\.self_attn\.v_proj: lora_A holds NaN"):
        add_weighted_adapter(model, ["math", "chat"], None, "new")
    assert "new" not in model.peft_config


def test_memory_adapters_merge_and_save(model, tmp_path, monkeypatch):
    """A MemoryAdapter goes wherever an adapter path does: merged by knots_ext.merge, saved as a
    PEFT adapter that loads back with the same update."""
    import knots_ext

    adapters = [adapter_from_peft(model, name) for name in CONFIGS]
    res = knots_ext.merge(adapters, method="ta", weights=WEIGHTS)
    want = ref_ta(weighted_updates(model, WEIGHTS))
    res.save(tmp_path / "out")
    saved = io.load_adapter(tmp_path / "out")
    for module, dW in want.items():
        B, A = saved.factors(module)
        close(saved.scale(module) * B.double() @ A.double(), dW, 1e-5, module)
    # an adapter held in memory has no folder: the working directory is not taken for one
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    res.save(".")
    assert (tmp_path / "cwd" / "adapter_model.safetensors").is_file()


def test_benchmark_job_measures_what_it_says():
    """benchmarks/bench_peft_dropin.py's job on a tiny model: knots_ext's exact combinations match
    the float64 merge of the full updates, PEFT's factor-wise linear / ties do not, and the ranks
    are those the README states (cat: n r; dense ties: full; svd: r)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_peft_dropin as bench

    n, r, width = 3, 4, 48
    with torch.enable_grad():  # the job switches autograd off for its (normally fresh) process; restored on exit
        out = bench.job(1, width, n, r, 0.3, ["linear", "cat", "ties", "svd", "knots_ties"], 1, 10.0)
    assert torch.is_grad_enabled()
    rows = {(row["impl"], row["combination"]): row for row in out["rows"]}
    for comb in ("linear", "cat", "ties"):
        assert rows["knots_ext", comb]["rel_error"] < 1e-6, comb
    assert rows["peft", "linear"]["rel_error"] > 1e-2 and rows["peft", "ties"]["rel_error"] > 1e-2
    assert rows["peft", "cat"]["rel_error"] < 1e-6  # PEFT's cat is exact too
    assert rows["knots_ext", "svd"]["rel_error"] == pytest.approx(rows["peft", "svd"]["rel_error"], rel=1e-3)
    assert [rows["knots_ext", c]["rank"] for c in ("linear", "ties", "svd", "knots_ties")] == [n * r, width, r, n * r]
    assert all(row["seconds"] > 0 for row in out["rows"])


def test_readme_example_runs():
    """The README's PEFT drop-in command runs on the bundled example adapters."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert "python examples/peft_dropin.py" in (root / "README.md").read_text()
    proc = subprocess.run([sys.executable, "examples/peft_dropin.py", "--combination-type", "dare_ties",
                           "--density", "0.7"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, moved = map(float, re.search(r"max \|diff\| (\S+) \(the update itself moves them by (\S+)\)",
                                       proc.stdout).groups())
    assert "added adapter 'merged' (dare-ties" in proc.stdout
    assert diff < 1e-4 < moved


def test_added_adapter_is_a_proper_peft_adapter(model, base, tmp_path):
    """Its weights are real (not meta) tensors in the sources' dtype and device, frozen; PEFT
    saves it and loads it back into a fresh base model with the same B @ A (per-module ranks
    through rank_pattern, scale 1 through alpha_pattern)."""
    res = add_weighted_adapter(model, list(CONFIGS), WEIGHTS, "merged", combination_type="knots_ties", density=0.4)
    new = {k: p for k, p in model.named_parameters() if ".merged." in k}
    assert new and all(p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad
                       for p in new.values())
    model.save_pretrained(str(tmp_path), selected_adapters=["merged"])
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "merged"), adapter_name="merged")
    for module in res.modules:
        close(added_update(loaded, "merged", module), added_update(model, "merged", module), 1e-6, module)
