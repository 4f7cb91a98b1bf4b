"""knots-merge: merge LoRA adapters from the command line.

    knots-merge ADAPTER... -o OUT --method knots-ties [--top-k 0.2] [--lam 1.0] [--dare-p P]
                [--seed S] [--rank R] [--device cpu|cuda] [--overwrite] [--quiet]

Exit code 0 on success; 2 on bad input or a refused OUT (one error line on stderr, nothing
written; OUT is checked before the merge starts); 130 on Ctrl-C and 143 on SIGTERM (one line,
no temporary files left)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from .methods import METHODS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="knots-merge", description="Merge LoRA adapters (PEFT format) into one.")
    ap.add_argument("adapters", nargs="+", help="PEFT adapter directories or .safetensors files")
    ap.add_argument("-o", "--output", required=True,
                    help="output adapter directory: new, empty, or an earlier knots-merge output with --overwrite")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the files of an earlier knots-merge output in OUT (other files there stay)")
    ap.add_argument("--method", default="knots-ties", choices=list(METHODS))
    ap.add_argument("--top-k", type=float, default=None, help="TIES: fraction of each task's entries kept")
    ap.add_argument("--top-k-scope", choices=["task", "module"], default=None,
                    help="TIES threshold over all modules of a task (default) or per module")
    ap.add_argument("--lam", type=float, default=None, help="scale of the merged update")
    ap.add_argument("--dare-p", type=float, default=None, help="DARE drop probability (dare methods)")
    ap.add_argument("--seed", type=int, default=None, help="DARE mask seed")
    ap.add_argument("--rank", type=int, default=None, help="truncate the saved adapter to this rank")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha for bare .safetensors inputs")
    ap.add_argument("--tol", type=float, default=None, help="KnOTS: drop singular values <= tol")
    ap.add_argument("--extra", choices=["drop", "average"], default="drop",
                    help="non-LoRA tensors (modules_to_save): leave out (default) or average")
    ap.add_argument("--grams", nargs="+", default=None,
                    help="regmean: one Gram file (knots_ext.grams.save_grams) per adapter, in the same order")
    ap.add_argument("--regmean-alpha", type=float, default=None, help="regmean: scale of the Grams' off-diagonals")
    ap.add_argument("--common-fraction", type=float, default=None,
                    help="iso-cts: share of the rank kept for the common subspace (default: the paper's)")
    ap.add_argument("--force", action="store_true", help="merge adapters of different base models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


# Flags that are method parameters: passed to merge() only when given, so that the method's own
# defaults apply and a flag the method does not take is refused by merge().
METHOD_PARAMS = ("top_k", "top_k_scope", "lam", "dare_p", "seed", "tol", "grams", "regmean_alpha", "common_fraction")


class _Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the writer cleans up."""


def _raise_terminated(signum, frame):
    raise _Terminated


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).strip("'\"").split())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_raises():
            return _run(args)
    except KeyboardInterrupt:
        print("knots-merge: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("knots-merge: terminated", file=sys.stderr)
        return 143


def _run(args) -> int:
    from . import io
    from .engine import merge

    def fail(msg: str) -> int:
        print(f"knots-merge: error: {msg}", file=sys.stderr)
        return 2

    if args.rank is not None and args.rank < 1:
        return fail(f"--rank must be >= 1, got {args.rank}")
    try:
        io.check_output(args.output, inputs=args.adapters, overwrite=args.overwrite)  # before a long merge
        params = {name: getattr(args, name) for name in METHOD_PARAMS if getattr(args, name) is not None}
        result = merge(args.adapters, method=args.method, device=args.device, alpha=args.alpha, force=args.force,
                       extra=args.extra, quiet=args.quiet, **params)
        # MergeResult.save does not take overwrite / inputs / manifest yet: the writer is called directly.
        io.save_adapter(args.output, result.factors(args.rank), base_model=result.base_model,
                        fan_in_fan_out=result.fan_in_fan_out, extra=result.extra or None,
                        task_type=result.task_type, overwrite=args.overwrite, inputs=args.adapters,
                        manifest={"method": args.method, "params": params, "rank": args.rank,
                                  "adapters": args.adapters})  # as given: plain JSON values
    except (io.AdapterError, ValueError, KeyError, OSError) as e:
        return fail(_error_line(e))
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
