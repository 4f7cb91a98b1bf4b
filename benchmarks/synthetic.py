"""Synthetic PEFT LoRA adapters with Llama-3-8B attention shapes, for the end-to-end benchmarks
(random factors; merge speed and memory do not depend on what the adapters learned), and a plain
reader of PEFT LoRA adapters (no knots_ext) for their checks. torch is imported where it is used,
so that a benchmark's parent process can read the shapes without it."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Llama-3-8B attention projections: (d_out, d_in)
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def write_adapters(root: Path, n: int, rank: int, layers: int, shapes=LLAMA3_8B, dtype="bfloat16",
                   seed: int = 0, start: int = 0) -> list[Path]:
    """Adapters root/adapter{i}, i < n: random factors, adapter i from seed * 1000 + i; those below
    `start` are taken as already written (their paths are returned, nothing is checked). The
    config is written last, so an adapter folder without one was cut short. dtype: a torch dtype
    or its name."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"adapter{i}"
        paths.append(path)
        if i < start:
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        tensors = {}
        for layer in range(layers):
            for mod, (d_out, d_in) in shapes.items():
                name = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
                tensors[f"{name}{A_SUFFIX}"] = (torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)).to(dtype)
                tensors[f"{name}{B_SUFFIX}"] = (torch.randn(d_out, rank, generator=gen) * 0.01).to(dtype)
        path.mkdir(exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes),
            "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "task_type": "CAUSAL_LM",
            "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}))
    return paths


def load_lora(path) -> dict:
    """{module: (B, A, scale)} of a PEFT LoRA adapter directory, read directly (no knots_ext)."""
    from safetensors.torch import load_file
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("fan_in_fan_out"):
        raise ValueError(f"{path}: the benchmark's loader handles plain adapters only")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    mods = sorted(k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX))
    return {m: (tensors[m + B_SUFFIX], tensors[m + A_SUFFIX], scale) for m in mods}
