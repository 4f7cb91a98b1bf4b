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

from .methods import ALL_PARAMS, METHODS


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad flags get one line too (argparse would print the usage first); exit code 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="knots-merge", description="Merge LoRA adapters (PEFT format) into one.")
    ap.add_argument("adapters", nargs="+", help="PEFT adapter directories or .safetensors files")
    ap.add_argument(
        "-o",
        "--output",
        required=True,
        help="output adapter directory: new, empty, or an earlier knots-merge output with --overwrite",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier knots-merge output in OUT (other files there stay)",
    )
    ap.add_argument("--method", default="knots-ties", choices=list(METHODS))
    method_flags = ap.add_argument_group("method parameters (each method takes some; see README)")
    for p in ALL_PARAMS.values():
        _add_param_flag(method_flags, p)
    ap.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="one weight per adapter: adapter i's update is scaled by W_i before merging (as if its "
        "lora_alpha were multiplied by it; negative: task negation)",
    )
    ap.add_argument(
        "--module-weights",
        nargs="+",
        default=None,
        metavar="REGEX=W",
        help="per-module weights on top of --weights: a module takes W of the first REGEX found in its "
        "name (e.g. 'layers\\.[0-9]\\.=0.5' 'mlp=0'), 1 when none matches",
    )
    ap.add_argument("--rank", type=int, default=None, help="truncate the saved adapter to this rank")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha for bare .safetensors inputs")
    ap.add_argument(
        "--extra",
        choices=["drop", "average"],
        default="drop",
        help="non-LoRA tensors (modules_to_save): leave out (default) or average",
    )
    ap.add_argument("--force", action="store_true", help="merge adapters of different base models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def _add_param_flag(group, p) -> None:
    """A flag from a method parameter's declaration. Not given, it is not passed, so that the
    method's own default applies and a flag the method does not take is refused by merge."""
    default = "" if p.default is None else f" (default {p.default})"
    kw: dict = {"dest": p.name, "default": argparse.SUPPRESS, "help": p.help + default}
    if p.kind == "choice":
        kw["choices"] = list(p.choices)
    elif p.kind == "paths":
        kw["nargs"] = "+"
    else:
        kw["type"] = int if p.kind == "int" else float
    group.add_argument(p.flag, **{**kw, **p.extra})


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
    from .engine import merge_to

    def fail(msg: str) -> int:
        print(f"knots-merge: error: {msg}", file=sys.stderr)
        return 2

    if args.rank is not None and args.rank < 1:
        return fail(f"--rank must be >= 1, got {args.rank}")
    params = {name: getattr(args, name) for name in ALL_PARAMS if hasattr(args, name)}
    try:
        io.check_output(args.output, inputs=args.adapters, overwrite=args.overwrite)  # before a long merge
        summary = merge_to(
            args.output,
            args.adapters,
            method=args.method,
            rank=args.rank,
            overwrite=args.overwrite,
            device=args.device,
            alpha=args.alpha,
            force=args.force,
            extra=args.extra,
            quiet=args.quiet,
            weights=args.weights,
            module_weights=args.module_weights,
            **params,
        )
    except (io.AdapterError, ValueError, KeyError, OSError) as e:
        return fail(_error_line(e))
    if not args.quiet:
        dropped = summary.dropped_extra
        if dropped:
            print(
                f"left out {len(dropped)} non-LoRA tensors (use --extra average to merge them): "
                + ", ".join(dropped[:5])
                + (" ..." if len(dropped) > 5 else ""),
                file=sys.stderr,
            )
        print(
            f"merged {len(args.adapters)} adapters, {len(summary.modules)} modules, with {args.method} "
            f"into {args.output}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
