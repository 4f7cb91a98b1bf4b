"""Adapter I/O (knots_ext.io) against PEFT itself: tiny Llama / GPT-2 models built from configs
(no download), LoRA adapters made and saved by peft, read back by us and compared in float64 with
PEFT's own per-module deltas; adapters we write are loaded by PeftModel.from_pretrained and must
give the logits of the base model with W + B @ A put in by hand."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from knots_ext.io import Adapter, AdapterError, check_compatible, load_adapter, save_adapter  # noqa: E402
from knots_ext.io._common import pattern_key  # noqa: E402
from knots_ext.io.save import rank_config  # noqa: E402

F64 = torch.float64
PFX = "base_model.model."


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def lora_layers(model):
    """{file module key: LoRA layer} of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def make_adapter(out, base, lora_config, dtype, seed):
    """A PEFT LoRA adapter with random (nonzero) factors, rounded to `dtype`, saved in `dtype`.
    Returns {module: PEFT's delta (float64, computed by PEFT in float32 from the rounded factors),
    PEFT's r, PEFT's scaling, (out_features, in_features)}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), lora_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.2).to(dtype).float())
    ref = {}
    for name, layer in lora_layers(model).items():
        ref[name] = dict(delta=layer.get_delta_weight("default").to(F64), r=layer.r["default"],
                         scale=layer.scaling["default"], shape=(layer.out_features, layer.in_features))
    model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return ref


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def made(tmp_path_factory, llama):
    """Three adapters of the tiny Llama: different r, rslora, rank/alpha patterns, k_proj only in
    one, modules_to_save in one, saved in float32, float16 and bfloat16."""
    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "fp32": (torch.float32, peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
            rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3},
            modules_to_save=["lm_head"])),
        "fp16": (torch.float16, peft.LoraConfig(
            r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
            rank_pattern={"model.layers.1.self_attn.k_proj": 3, "q_proj": 5}, alpha_pattern={"k_proj": 7.5})),
        "bf16": (torch.bfloat16, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
    }
    out = {}
    for i, (name, (dtype, cfg)) in enumerate(specs.items()):
        out[name] = (root / name, dtype, make_adapter(root / name, llama, cfg, dtype, seed=100 + i))
    return out


# ------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_read_matches_peft(made, name):
    path, dtype, ref = made[name]
    a = load_adapter(path)
    assert a.path == str(path) and a.fan_in_fan_out is False and a.config["peft_type"] == "LORA"
    assert a.modules == sorted(ref)
    for m in a.modules:
        assert a.rank(m) == ref[m]["r"]
        assert a.scale(m) == pytest.approx(ref[m]["scale"], rel=1e-12)
        assert a.shape(m) == ref[m]["shape"]
        assert a.stored_dtype(m) == dtype
        B, A = a.factors(m)
        assert B.dtype == A.dtype == torch.float32
        assert B.shape == (ref[m]["shape"][0], ref[m]["r"]) and A.shape == (ref[m]["r"], ref[m]["shape"][1])
        B64, A64 = a.factors(m, dtype=F64)
        ours = a.scale(m) * B64 @ A64
        want = ref[m]["delta"]
        assert want.abs().max() > 0.1
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert a.factors(m, dtype=dtype)[0].dtype == dtype
    a.close()


def test_patterns_and_modules(made):
    fp32 = load_adapter(made["fp32"][0])
    fp16 = load_adapter(made["fp16"][0])
    q0 = PFX + "model.layers.0.self_attn.q_proj"
    q1 = PFX + "model.layers.1.self_attn.q_proj"
    v0 = PFX + "model.layers.0.self_attn.v_proj"
    k1 = PFX + "model.layers.1.self_attn.k_proj"
    assert (fp32.rank(q0), fp32.rank(q1), fp32.rank(v0)) == (2, 4, 4)
    assert (fp32.scale(q0), fp32.scale(q1), fp32.scale(v0)) == (8 / 2, 8 / 4, 3 / 4)
    assert fp16.rank(k1) == 3 and fp16.scale(k1) == pytest.approx(7.5 / 3 ** 0.5)
    assert fp16.rank(q0) == 5 and fp16.scale(q0) == pytest.approx(16 / 5 ** 0.5)
    assert not any("k_proj" in m for m in fp32.modules) and k1 in fp16.modules
    assert fp32.extra_tensors == [PFX + "lm_head.weight"] and fp16.extra_tensors == []
    head = fp32.extra(PFX + "lm_head.weight")
    assert head.shape == (128, 64) and fp32.extra(PFX + "lm_head.weight", F64).dtype == F64
    check_compatible([fp32, fp16, load_adapter(made["bf16"][0])])


def test_merge_and_unload_delta(made, llama):
    """s * B @ A against (merged weight - base weight) from PEFT's merge_and_unload."""
    path, _, _ = made["fp32"]
    a = load_adapter(path)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(path)).merge_and_unload()
    base_sd, merged_sd = llama.state_dict(), merged.state_dict()
    for m in a.modules:
        w = m[len(PFX):] + ".weight"
        B, A = a.factors(m, F64)
        torch.testing.assert_close(a.scale(m) * B @ A, merged_sd[w].to(F64) - base_sd[w].to(F64),
                                   rtol=1e-4, atol=1e-6)


def test_fan_in_fan_out_gpt2(tmp_path):
    base = tiny_gpt2()
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ref = make_adapter(tmp_path / "g", base, cfg, torch.float32, seed=7)
    a = load_adapter(tmp_path / "g")
    assert a.fan_in_fan_out is True and a.modules == sorted(ref)
    c_attn = PFX + "transformer.h.0.attn.c_attn"
    assert a.shape(c_attn) == (96, 32)  # Conv1D stores the (32, 96) transpose
    for m in a.modules:
        B, A = a.factors(m, F64)
        assert a.shape(m) == ref[m]["shape"]
        torch.testing.assert_close((a.scale(m) * B @ A).T, ref[m]["delta"], rtol=1e-5, atol=1e-7)


def test_bare_file_and_alpha(made, tmp_path):
    path, _, ref = made["fp32"]
    bare = tmp_path / "bare.safetensors"
    shutil.copy(path / "adapter_model.safetensors", bare)
    with pytest.raises(AdapterError, match=re.escape(str(bare)) + ": a bare safetensors file needs alpha"):
        load_adapter(bare)
    a = load_adapter(bare, alpha=2.0)
    assert a.config == {} and a.base_model is None
    for m in a.modules:
        assert a.scale(m) == 2.0 / a.rank(m)
    # an explicit alpha replaces the directory's lora_alpha (alpha_pattern still applies)
    d = load_adapter(path, alpha=16)
    assert d.scale(PFX + "model.layers.1.self_attn.q_proj") == 4.0
    assert d.scale(PFX + "model.layers.1.self_attn.v_proj") == 3 / 4
    load_adapter(path, rank_hint={PFX + "model.layers.1.self_attn.q_proj": 4})
    with pytest.raises(AdapterError, match="rank 2, expected 4"):
        load_adapter(path, rank_hint=4)


def test_lazy_and_picklable(made):
    import pickle

    a = load_adapter(made["bf16"][0])
    m = a.modules[0]
    b = pickle.loads(pickle.dumps(a))
    torch.testing.assert_close(b.factors(m), a.factors(m))
    a.close()
    torch.testing.assert_close(b.factors(m), a.factors(m))  # reopens
    with pytest.raises(KeyError):
        a.rank("nope")


# ------------------------------------------------------------------------------------------
# Writing


def _random_factors(shapes_ranks, seed, prefix=PFX):
    gen = torch.Generator().manual_seed(seed)
    return {prefix + m: (torch.randn(d_out, r, generator=gen) * 0.1, torch.randn(r, d_in, generator=gen) * 0.1)
            for m, (d_out, d_in, r) in shapes_ranks.items()}


LLAMA_MODULES = {  # name: (d_out, d_in, rank) -- ranks differ per module
    "model.layers.0.self_attn.q_proj": (64, 64, 3),
    "model.layers.1.self_attn.q_proj": (64, 64, 5),
    "model.layers.0.self_attn.v_proj": (32, 64, 3),
    "model.layers.1.self_attn.v_proj": (32, 64, 1),
    "model.layers.0.self_attn.k_proj": (32, 64, 2),
    "model.layers.1.mlp.down_proj": (64, 128, 3),
}


def _logits(model, vocab):
    ids = torch.arange(12).remainder(vocab).view(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits.to(F64)


def test_save_roundtrip_peft_llama(llama, tmp_path):
    factors = _random_factors(LLAMA_MODULES, seed=3)
    head = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    out = tmp_path / "merged"
    save_adapter(out, factors, base_model="tiny-llama-test", extra={PFX + "lm_head.weight": head},
                 task_type="CAUSAL_LM")
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    # the manifest sits beside PEFT's two files; PEFT loads the folder regardless (below)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "knots_merge.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert cfg["rank_pattern"] == {"model.layers.0.self_attn.k_proj": 2, "model.layers.1.self_attn.q_proj": 5,
                                   "model.layers.1.self_attn.v_proj": 1}
    assert cfg["modules_to_save"] == ["lm_head"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(out)).eval()
    assert not [w for w in caught if re.search("missing|unexpected|did not match", str(w.message), re.I)]
    assert sorted(lora_layers(peft_model)) == sorted(factors)
    for name, layer in lora_layers(peft_model).items():
        assert layer.scaling["default"] == 1.0
        torch.testing.assert_close(layer.get_delta_weight("default"), factors[name][0] @ factors[name][1])
    by_hand = copy.deepcopy(llama)
    sd = by_hand.state_dict()
    with torch.no_grad():
        for m, (B, A) in factors.items():
            sd[m[len(PFX):] + ".weight"] += B @ A
        sd["lm_head.weight"].copy_(head)
    torch.testing.assert_close(_logits(peft_model, 128), _logits(by_hand, 128), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(llama, 128), _logits(by_hand, 128), atol=1e-3)

    a = load_adapter(out)  # and our reader sees scale 1 everywhere
    assert a.base_model == "tiny-llama-test" and a.modules == sorted(factors)
    assert a.extra_tensors == [PFX + "lm_head.weight"]
    for m in a.modules:
        assert a.scale(m) == 1.0 and a.rank(m) == factors[m][1].shape[0]
        torch.testing.assert_close(a.factors(m), factors[m])

    # replacing an earlier output (overwrite), names without the prefix, bfloat16 output
    save_adapter(out, {k[len(PFX):]: v for k, v in factors.items()}, base_model=None, dtype=torch.bfloat16,
                 overwrite=True)
    b = load_adapter(out)
    assert b.modules == a.modules and b.extra_tensors == [] and b.stored_dtype(b.modules[0]) == torch.bfloat16
    assert sorted(os.listdir(tmp_path)) == ["merged"]


def test_save_roundtrip_peft_gpt2_fan_in_fan_out(tmp_path):
    base = tiny_gpt2()
    mods = {"transformer.h.0.attn.c_attn": (96, 32, 2), "transformer.h.1.attn.c_attn": (96, 32, 4),
            "transformer.h.1.mlp.c_proj": (32, 128, 2)}
    factors = _random_factors(mods, seed=5)
    save_adapter(tmp_path / "g", factors, base_model=None, fan_in_fan_out=True)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "g")).eval()
    by_hand = copy.deepcopy(base)
    sd = by_hand.state_dict()
    with torch.no_grad():
        for m, (B, A) in factors.items():
            sd[m[len(PFX):] + ".weight"] += (B @ A).T  # Conv1D keeps (d_in, d_out)
    torch.testing.assert_close(_logits(model, 64), _logits(by_hand, 64), rtol=1e-4, atol=1e-4)
    assert load_adapter(tmp_path / "g").fan_in_fan_out is True


def test_rank_pattern_keys_resolve_like_peft():
    from peft.utils.other import get_pattern_key

    # plain names are ambiguous here ("a.b" also matches "x.a.b"; "." matches "_"), so anchored keys
    ranks = {"a.b": 2, "x.a.b": 4, "y.c_d": 4, "y.c.d": 3, "z": 4}
    r0, rp, ap = rank_config(ranks)
    assert r0 == 4 and rp == ap
    for name, r in ranks.items():
        assert rp.get(get_pattern_key(rp.keys(), name), r0) == r
        assert pattern_key(rp.keys(), name) == get_pattern_key(rp.keys(), name)
    r0, rp, _ = rank_config({"m.q": 2, "m.k": 2, "m.v": 8})
    assert (r0, rp) == (2, {"m.v": 8})


def test_save_anchored_patterns_load_in_peft(tmp_path):
    """A model where the plain name "proj" would also match "blk.proj": the writer falls back to
    anchored keys, and PEFT gives each module its own rank and scale 1."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.blk, self.out = torch.nn.Linear(8, 8), torch.nn.Module(), torch.nn.Linear(8, 6)
            self.blk.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.out(self.blk.proj(self.proj(x)))

    torch.manual_seed(0)
    net = Net()
    factors = _random_factors({"proj": (8, 8, 2), "blk.proj": (8, 8, 4), "out": (6, 8, 4)}, seed=6, prefix="")
    save_adapter(tmp_path / "n", factors, base_model=None)
    cfg = json.loads((tmp_path / "n" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"^proj": 2} and cfg["r"] == 4
    model = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / "n"))
    layers = lora_layers(model)
    assert {n: l.r["default"] for n, l in layers.items()} == {PFX + "proj": 2, PFX + "blk.proj": 4, PFX + "out": 4}
    assert all(l.scaling["default"] == 1.0 for l in layers.values())
    by_hand = copy.deepcopy(net)
    with torch.no_grad():
        for m, (B, A) in factors.items():
            by_hand.get_submodule(m).weight += B @ A
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_hand(x), rtol=1e-5, atol=1e-5)
    a = load_adapter(tmp_path / "n")
    assert [a.rank(PFX + m) for m in ("proj", "blk.proj", "out")] == [2, 4, 4]
    assert all(a.scale(m) == 1.0 for m in a.modules)


def test_save_target_modules_given(llama, tmp_path):
    factors = _random_factors({"model.layers.0.self_attn.q_proj": (64, 64, 2)}, seed=1)
    with pytest.raises(AdapterError, match="not matched by target_modules"):
        save_adapter(tmp_path / "t", factors, base_model=None, target_modules=["v_proj"])
    assert not (tmp_path / "t").exists()
    save_adapter(tmp_path / "t", factors, base_model=None, target_modules=["q_proj"])
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


def _leftovers(d):
    return [n for n in os.listdir(d) if n.startswith(".")]


@pytest.mark.parametrize("bad", ["nan", "shape", "overflow", "not_tensor"])
def test_save_failure_leaves_nothing(tmp_path, bad):
    factors = _random_factors(LLAMA_MODULES, seed=2)
    last = sorted(factors)[-1]
    B, A = factors[last]
    if bad == "nan":
        B = B.clone()
        B[0, 0] = float("nan")
        factors[last] = (B, A)
        msg = "holds NaN or Inf"
    elif bad == "shape":
        factors[last] = (B, A[:-1] if A.shape[0] > 1 else torch.zeros(2, A.shape[1]))
        msg = "do not chain"
    elif bad == "overflow":
        factors[last] = (B * 1e6, A)
        msg = "overflows torch.float16"
    else:
        factors[last] = (B, A.numpy())
        msg = "must be a 2-D tensor"
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match=re.escape(str(out)) + ": module .*" + msg):
        save_adapter(out, factors, base_model=None, dtype=torch.float16 if bad == "overflow" else torch.float32)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_save_failure_keeps_existing(tmp_path, monkeypatch):
    good = _random_factors({"model.layers.0.self_attn.q_proj": (64, 64, 2)}, seed=1)
    out = tmp_path / "out"
    save_adapter(out, good, base_model="m")
    before = (out / "adapter_model.safetensors").read_bytes()

    import knots_ext.io.save as save_module

    def broken(path):  # the disk fills up while the weights are flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_module, "fsync_path", broken)
    with pytest.raises(AdapterError, match=re.escape(str(out)) + ": cannot write the adapter: No space left"):
        save_adapter(out, _random_factors({"model.layers.0.self_attn.q_proj": (64, 64, 3)}, seed=9),
                     base_model="m", overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out"] and _leftovers(tmp_path) == []


def test_save_refuses_to_replace_other_dirs(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    f = _random_factors({"model.layers.0.self_attn.q_proj": (64, 64, 2)}, seed=1)
    with pytest.raises(AdapterError, match="not a knots-merge output .no knots_merge.json.; refusing to write"):
        save_adapter(tmp_path / "home", f, base_model=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is not a directory"):
        save_adapter(tmp_path / "file", f, base_model=None)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["file", "home"]


# ------------------------------------------------------------------------------------------
# Refusals: one line, naming the file


def _bare(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _pair(r=4, d_out=8, d_in=6, dtype=torch.float32, prefix=PFX + "model.q"):
    return {prefix + ".lora_A.weight": torch.randn(r, d_in).to(dtype),
            prefix + ".lora_B.weight": torch.randn(d_out, r).to(dtype)}


def _raises(match, fn, *args, where=None, **kw):
    with pytest.raises(AdapterError, match=match) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    if where is not None:
        assert msg.startswith(str(where) + ": "), msg
    return msg


def _copy_adapter(made, tmp_path, name="fp32"):
    dst = tmp_path / name
    shutil.copytree(made[name][0], dst)
    return dst


def test_refuse_pickle(tmp_path):
    d = tmp_path / "pk"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    # never unpickled: this file would execute code if it were
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    _raises("pickle adapters are not read; convert to safetensors", load_adapter, d, where=d / "adapter_model.bin")
    for suffix in (".bin", ".pt", ".pth"):
        f = tmp_path / ("w" + suffix)
        f.write_bytes(b"junk")
        _raises("pickle adapters are not read; convert to safetensors", load_adapter, f, alpha=1.0, where=f)


def test_refuse_missing_pieces(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    _raises("no .safetensors file", load_adapter, d, where=d)
    _raises("no such file or directory", load_adapter, tmp_path / "nope", where=tmp_path / "nope")
    d2 = tmp_path / "noconfig"
    d2.mkdir()
    _bare(d2 / "adapter_model.safetensors", _pair())
    _raises("no adapter_config.json", load_adapter, d2, where=d2)
    assert load_adapter(d2, alpha=4).scale(PFX + "model.q") == 1.0


def test_refuse_dora(made, tmp_path, llama):
    d = _copy_adapter(made, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _raises("DoRA adapters are not supported", load_adapter, d, where=d / "adapter_config.json")
    # a real PEFT DoRA adapter, and a bare file with magnitude vectors
    m = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    m.save_pretrained(str(tmp_path / "dora"))
    _raises("DoRA adapters are not supported", load_adapter, tmp_path / "dora")
    t = _pair()
    t[PFX + "model.q.lora_magnitude_vector"] = torch.ones(8)
    f = _bare(tmp_path / "dora.safetensors", t)
    _raises("DoRA adapters are not supported", load_adapter, f, alpha=1.0, where=f)


def test_refuse_non_lora_and_bad_json(made, tmp_path):
    d = _copy_adapter(made, tmp_path)
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    _raises("peft_type is 'IA3', not 'LORA'", load_adapter, d, where=cfg_path)
    cfg_path.write_text('{"peft_type": "LORA", "r": 4,,}')
    _raises(r"invalid JSON: .* at line 1 column", load_adapter, d, where=cfg_path)
    cfg_path.write_text("[1, 2]")
    _raises("expected a JSON object", load_adapter, d, where=cfg_path)


def test_refuse_broken_tensors(tmp_path):
    t = _pair()
    del t[PFX + "model.q.lora_B.weight"]
    f = _bare(tmp_path / "a_only.safetensors", t)
    _raises(f"module {re.escape(PFX)}model.q: lora_A without its lora_B", load_adapter, f, alpha=1.0, where=f)
    t = _pair()
    t[PFX + "model.q.lora_B.weight"] = torch.randn(8, 3)
    f = _bare(tmp_path / "chain.safetensors", t)
    _raises(r"shapes do not chain: lora_B is \[8, 3\] and lora_A is \[4, 6\]", load_adapter, f, alpha=1.0, where=f)
    f = _bare(tmp_path / "int.safetensors", _pair(dtype=torch.int32))
    _raises("unsupported dtype I32", load_adapter, f, alpha=1.0, where=f)
    f = _bare(tmp_path / "none.safetensors", {"model.q.weight": torch.zeros(2, 2)})
    _raises("no LoRA tensors", load_adapter, f, alpha=1.0, where=f)
    t = _pair()
    t[PFX + "model.q.lora_A.weight"] = torch.randn(4, 6, 1, 1)
    f = _bare(tmp_path / "conv.safetensors", t)
    _raises("expected a 2-D tensor", load_adapter, f, alpha=1.0, where=f)


def test_refuse_rank_mismatch_with_config(made, tmp_path):
    d = _copy_adapter(made, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _raises("layers.0.self_attn.q_proj: stored rank 2 but adapter_config.json gives r=4", load_adapter, d,
            where=d / "adapter_model.safetensors")


def test_refuse_corrupt_safetensors(made, tmp_path):
    d = _copy_adapter(made, tmp_path)
    w = d / "adapter_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) - 100])
    _raises("not a readable safetensors file", load_adapter, d, where=w)
    w.write_bytes(b"\x00" * 5)
    _raises("not a readable safetensors file", load_adapter, d, where=w)
    g = tmp_path / "garbage.safetensors"
    g.write_bytes(b"definitely not a safetensors file" * 10)
    _raises("not a readable safetensors file", load_adapter, g, alpha=1.0, where=g)


def test_refuse_nan_when_read(tmp_path):
    t = _pair()
    t[PFX + "model.q.lora_B.weight"][2, 1] = float("inf")
    t.update(_pair(prefix=PFX + "model.k"))
    f = _bare(tmp_path / "nan.safetensors", t)
    a = load_adapter(f, alpha=1.0)  # header only: fine
    a.factors(PFX + "model.k")
    _raises(f"module {re.escape(PFX)}model.q: lora_B holds NaN or Inf", a.factors, PFX + "model.q", where=f)
    f16 = _bare(tmp_path / "big.safetensors", {k: v * 1e5 for k, v in _pair().items()})
    _raises("overflows torch.float16", load_adapter(f16, alpha=1.0).factors, PFX + "model.q",
            dtype=torch.float16, where=f16)


def test_check_compatible_refusals(made, tmp_path):
    a = _copy_adapter(made, tmp_path, "fp32")
    b = _copy_adapter(made, tmp_path, "bf16")
    for d, base in ((a, "org/llama-a"), (b, "org/llama-b")):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    A, B = load_adapter(a), load_adapter(b)
    msg = _raises("base model 'org/llama-b' differs from 'org/llama-a'", check_compatible, [A, B], where=b)
    assert str(a) in msg
    check_compatible([A, B], force=True)
    check_compatible([A, load_adapter(made["fp16"][0])])  # no base recorded: nothing to compare

    # same module, other shape: refused even with force
    f = _bare(tmp_path / "other.safetensors", _pair(r=2, d_out=64, d_in=32,
                                                    prefix=PFX + "model.layers.0.self_attn.q_proj"))
    C = load_adapter(f, alpha=1.0)
    msg = _raises(r"module base_model\.model\.model\.layers\.0\.self_attn\.q_proj: update shape \(d_out, d_in\) = "
                  r"\(64, 32\) differs from \(64, 64\)", check_compatible, [A, C], force=True, where=f)
    assert str(a) in msg
    # same modules under another key prefix would never meet
    g = _bare(tmp_path / "noprefix.safetensors",
              _pair(r=2, d_out=64, d_in=64, prefix="model.layers.0.self_attn.q_proj"))
    _raises("different key prefixes", check_compatible, [A, load_adapter(g, alpha=1.0)], where=g)


def test_error_type():
    e = AdapterError("/x/y", "bad\nthing")
    assert isinstance(e, ValueError) and str(e) == "/x/y: bad thing" and e.path == "/x/y"
    assert isinstance(Adapter, type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory", [False, True])
def test_merge_factors_report_zero_entries(tmp_path, dtype, memory):
    """merge_factors (the merge's load): factors(module) in float32, and whether B or A holds an
    entry equal to 0 (either sign), seen in the pass that converts them, for files and memory."""
    from knots_ext.io import MemoryAdapter
    from merge_refs import write_adapter

    path = write_adapter(tmp_path / "a", 4, 8, layers=1, dtype=dtype, seed=3)
    plain = load_adapter(path)
    name = plain.modules[0]
    B, A = plain.factors(name)
    for where, value in ((None, None), ("B", 0.0), ("A", -0.0)):
        Bz, Az = B.clone(), A.clone()
        if where == "B":
            Bz[1, 2] = value
        elif where == "A":
            Az[3, 0] = value
        if memory:
            adapter = MemoryAdapter("<mem>", {name: (Bz.to(dtype), Az.to(dtype))}, 1.0)
        else:
            save_file({f"{name}.lora_B.weight": Bz.to(dtype), f"{name}.lora_A.weight": Az.to(dtype)},
                      str(path / "adapter_model.safetensors"))
            adapter = load_adapter(path)
        got_B, got_A, zero = adapter.merge_factors(name)
        assert got_B.dtype == got_A.dtype == torch.float32
        assert torch.equal(got_B, Bz) and torch.equal(got_A, Az)
        assert zero == bool((Bz == 0).any() or (Az == 0).any()) == (where is not None), (where, dtype)
