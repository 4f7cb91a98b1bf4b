"""Synthetic PEFT LoRA adapters with Llama-3-8B attention shapes, for the end-to-end benchmarks
(random factors; merge speed and memory do not depend on what the adapters learned), and the
plain-text table the benchmarks print."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

# Llama-3-8B attention projections: (d_out, d_in)
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}


def write_adapters(root: Path, n: int, rank: int, layers: int, shapes=LLAMA3_8B, dtype=torch.bfloat16,
                   seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        tensors = {}
        for layer in range(layers):
            for mod, (d_out, d_in) in shapes.items():
                name = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)).to(dtype)
                tensors[f"{name}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.01).to(dtype)
        path = root / f"adapter{i}"
        path.mkdir(exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes),
            "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "task_type": "CAUSAL_LM",
            "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}))
        paths.append(path)
    return paths


def fmt_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
