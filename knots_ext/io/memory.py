"""LoRA adapters held in memory (e.g. read from a live peft.PeftModel by knots_ext.peft): the
interface the engine reads from io.Adapter, with no file behind it. The merge entry points take
a MemoryAdapter wherever they take an adapter path or a loaded io.Adapter."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .._arrays import all_finite, finite_and_zero
from ._common import AdapterError


class MemoryAdapter:
    """One LoRA adapter whose factors are tensors in memory.

    `factors` maps module keys (as in a PEFT adapter file, e.g.
    "base_model.model.model.layers.0.self_attn.q_proj") to (lora_B: d_out x r, lora_A: r x d_in);
    `scales` gives each module's scale (a number for all, or one per module), so that the update
    of module m is `scale(m) * B @ A` as for io.Adapter. `path` is only a name for messages
    ("<peft:name>"): nothing is read from or written to it. The tensors are checked (2-D, chained
    shapes, floating point) here and for NaN / Inf when read; factors() returns copies, so a merge
    never changes the caller's tensors.
    """

    def __init__(
        self,
        path: str,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        scales: float | Mapping[str, float],
        *,
        base_model: str | None = None,
        fan_in_fan_out: bool = False,
        config: dict | None = None,
    ):
        self.path = path
        self.config = dict(config or {})
        self.base_model = base_model
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.extra_tensors: list = []  # non-LoRA tensors are not carried
        if not factors:
            raise AdapterError(path, "no LoRA modules")
        self._factors = {}
        self._scale = {}
        for m in sorted(factors):
            B, A = factors[m]
            self._factors[m] = (self._checked(m, "lora_B", B), self._checked(m, "lora_A", A))
            if B.shape[1] != A.shape[0]:
                raise AdapterError(
                    path,
                    f"module {m}: shapes do not chain: lora_B is {list(B.shape)} and lora_A is "
                    f"{list(A.shape)} (lora_B's columns must equal lora_A's rows, the rank)",
                )
            s = scales if not isinstance(scales, Mapping) else scales.get(m)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise AdapterError(path, f"module {m}: the scale must be a finite number, got {s!r}")
            self._scale[m] = float(s)
        self.modules = list(self._factors)

    def _checked(self, module: str, which: str, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise AdapterError(self.path, f"module {module}: {which} is a {type(t).__name__}, not a torch.Tensor")
        if t.dim() != 2:
            raise AdapterError(
                self.path,
                f"module {module}: {which} has shape {list(t.shape)}, expected a 2-D tensor "
                "(only LoRA on Linear layers is supported)",
            )
        if 0 in t.shape:
            raise AdapterError(self.path, f"module {module}: {which} is empty (shape {list(t.shape)})")
        if not t.is_floating_point():
            raise AdapterError(self.path, f"module {module}: {which} has dtype {t.dtype}, not a floating point type")
        return t.detach()

    def __repr__(self):
        ranks = sorted({B.shape[1] for B, _ in self._factors.values()})
        return f"MemoryAdapter({self.path!r}, modules={len(self.modules)}, ranks={ranks})"

    def _check_module(self, module) -> None:
        if module not in self._factors:
            raise KeyError(f"{self.path}: no LoRA module {module!r}")

    def __contains__(self, module) -> bool:
        return module in self._factors

    def __len__(self) -> int:
        return len(self.modules)

    def close(self) -> None:
        """Nothing to release (io.Adapter's interface)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def rank(self, module) -> int:
        self._check_module(module)
        return int(self._factors[module][1].shape[0])

    def scale(self, module) -> float:
        self._check_module(module)
        return self._scale[module]

    def shape(self, module) -> tuple[int, int]:
        """(d_out, d_in) of B @ A."""
        self._check_module(module)
        B, A = self._factors[module]
        return int(B.shape[0]), int(A.shape[1])

    def stored_dtype(self, module) -> torch.dtype:
        """The dtype lora_A is held in."""
        self._check_module(module)
        return self._factors[module][1].dtype

    def factors(self, module, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: d_out x r, A: r x d_in), unscaled, copies converted to `dtype` on the tensors'
        device. Raises AdapterError if either holds NaN or Inf (or overflows `dtype`)."""
        B, A, _ = self._copies(module, dtype)
        return B, A

    def merge_factors(self, module) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """factors(module) in float32, and whether B or A holds an entry equal to 0 (io.Adapter's)."""
        return self._copies(module, torch.float32)

    def _copies(self, module, dtype):
        self._check_module(module)
        out, zero = [], False
        for which, t in zip(("lora_B", "lora_A"), self._factors[module]):
            copy = t.to(dtype=dtype or t.dtype, copy=True)
            finite, has_zero = finite_and_zero(copy)
            if not finite:
                problem = "holds NaN or Inf values" if not all_finite(t) else f"overflows {dtype}"
                raise AdapterError(self.path, f"module {module}: {which} {problem}")
            out.append(copy)
            zero = zero or has_zero
        return out[0], out[1], zero

    def extra(self, key, dtype=None) -> torch.Tensor:
        raise KeyError(f"{self.path}: no extra tensor {key!r} (in-memory adapters carry LoRA factors only)")
