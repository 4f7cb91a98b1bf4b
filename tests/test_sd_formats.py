"""Stable Diffusion LoRA formats (kohya / sd-scripts, diffusers) in and out, conv LoRA, and the
merged LoRA loaded by diffusers' own LoRA loader into a tiny UNet2DConditionModel built from a
config (no download): its output must equal the base UNet's with the float64 reference update added."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import knots_ext
from knots_ext.io import AdapterError, OutputLayout, load_adapter
from merge_refs import F64, close, read_kohya_updates, ref_global_ties


ROOT = Path(__file__).resolve().parent.parent

UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
)
BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
# Linear attention / feed-forward projections, 1x1 and 3x3 convolutions of the tiny UNet.
TARGETS = [
    f"{BLOCK}.attn1.to_q",
    f"{BLOCK}.attn1.to_v",
    f"{BLOCK}.attn2.to_k",
    f"{BLOCK}.attn2.to_out.0",
    f"{BLOCK}.ff.net.0.proj",
    "down_blocks.0.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.1.resnets.0.conv_shortcut",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.0.upsamplers.0.conv",
]


def kohya_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).eval()


def weight_shapes(unet):
    mods = dict(unet.named_modules())
    return {name: tuple(mods[name].weight.shape) for name in TARGETS}


def write_kohya(path, shapes, ranks, alphas, seed, skip=()):
    """A kohya LoRA of the given modules: random factors (conv ones 4-D), alpha per module (None: no key)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        if name in skip:
            continue
        r = ranks[i % len(ranks)]
        c_out, c_in = shape[0], shape[1]
        kernel = tuple(shape[2:])
        down = torch.randn((r, c_in, *kernel), generator=gen) / (c_in * max(1, len(kernel) * 3)) ** 0.5
        up = torch.randn((c_out, r, *(1,) * len(kernel)), generator=gen) * 0.3
        key = kohya_name(name)
        tensors[key + ".lora_down.weight"] = down
        tensors[key + ".lora_up.weight"] = up
        alpha = alphas[i % len(alphas)]
        if alpha is not None:
            tensors[key + ".alpha"] = torch.tensor(float(alpha))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture
def kohya_pair(tmp_path, unet):
    shapes = weight_shapes(unet)
    a = write_kohya(tmp_path / "in" / "style_a.safetensors", shapes, [4, 2, 3], [2.0, 4.0, None], seed=1)
    b = write_kohya(tmp_path / "in" / "style_b.safetensors", shapes, [3, 5], [8.0, 1.0, 0.0], seed=2,
                    skip={TARGETS[1]})  # a module only the first adapter has
    return a, b


def unet_output(model):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500]), ctx).sample


def with_updates(unet, updates):
    """The base UNet with float64 updates (keyed by diffusers module name) added to its weights."""
    model = copy.deepcopy(unet)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, dW in updates.items():
            W = mods[name].weight
            W.copy_((W.double() + dW.reshape(W.shape)).float())
    return model


def diffusers_loaded(unet, folder, weight_name):
    """The base UNet with a LoRA file loaded by diffusers (its kohya conversion included)."""
    from diffusers import StableDiffusionPipeline

    model = copy.deepcopy(unet)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(folder), weight_name=weight_name, return_lora_metadata=True
    )
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=model, adapter_name="merged", metadata=metadata)
    return model


def reference_merge(paths, method):
    """{diffusers module name: float64 merged update} of kohya files, for ta and ties (top_k 0.5)."""
    updates = [read_kohya_updates(p) for p in paths]
    names = sorted(set().union(*updates))
    if method == "ta":
        merged = {n: sum(u[n] for u in updates if n in u) for n in names}
    else:
        shapes = {n: next(tuple(u[n].shape) for u in updates if n in u) for n in names}
        merged = ref_global_ties(updates, names, shapes, 0.5, 1.0)
    back = {kohya_name(t): t for t in TARGETS}
    return {back[n]: w for n, w in merged.items()}


PARAMS = {"ta": {}, "ties": {"top_k": 0.5}}


@pytest.mark.parametrize("method", ["ta", "ties"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_merged_lora_loads_in_diffusers(tmp_path, unet, kohya_pair, method, fmt):
    out = tmp_path / "merged"
    knots_ext.merge_to(out, list(kohya_pair), method=method, format=None if fmt == "kohya" else fmt,
                       **PARAMS[method])
    weight_name = "merged.safetensors" if fmt == "kohya" else "pytorch_lora_weights.safetensors"
    assert (out / weight_name).is_file() and not (out / "adapter_config.json").exists()
    want = reference_merge(kohya_pair, method)
    # the file itself, read by the test's own rules
    saved = load_file(str(out / weight_name))
    if fmt == "kohya":
        assert not any(k.endswith(".alpha") for k in saved)  # scale 1: alpha missing means rank
        got = {n: read_kohya_updates(out / weight_name)[kohya_name(n)] for n in TARGETS}
        conv = saved[kohya_name("down_blocks.0.resnets.0.conv1") + ".lora_down.weight"]
    else:
        got = {n: saved[f"unet.{n}.lora_B.weight"].double().flatten(1) @ saved[f"unet.{n}.lora_A.weight"].double()
               .flatten(1) for n in TARGETS}
        conv = saved["unet.down_blocks.0.resnets.0.conv1.lora_A.weight"]
    assert conv.dim() == 4 and tuple(conv.shape[1:]) == (32, 3, 3)
    for n in TARGETS:
        close(got[n], want[n], 1e-5, n)
    # and loaded by diffusers into the UNet
    expected = unet_output(with_updates(unet, want))
    assert (expected - unet_output(unet)).abs().max() > 1e-2  # the update changes the output
    loaded = unet_output(diffusers_loaded(unet, out, weight_name))
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)


def test_input_alphas_as_sd_scripts(kohya_pair):
    """alpha / r, alpha missing or 0 -> scale 1; conv modules merged as their 2-D factors."""
    a = load_adapter(kohya_pair[1])
    assert a.format == "kohya"
    raw = load_file(str(kohya_pair[1]))
    for m in a.modules:
        r = a.rank(m)
        alpha = float(raw[m + ".alpha"]) if m + ".alpha" in raw else 0.0
        assert a.scale(m) == (alpha / r if alpha else 1.0)
    conv = kohya_name("down_blocks.0.resnets.0.conv1")
    assert a.conv_shape(conv) == (32, 32, 3, 3) and a.shape(conv) == (32, 288)
    B, A = a.factors(conv, F64)
    torch.testing.assert_close(B @ A, raw[conv + ".lora_up.weight"].double().flatten(1)
                               @ raw[conv + ".lora_down.weight"].double().flatten(1))
    assert a.conv_shape(kohya_name(f"{BLOCK}.attn1.to_q")) is None


def updates_of(path):
    """{diffusers module name: float64 update} of any adapter, through load_adapter."""
    a = load_adapter(path)
    out = {}
    for m in a.modules:
        B, A = a.factors(m, F64)
        if a.format == "kohya":
            name = next(t for t in TARGETS if kohya_name(t) == m)
        elif a.format == "peft":
            name = m.removeprefix("base_model.model.unet.")
        else:
            name = m.removeprefix("unet.")
        out[name] = (a.scale(m) * B @ A, a.conv_shape(m))
    return out


def test_round_trip_between_formats(tmp_path, unet, kohya_pair):
    """kohya -> peft -> diffusers -> kohya -> peft: the same updates and conv shapes all along."""
    want = reference_merge(kohya_pair, "ta")
    shapes = weight_shapes(unet)
    prev = [str(p) for p in kohya_pair]
    for step, fmt in enumerate(["peft", "diffusers", "kohya", "peft"]):
        out = tmp_path / f"step{step}"
        knots_ext.merge_to(out, prev, method="ta", format=fmt)
        got = updates_of(out)
        assert load_adapter(out).format == fmt and sorted(got) == sorted(want)
        for n in TARGETS:
            close(got[n][0], want[n], 1e-5, f"{fmt} {n}")
            assert got[n][1] == (None if len(shapes[n]) == 2 else shapes[n])
        prev = [str(out)]
    peft_keys = load_file(str(tmp_path / "step0" / "adapter_model.safetensors"))
    assert f"base_model.model.unet.{BLOCK}.attn1.to_q.lora_A.weight" in peft_keys
    cfg = json.loads((tmp_path / "step0" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"]


def test_merge_result_save_in_any_format(tmp_path, kohya_pair):
    res = knots_ext.merge(list(kohya_pair), method="ta")
    assert res.format == "kohya"
    res.save(tmp_path / "k")
    res.save(tmp_path / "d", format="diffusers")
    want = reference_merge(kohya_pair, "ta")
    for folder in ("k", "d"):
        got = updates_of(tmp_path / folder)
        for n in TARGETS:
            close(got[n][0], want[n], 1e-5, n)


def test_diffusers_input_variants(tmp_path, unet):
    """Older diffusers keys (.lora.down/.lora.up, attention processors) and a LoraConfig in the
    metadata (lora_alpha 8 for rank 4: scale 2), checked against diffusers' own loader too."""
    gen = torch.Generator().manual_seed(3)
    shapes = weight_shapes(unet)
    new_style, old_style, want = {}, {}, {}
    for name in (f"{BLOCK}.attn1.to_q", f"{BLOCK}.attn2.to_out.0", "down_blocks.0.resnets.0.conv1"):
        shape = shapes[name]
        down = torch.randn((4, *shape[1:]), generator=gen) * 0.1
        up = torch.randn((shape[0], 4, *(1,) * (len(shape) - 2)), generator=gen) * 0.1
        want[name] = up.double().flatten(1) @ down.double().flatten(1)
        new_style[f"unet.{name}.lora_A.weight"], new_style[f"unet.{name}.lora_B.weight"] = down, up
        if name.endswith("to_out.0"):
            old = f"unet.{BLOCK}.attn2.processor.to_out_lora"
            old_style[old + ".down.weight"], old_style[old + ".up.weight"] = down, up
        else:
            old_style[f"unet.{name}.lora.down.weight"], old_style[f"unet.{name}.lora.up.weight"] = down, up
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules":
                                                  sorted(want)})}
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    save_file(new_style, str(tmp_path / "new" / "pytorch_lora_weights.safetensors"), metadata=meta)
    save_file(old_style, str(tmp_path / "old" / "pytorch_lora_weights.safetensors"))
    for folder, scale in (("new", 2.0), ("old", 1.0)):
        got = updates_of(tmp_path / folder)
        assert sorted(got) == sorted(want)
        for n in want:
            close(got[n][0], scale * want[n], 1e-6, f"{folder} {n}")
    loaded = unet_output(diffusers_loaded(unet, tmp_path / "new", "pytorch_lora_weights.safetensors"))
    expected = unet_output(with_updates(unet, {n: 2.0 * w for n, w in want.items()}))
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-4)


def one_line_error(path_fragment, fn, *args, **kw):
    with pytest.raises(AdapterError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path_fragment) in msg, msg
    return msg


def _kohya_file(tmp_path, name, tensors):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_bad_kohya_input(tmp_path):
    m = "lora_unet_down_blocks_0_resnets_0_conv1"
    good = {m + ".lora_down.weight": torch.randn(4, 8, 3, 3), m + ".lora_up.weight": torch.randn(16, 4, 1, 1)}
    cases = {
        "up_only": ({m + ".lora_up.weight": torch.randn(16, 4, 1, 1), "lora_unet_x.lora_down.weight": torch.ones(1, 2),
                     "lora_unet_x.lora_up.weight": torch.ones(2, 1)}, "lora_up without its lora_down"),
        "ranks": ({m + ".lora_down.weight": torch.randn(3, 8, 3, 3), m + ".lora_up.weight": torch.randn(16, 4, 1, 1)},
                  "shapes do not chain"),
        "up_3x3": ({m + ".lora_down.weight": torch.randn(4, 8, 3, 3), m + ".lora_up.weight": torch.randn(16, 4, 3, 3)},
                   "conv layer's down (r, c_in, kh, kw) and up (c_out, r, 1, 1)"),
        "alpha_shape": ({**good, m + ".alpha": torch.ones(2)}, "alpha must be one number"),
        "alpha_only": ({**good, "lora_unet_y.alpha": torch.tensor(1.0)}, "an alpha without lora_down and lora_up"),
        "loha": ({**good, "lora_unet_y.hada_w1_a": torch.ones(2, 2)}, "LoHa / LoKr"),
        "tucker": ({**good, m + ".lora_mid.weight": torch.ones(4, 4, 3, 3)}, "lora_mid"),
        "nan": ({**good, m + ".lora_up.weight": torch.full((16, 4, 1, 1), float("nan"))}, "NaN or Inf"),
    }
    for name, (tensors, problem) in cases.items():
        path = _kohya_file(tmp_path, f"{name}.safetensors", tensors)
        msg = one_line_error(path, lambda p: knots_ext.merge([p], method="ta"), path)
        assert problem in msg, (name, msg)
    ok = _kohya_file(tmp_path, "ok.safetensors", good)
    assert "stores its own alphas" in one_line_error(ok, load_adapter, ok, alpha=4.0)


def test_mixed_formats_and_conv_shapes_refused(tmp_path, kohya_pair):
    knots_ext.merge_to(tmp_path / "d", [str(kohya_pair[0])], method="ta", format="diffusers")
    msg = one_line_error(tmp_path / "d", knots_ext.merge, [str(kohya_pair[0]), str(tmp_path / "d")], method="ta")
    assert str(kohya_pair[0]) in msg and "kohya format" in msg and "diffusers format" in msg
    m = "lora_unet_down_blocks_0_resnets_0_conv1"
    a = _kohya_file(tmp_path, "a.safetensors", {m + ".lora_down.weight": torch.randn(2, 9, 1, 1),
                                                m + ".lora_up.weight": torch.randn(4, 2, 1, 1)})
    b = _kohya_file(tmp_path, "b.safetensors", {m + ".lora_down.weight": torch.randn(2, 1, 3, 3),
                                                m + ".lora_up.weight": torch.randn(4, 2, 1, 1)})
    assert "conv weight shape" in one_line_error(b, knots_ext.merge, [a, b], method="ta")


def test_cli_refuses_unnameable_module_before_writing(tmp_path):
    """An SDXL sgm-style kohya name has no diffusers name here: exit 2, one line, nothing written."""
    m = "lora_unet_input_blocks_4_1_proj_in"
    src = _kohya_file(tmp_path, "sgm.safetensors", {m + ".lora_down.weight": torch.randn(2, 8),
                                                    m + ".lora_up.weight": torch.randn(8, 2)})
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "knots_ext.cli", str(src), "-o", str(out), "--method", "ta",
                           "--format", "diffusers", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{src}: kohya module {m}" in lines[0] and "--format kohya" in lines[0], proc.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
    proc = subprocess.run([sys.executable, "-m", "knots_ext.cli", str(src), "-o", str(out), "--method", "ta",
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(load_file(str(out / "out.safetensors"))) == [m + ".lora_down.weight", m + ".lora_up.weight"]


def test_kohya_name_splitting():
    from knots_ext.io.formats import diffusers_to_kohya, kohya_to_diffusers

    for name in TARGETS + ["time_embedding.linear_1", "conv_in"]:
        assert kohya_to_diffusers("f", kohya_name(name)) == "unet." + name
        assert diffusers_to_kohya("f", "unet." + name, False) == kohya_name(name)
    te = "text_model.encoder.layers.11.self_attn.out_proj"
    assert kohya_to_diffusers("f", "lora_te1_" + te.replace(".", "_")) == "text_encoder." + te
    assert diffusers_to_kohya("f", "text_encoder_2." + te, True) == "lora_te2_" + te.replace(".", "_")
    assert diffusers_to_kohya("f", "text_encoder." + te, False) == "lora_te_" + te.replace(".", "_")
    with pytest.raises(AdapterError, match=re.escape("lora_unet_input_blocks_4_1_proj_in")):
        kohya_to_diffusers("f", "lora_unet_input_blocks_4_1_proj_in")
    # SDXL's two text encoders are lora_te1_ / lora_te2_; one alone is lora_te_, as sd-scripts names them
    sdxl = OutputLayout("kohya", "diffusers", modules=["text_encoder." + te, "text_encoder_2." + te])
    assert sdxl.name("f", "text_encoder." + te).startswith("lora_te1_text_model")
    sd1 = OutputLayout("kohya", "peft", modules=["base_model.model.text_encoder." + te])
    assert sd1.keys("f", "base_model.model.text_encoder." + te)[1] == "lora_te_" + te.replace(".", "_") + (
        ".lora_down.weight")


def test_readme_sd_command(tmp_path):
    """The README's Stable Diffusion command runs on the shipped examples."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Stable Diffusion LoRAs", 1)[1]
    command = re.search(r"^knots-merge examples/sd_adapters/.*$", section, re.M).group(0)
    args = command.split()[1:]
    out_index = args.index("-o") + 1
    out = tmp_path / "sd-merged"
    args[out_index] = str(out)
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "knots_ext.cli", *args, "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert "sd-merged.safetensors" in files
    a = load_adapter(out)
    assert a.format == "kohya" and any(a.conv_shape(m) for m in a.modules)


TE_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.self_attn.out_proj",
              "text_model.encoder.layers.1.mlp.fc1"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_text_encoder_lora_loads_in_diffusers(tmp_path, fmt):
    """lora_te_ modules of a tiny CLIPTextModel: merged (ta), written as kohya or diffusers, and
    loaded by diffusers' text-encoder loader, equal the float64 merged update added to the weights."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=64, max_position_embeddings=8)).eval()
    # transformers 5 dropped CLIPTextModel's "text_model." level that sd-scripts' names keep
    mods = {n if n.startswith("text_model.") else "text_model." + n: m for n, m in te.named_modules()}
    gen = torch.Generator().manual_seed(5)
    paths = []
    for i, (r, alpha) in enumerate([(4, 2.0), (2, None)]):
        tensors = {}
        for name in TE_TARGETS:
            d_out, d_in = mods[name].weight.shape
            key = "lora_te_" + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = torch.randn(r, d_in, generator=gen) * 0.2
            tensors[key + ".lora_up.weight"] = torch.randn(d_out, r, generator=gen) * 0.2
            if alpha is not None:
                tensors[key + ".alpha"] = torch.tensor(alpha)
        paths.append(_kohya_file(tmp_path, f"te{i}.safetensors", tensors))
    out = tmp_path / "merged"
    knots_ext.merge_to(out, paths, method="ta", format=None if fmt == "kohya" else fmt)
    refs = [read_kohya_updates(p) for p in paths]
    want = {n: sum(u["lora_te_" + n.replace(".", "_")] for u in refs) for n in TE_TARGETS}

    ids = torch.tensor([[1, 5, 9, 3, 2]])
    base = copy.deepcopy(te)
    with torch.no_grad():
        bm = {n if n.startswith("text_model.") else "text_model." + n: m for n, m in base.named_modules()}
        for n, dW in want.items():
            bm[n].weight.copy_((bm[n].weight.double() + dW).float())
        expected = base(ids).last_hidden_state
        assert (expected - te(ids).last_hidden_state).abs().max() > 1e-2
    weight_name = "merged.safetensors" if fmt == "kohya" else "pytorch_lora_weights.safetensors"
    if fmt == "diffusers":
        assert f"text_encoder.{TE_TARGETS[0]}.lora_A.weight" in load_file(str(out / weight_name))
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(out), weight_name=weight_name)
    loaded = copy.deepcopy(te)
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=loaded, prefix="text_encoder",
                                                        adapter_name="merged")
    with torch.no_grad():
        got = loaded(ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
