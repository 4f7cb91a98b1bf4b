"""LoRA file formats: PEFT's, kohya / sd-scripts' and diffusers' (Stable Diffusion LoRAs).

A format says how a safetensors file names the two factors of a module and where its scale comes
from; the factors themselves mean the same in all three (update = scale * up @ down, with up = B
= lora_B and down = A = lora_A; a conv module's down is (r, c_in, kh, kw) and its up
(c_out, r, 1, 1), i.e. the 2-D factors (c_out x r) @ (r x c_in*kh*kw) reshaped).

- peft: "base_model.model.<name>.lora_A.weight" / ".lora_B.weight", scale from adapter_config.json.
- kohya (sd-scripts, also what ComfyUI and A1111 read): "lora_unet_<name with _>.lora_down.weight",
  ".lora_up.weight" and ".alpha" (a scalar); text encoders under "lora_te_" (SD 1.x / 2.x) or
  "lora_te1_" / "lora_te2_" (SDXL). Scale = alpha / rank; alpha missing or 0 -> rank (scale 1),
  as sd-scripts' LoRAModule does.
- diffusers (pytorch_lora_weights.safetensors): "<component>.<name>.lora_A.weight" / ".lora_B.weight"
  with component unet, text_encoder, text_encoder_2 or transformer, or the older
  ".lora.down.weight" / ".lora.up.weight", ".lora_linear_layer.down/up.weight" and attention
  processor keys ("...attn1.processor.to_q_lora.down.weight"). Scale 1 (lora_alpha = r, what
  diffusers assumes), unless the file's "lora_adapter_metadata" gives a LoraConfig per component.

Module names stay in the input's format while merging (adapters of one format merge together;
check_compatible refuses a mix). Written in another format, a name goes through the diffusers
name "<component>.<dotted path>": peft <-> diffusers by the "base_model.model." prefix (exact),
diffusers -> kohya by replacing dots (exact), kohya -> diffusers by splitting the underscored
name into the known parts of diffusers' UNet and CLIP text-encoder module names (a name that does
not split in exactly one way, e.g. SDXL's sgm-style "input_blocks_4_1_...", is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ._common import A_SUFFIX, B_SUFFIX, PEFT_PREFIX, AdapterError, file_name

FORMATS = ("peft", "kohya", "diffusers")

# What diffusers names the file it writes and reads by default.
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# Where diffusers keeps a LoraConfig per component in the safetensors metadata.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# kohya prefix -> diffusers component, and the way back (text encoders: see _kohya_prefix).
_KOHYA_COMPONENTS = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# diffusers' factor suffixes, newest first: (suffix, role) with role "down" (A) or "up" (B).
_DIFFUSERS_SUFFIXES = (
    (A_SUFFIX, "down"),
    (B_SUFFIX, "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".down.weight", "down"),  # attention processors: "...processor.to_q_lora.down.weight"
    (".up.weight", "up"),
)
# The old attention-processor LoRA names and the modules they stand for (UNet, text encoder).
_PROCESSOR_MODULES = {
    "to_q_lora": ("to_q", "q_proj"),
    "to_k_lora": ("to_k", "k_proj"),
    "to_v_lora": ("to_v", "v_proj"),
    "to_out_lora": ("to_out.0", "out_proj"),
}

# The parts of diffusers' UNet2DConditionModel and CLIP text-encoder module names that hold an
# underscore or are needed to split a kohya name: a kohya name is split into these and numbers.
_NAME_PARTS = frozenset(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "attentions",
        "resnets",
        "transformer_blocks",
        "attn1",
        "attn2",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "ff",
        "net",
        "proj",
        "proj_in",
        "proj_out",
        "norm",
        "norm1",
        "norm2",
        "norm3",
        "conv",
        "conv1",
        "conv2",
        "conv_in",
        "conv_out",
        "conv_shortcut",
        "conv_norm_out",
        "time_emb_proj",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "downsamplers",
        "upsamplers",
        "encoder_hid_proj",
        "class_embedding",
        "text_model",
        "encoder",
        "layers",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "mlp",
        "fc1",
        "fc2",
        "text_projection",
        "embeddings",
        "token_embedding",
        "position_embedding",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
    ]
)


@dataclass(frozen=True)
class ModuleKeys:
    """The keys of one module's tensors in a file: up (B), down (A), alpha (kohya, may be absent)."""

    up: str
    down: str
    alpha: str | None = None


# ------------------------------------------------------------------ detection and key grouping


def detect_format(keys: Iterable[str]) -> str | None:
    """'kohya' or 'diffusers' when the keys of a safetensors file are in one of those formats,
    None otherwise (PEFT keys, or no LoRA at all)."""
    keys = list(keys)
    if any(k.endswith((KOHYA_DOWN, KOHYA_UP)) for k in keys):
        return "kohya"
    lora = [k for k in keys if k.endswith(tuple(s for s, _ in _DIFFUSERS_SUFFIXES))]
    if lora and all(k.split(".", 1)[0] in DIFFUSERS_COMPONENTS for k in lora):
        return "diffusers"
    return None


def _refuse_variants(path: str, key: str) -> None:
    """LoRA variants whose update is not up @ down (DoRA, LyCORIS LoHa / LoKr / Tucker conv)."""
    if "lora_magnitude_vector" in key or key.endswith(".dora_scale"):
        raise AdapterError(path, f"DoRA adapters are not supported (found {key!r})")
    if ".hada_" in key or ".lokr_" in key:
        raise AdapterError(path, f"LyCORIS LoHa / LoKr adapters are not supported (found {key!r})")
    if key.endswith(".lora_mid.weight"):
        raise AdapterError(path, f"LoCon with a Tucker (lora_mid) factor is not supported (found {key!r})")


def _peft_role(path: str, key: str) -> tuple[str, str] | None:
    if key.endswith(A_SUFFIX):
        return key[: -len(A_SUFFIX)], "down"
    if key.endswith(B_SUFFIX):
        return key[: -len(B_SUFFIX)], "up"
    if ".lora_embedding_A" in key or ".lora_embedding_B" in key:
        raise AdapterError(path, f"LoRA on embedding layers is not supported (found {key!r})")
    if key.endswith(".lora_B.bias"):
        raise AdapterError(path, f"adapters with a LoRA bias (lora_bias) are not supported (found {key!r})")
    if re.search(r"\.lora_[AB]\.", key):
        raise AdapterError(
            path,
            f"unrecognised LoRA key {key!r} (expected '<module>.lora_A.weight' and "
            "'<module>.lora_B.weight', as PeftModel.save_pretrained writes them)",
        )
    return None


def _kohya_role(path: str, key: str) -> tuple[str, str] | None:
    for suffix, role in ((KOHYA_DOWN, "down"), (KOHYA_UP, "up"), (KOHYA_ALPHA, "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _diffusers_module(stem: str) -> str:
    """A diffusers key's module part as the module's name: the old attention-processor names
    ("attn1.processor.to_q_lora") become the module they adapt ("attn1.to_q")."""
    parent, _, last = stem.rpartition(".")
    if last in _PROCESSOR_MODULES:
        unet_name, te_name = _PROCESSOR_MODULES[last]
        parent = parent[: -len(".processor")] if parent.endswith(".processor") else parent
        last = te_name if stem.split(".", 1)[0] in _TEXT_ENCODERS else unet_name
        return f"{parent}.{last}"
    return stem


def _diffusers_role(path: str, key: str) -> tuple[str, str] | None:
    if key.endswith(".lora_B.bias"):
        raise AdapterError(path, f"adapters with a LoRA bias are not supported (found {key!r})")
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            if suffix in (".down.weight", ".up.weight") and stem.rpartition(".")[2] not in _PROCESSOR_MODULES:
                return None
            return _diffusers_module(stem), role
    return None


_ROLES = {"peft": _peft_role, "kohya": _kohya_role, "diffusers": _diffusers_role}
_EXPECTED = {
    "peft": "'<module>.lora_A.weight' and '<module>.lora_B.weight'",
    "kohya": "'<module>.lora_down.weight' and '<module>.lora_up.weight'",
    "diffusers": "'<component>.<module>.lora_A.weight' and '.lora_B.weight'",
}
_ROLE_NAMES = {
    "peft": {"down": "lora_A", "up": "lora_B"},
    "kohya": {"down": "lora_down", "up": "lora_up", "alpha": "alpha"},
    "diffusers": {"down": "lora_A (down)", "up": "lora_B (up)"},
}


def group_keys(path: str, fmt: str, keys: Iterable[str]) -> tuple[dict[str, ModuleKeys], list[str]]:
    """({module: its ModuleKeys}, sorted other keys) of a file in format `fmt`; a module with one
    factor but not the other, an alpha without factors, a key given twice or a LoRA variant whose
    update is not up @ down is an AdapterError naming the file."""
    found: dict[str, dict[str, str]] = {}
    extras = []
    for key in keys:
        _refuse_variants(path, key)
        hit = _ROLES[fmt](path, key)
        if hit is None:
            extras.append(key)
            continue
        module, role = hit
        roles = found.setdefault(module, {})
        if role in roles:
            raise AdapterError(path, f"module {module}: {roles[role]!r} and {key!r} are the same tensor")
        roles[role] = key
    names = _ROLE_NAMES[fmt]
    modules = {}
    for module, roles in sorted(found.items()):
        missing = [names[r] for r in ("down", "up") if r not in roles]
        if len(missing) == 2:
            raise AdapterError(path, f"module {module}: an alpha without lora_down and lora_up")
        if missing:
            have = names["up" if missing[0] == names["down"] else "down"]
            raise AdapterError(path, f"module {module}: {have} without its {missing[0]}")
        modules[module] = ModuleKeys(roles["up"], roles["down"], roles.get("alpha"))
    if not modules:
        raise AdapterError(path, f"no LoRA tensors (expected keys like {_EXPECTED[fmt]})")
    return modules, sorted(extras)


# ------------------------------------------------------------------ scales


def kohya_scale(path: str, module: str, alpha: torch.Tensor | None, rank: int) -> float:
    """alpha / rank, with alpha missing or 0 taken as the rank (sd-scripts' LoRAModule)."""
    if alpha is None:
        return 1.0
    if alpha.numel() != 1 or alpha.is_complex():
        raise AdapterError(path, f"module {module}: alpha must be one number, got shape {list(alpha.shape)}")
    value = float(alpha.reshape(()).double())
    if not math.isfinite(value):
        raise AdapterError(path, f"module {module}: alpha is {value}")
    return 1.0 if value == 0 else value / rank


def diffusers_configs(path: str, metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """{component: LoraConfig fields} from a diffusers file's lora_adapter_metadata ({} when the
    file has none: every module then has scale 1, as diffusers loads it)."""
    raw = (metadata or {}).get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise AdapterError(path, f"the {DIFFUSERS_METADATA_KEY} metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise AdapterError(path, f"the {DIFFUSERS_METADATA_KEY} metadata is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in data.items():
        component, _, field = str(key).partition(".")
        if component not in DIFFUSERS_COMPONENTS or not field:
            raise AdapterError(path, f"{DIFFUSERS_METADATA_KEY}: unexpected entry {key!r}")
        configs.setdefault(component, {})[field] = value
    return configs


def component_of(module: str) -> str:
    """A diffusers module's component ("unet" of "unet.down_blocks.0...")."""
    return module.split(".", 1)[0]


# ------------------------------------------------------------------ names across formats


def _split_kohya(path: str, name: str, tail: str) -> str:
    """A kohya name's underscored tail as the dotted module path it stands for: the one way to
    split it into _NAME_PARTS and numbers, or an AdapterError when there is none or several."""
    tokens = tail.split("_")
    # ways[i]: the dotted splits of tokens[i:] (two at most are kept: a third says nothing more)
    ways: list[list[str]] = [[] for _ in tokens] + [[""]]
    for i in range(len(tokens) - 1, -1, -1):
        for j in range(i + 1, len(tokens) + 1):
            part = "_".join(tokens[i:j])
            if (part.isdigit() and j == i + 1) or part in _NAME_PARTS:
                ways[i] += [part + ("." + rest if rest else "") for rest in ways[j]][: 2 - len(ways[i])]
    if len(ways[0]) != 1:
        problem = "splits in several ways" if ways[0] else "has parts that are not in diffusers' UNet / CLIP names"
        raise AdapterError(
            path,
            f"kohya module {name}: cannot be named as a diffusers / PEFT module (its name {problem}, "
            "e.g. SDXL's sgm-style block names); keep the kohya format (--format kohya)",
        )
    return ways[0][0]


def kohya_to_diffusers(path: str, name: str) -> str:
    for prefix, component in _KOHYA_COMPONENTS.items():
        if name.startswith(prefix):
            return f"{component}.{_split_kohya(path, name, name[len(prefix) :])}"
    raise AdapterError(path, f"kohya module {name}: unknown prefix (expected one of {', '.join(_KOHYA_COMPONENTS)})")


def diffusers_to_kohya(path: str, name: str, te_numbered: bool) -> str:
    """lora_unet_... / lora_te_... (lora_te1_ / lora_te2_ when the merge has a second text encoder)."""
    component, _, rest = name.partition(".")
    if component == "unet":
        prefix = "lora_unet_"
    elif component == "text_encoder":
        prefix = "lora_te1_" if te_numbered else "lora_te_"
    elif component == "text_encoder_2":
        prefix = "lora_te2_"
    else:
        raise AdapterError(
            path,
            f"module {name}: kohya names exist for unet and text encoder modules only "
            "(a transformer's are model-specific); use the diffusers format (--format diffusers)",
        )
    return prefix + rest.replace(".", "_")


def _peft_to_diffusers(path: str, name: str) -> str:
    rest = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
    if component_of(rest) not in DIFFUSERS_COMPONENTS or "." not in rest:
        raise AdapterError(
            path,
            f"module {name}: a Stable Diffusion format needs module names under one of "
            f"{', '.join(DIFFUSERS_COMPONENTS)} (as in 'base_model.model.unet.down_blocks...')",
        )
    return rest


class OutputLayout:
    """How AdapterWriter writes a format: the weights file's name, each module's keys and tensors
    (conv factors reshaped back to 4-D; no kohya alpha: missing means scale 1 to every kohya
    reader) and whether an adapter_config.json goes beside it (PEFT only).

    `source` is the format of the module names the writer is given, `conv_shapes` the weight
    shape (c_out, c_in, kh, kw) of each conv module (by those names), `modules` every name to be
    written (kohya: lora_te1_ / lora_te2_ when a second text encoder is among them)."""

    def __init__(
        self,
        fmt: str = "peft",
        source: str | None = None,
        conv_shapes: Mapping[str, tuple] | None = None,
        modules: Iterable[str] = (),
    ):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.format, self.source = fmt, source or fmt
        if self.source not in FORMATS:
            raise ValueError(f"source format must be one of {', '.join(FORMATS)}, got {self.source!r}")
        self.conv_shapes = dict(conv_shapes or {})
        self.writes_config = fmt == "peft"
        self._te_numbered = (
            fmt == "kohya"
            and self.source != "kohya"
            and any(
                component_of(self._diffusers_name("", m)) == "text_encoder_2" for m in modules if self._convertible(m)
            )
        )

    def _convertible(self, module: str) -> bool:
        try:
            self._diffusers_name("", module)
        except AdapterError:
            return False
        return True

    def weights_name(self, out_dir: str) -> str:
        """peft: adapter_model.safetensors; diffusers: pytorch_lora_weights.safetensors; kohya:
        <OUT's name>.safetensors (the file is what gets copied into a UI's lora folder)."""
        from .adapter import WEIGHTS_NAME

        if self.format == "peft":
            return WEIGHTS_NAME
        if self.format == "diffusers":
            return DIFFUSERS_WEIGHTS_NAME
        return os.path.basename(os.path.abspath(out_dir)) + ".safetensors"

    def _diffusers_name(self, where: str, module: str) -> str:
        if self.source == "kohya":
            return kohya_to_diffusers(where, module)
        if self.source == "peft":
            return _peft_to_diffusers(where, module)
        return module

    def name(self, where: str, module: str) -> str:
        """The module's name in the output format (AdapterError naming `where` if it has none)."""
        if self.format == self.source:
            return file_name(module) if self.format == "peft" else module
        diffusers = self._diffusers_name(where, module)
        if self.format == "diffusers":
            return diffusers
        if self.format == "peft":
            return PEFT_PREFIX + diffusers
        return diffusers_to_kohya(where, diffusers, self._te_numbered)

    def keys(self, where: str, module: str) -> tuple[str, str]:
        """(key of B, key of A) in the output file."""
        name = self.name(where, module)
        if self.format == "kohya":
            return name + KOHYA_UP, name + KOHYA_DOWN
        return name + B_SUFFIX, name + A_SUFFIX

    def shaped(self, module: str, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B and A as the file stores them: a conv module's as (c_out, r, 1, 1) and (r, c_in, kh, kw)."""
        shape = self.conv_shapes.get(module)
        if shape is None:
            return B, A
        c_out, c_in, kh, kw = shape
        r = A.shape[0]
        return B.reshape(c_out, r, 1, 1), A.reshape(r, c_in, kh, kw)
