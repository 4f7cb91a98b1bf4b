"""knots-merge: merge LoRA adapters from the command line.

    knots-merge ADAPTER... -o OUT --method knots-ties [--top-k 0.2] [--lam 1.0] [--dare-p P]
                [--seed S] [--rank R] [--device cpu|cuda] [--quiet]

Exit code 0 on success, 2 on bad input (one error line on stderr, nothing written)."""
from __future__ import annotations

import argparse
import sys

from .methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="knots-merge", description="Merge LoRA adapters (PEFT format) into one.")
    ap.add_argument("adapters", nargs="+", help="PEFT adapter directories or .safetensors files")
    ap.add_argument("-o", "--output", required=True, help="output adapter directory")
    ap.add_argument("--method", default="knots-ties", choices=list(METHODS))
    ap.add_argument("--top-k", type=float, default=1.0, help="TIES: fraction of each task's entries kept")
    ap.add_argument("--top-k-scope", choices=["task", "module"], default="task",
                    help="TIES threshold over all modules of a task (default) or per module")
    ap.add_argument("--lam", type=float, default=1.0, help="scale of the merged update")
    ap.add_argument("--dare-p", type=float, default=0.0, help="DARE drop probability (dare methods)")
    ap.add_argument("--seed", type=int, default=0, help="DARE mask seed")
    ap.add_argument("--rank", type=int, default=None, help="truncate the saved adapter to this rank")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha for bare .safetensors inputs")
    ap.add_argument("--tol", type=float, default=1e-5, help="KnOTS: drop singular values <= tol")
    ap.add_argument("--extra", choices=["drop", "average"], default="drop",
                    help="non-LoRA tensors (modules_to_save): leave out (default) or average")
    ap.add_argument("--grams", nargs="+", default=None,
                    help="regmean: one Gram file (knots_ext.grams.save_grams) per adapter, in the same order")
    ap.add_argument("--regmean-alpha", type=float, default=0.9, help="regmean: scale of the Grams' off-diagonals")
    ap.add_argument("--common-fraction", type=float, default=None,
                    help="iso-cts: share of the rank kept for the common subspace (default: the paper's)")
    ap.add_argument("--force", action="store_true", help="merge adapters of different base models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import io
    from .engine import merge

    def fail(msg: str) -> int:
        print(f"knots-merge: error: {msg}", file=sys.stderr)
        return 2

    if args.rank is not None and args.rank < 1:
        return fail(f"--rank must be >= 1, got {args.rank}")
    try:
        result = merge(args.adapters, method=args.method, top_k=args.top_k, lam=args.lam, dare_p=args.dare_p,
                       seed=args.seed, device=args.device, top_k_scope=args.top_k_scope, tol=args.tol,
                       alpha=args.alpha, force=args.force, extra=args.extra, quiet=args.quiet,
                       grams=args.grams, regmean_alpha=args.regmean_alpha, common_fraction=args.common_fraction)
        result.save(args.output, rank=args.rank)
    except (io.AdapterError, ValueError, FileNotFoundError, KeyError) as e:
        return fail(str(e).strip("'\""))
    if not args.quiet:
        if result.dropped_extra:
            print(f"left out {len(result.dropped_extra)} non-LoRA tensors (use --extra average to merge them): "
                  + ", ".join(result.dropped_extra[:5]) + (" ..." if len(result.dropped_extra) > 5 else ""),
                  file=sys.stderr)
        print(f"merged {len(args.adapters)} adapters, {len(result.modules)} modules, with {args.method} "
              f"into {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
