"""Writes the bundled example: three small PEFT LoRA adapters (q_proj / v_proj of a 4-layer,
hidden-128 Llama-style model; ranks 4, 8, 8, one with rslora) into examples/adapters/.
Deterministic; rerun it to regenerate the files:  python examples/make_example_adapters.py"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, LAYERS = 128, 4
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN // 2, HIDDEN)}


def write(path: Path, rank: int, alpha: float, seed: int, rslora: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for mod, (d_out, d_in) in SHAPES.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
            tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "example/tiny-llama",
        "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted(SHAPES),
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none"},
        indent=2))


if __name__ == "__main__":
    root = Path(__file__).resolve().parent / "adapters"
    write(root / "task_a", 4, 8, seed=1)
    write(root / "task_b", 8, 16, seed=2)
    write(root / "task_c", 8, 8, seed=3, rslora=True)
    print(f"wrote 3 adapters under {root}")
