"""Writes the bundled Stable Diffusion examples: two small kohya / sd-scripts format LoRAs
(style_a.safetensors, style_b.safetensors) for the tiny diffusers UNet2DConditionModel that
tests/test_sd_formats.py builds (block_out_channels (32, 64), layers_per_block 1,
cross_attention_dim 32): attention projections, a feed-forward layer, a 1x1 and a 3x3 conv (LoCon).
style_a: rank 4, alpha 2 (scale 0.5); style_b: rank 8, alpha 8 on the Linear layers and rank 4
with no alpha (scale 1) on the convs. Deterministic; rerun to regenerate:
python examples/sd_adapters/make_sd_adapters.py"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
# module (diffusers name) -> its weight shape
SHAPES = {
    f"{BLOCK}.attn1.to_q": (32, 32),
    f"{BLOCK}.attn1.to_k": (32, 32),
    f"{BLOCK}.attn1.to_v": (32, 32),
    f"{BLOCK}.attn1.to_out.0": (32, 32),
    f"{BLOCK}.attn2.to_k": (32, 32),
    f"{BLOCK}.attn2.to_v": (32, 32),
    f"{BLOCK}.ff.net.0.proj": (256, 32),
    "down_blocks.0.attentions.0.proj_in": (32, 32, 1, 1),
    "down_blocks.0.resnets.0.conv1": (32, 32, 3, 3),
}


def write(path: Path, rank: int, alpha: float, conv_rank: int, conv_alpha: float | None, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in SHAPES.items():
        key = "lora_unet_" + name.replace(".", "_")
        kernel = shape[2:]
        r, a = (conv_rank, conv_alpha) if kernel else (rank, alpha)
        fan_in = math.prod(shape[1:])
        tensors[key + ".lora_down.weight"] = torch.randn((r, *shape[1:]), generator=gen) / math.sqrt(fan_in)
        tensors[key + ".lora_up.weight"] = torch.randn((shape[0], r, *(1,) * len(kernel)), generator=gen) * 0.05
        if a is not None:
            tensors[key + ".alpha"] = torch.tensor(float(a))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})


if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    write(root / "style_a.safetensors", rank=4, alpha=2, conv_rank=4, conv_alpha=2, seed=11)
    write(root / "style_b.safetensors", rank=8, alpha=8, conv_rank=4, conv_alpha=None, seed=12)
    print(f"wrote 2 kohya LoRAs under {root}")
