"""A small demonstration of the fused kernels on synthetic task vectors: TIES, DARE-TIES and
Task Arithmetic through knots_ext.ops, checked against the same math in plain torch, with
timings. Run: python -m knots_ext.demo [--size P] [--tasks n]"""
from __future__ import annotations

import argparse
import time

import torch

from . import build_info, ops


def torch_ties(x: torch.Tensor, top_k: float, lam: float) -> torch.Tensor:
    """TIES in plain torch ops (float64), as DESIGN.md defines it."""
    x = x.double()
    n, p = x.shape
    k = p - int(p * top_k)
    kth = x.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = x * (x.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (trimmed != 0) & (torch.sign(trimmed) == sign)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2_000_000, help="elements per task vector")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--top-k", type=float, default=0.2)
    args = ap.parse_args(argv)

    print("build:", build_info())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tasks, args.size, generator=gen)

    t0 = time.perf_counter()
    merged = ops.ties_merge(x, args.top_k, lam=1.0)
    t_ties = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = torch_ties(x, args.top_k, 1.0)
    t_torch = time.perf_counter() - t0
    err = (merged.double() - reference).abs().max().item()
    print(f"TIES       {args.tasks} x {args.size}: {t_ties * 1e3:8.1f} ms  "
          f"(plain torch float64: {t_torch * 1e3:.1f} ms)  max |diff| = {err:.2e}")

    t0 = time.perf_counter()
    dare_ties = ops.ties_merge(x, args.top_k, dare_p=0.5, seed=1)
    print(f"DARE-TIES  p=0.5: {(time.perf_counter() - t0) * 1e3:8.1f} ms  "
          f"nonzero fraction {(dare_ties != 0).double().mean().item():.3f}")

    t0 = time.perf_counter()
    ta = ops.task_arithmetic(x, lam=0.3)
    err_ta = (ta.double() - 0.3 * x.double().sum(0)).abs().max().item()
    print(f"TA         lam=0.3: {(time.perf_counter() - t0) * 1e3:8.1f} ms  max |diff| = {err_ta:.2e}")
    ok = err < 1e-5 and err_ta < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
