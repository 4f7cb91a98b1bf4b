"""knots-merge: merge LoRA adapters from the command line.

    knots-merge ADAPTER... -o OUT --method knots-ties [--top-k 0.2] [--lam 1.0] [--dare-p P]
                [--seed S] [--rank R] [--device cpu|cuda] [--overwrite] [--quiet]
    knots-merge --config recipe.yaml [-o OUT] [any flag above, overriding the recipe's value]

Exit code 0 on success; 2 on bad input or a refused OUT (one error line on stderr, nothing
written; OUT is checked before the merge starts); 130 on Ctrl-C and 143 on SIGTERM (one line,
no temporary files left)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from .io.formats import FORMATS
from .methods import ALL_PARAMS, METHODS
from .recipe import DTYPES


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad flags get one line too (argparse would print the usage first); exit code 2."""
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="knots-merge",
        description="Merge LoRA adapters (PEFT format) into one. Every output holds its recipe "
        "(recipe.yaml, README.md, safetensors metadata): knots-merge --config OUT/recipe.yaml -o NEW redoes it.",
    )
    ap.add_argument(
        "adapters",
        nargs="*",
        help="PEFT adapter directories, .safetensors files, or Hub names org/name[@revision] found in the "
        "local Hugging Face cache (a local path that exists wins; nothing is downloaded)",
    )
    ap.add_argument(
        "--config",
        metavar="RECIPE",
        default=None,
        help="a merge recipe (.yaml/.yml or .json: adapters, method, params, weights, module_weights, output, "
        "rank, dtype, ...; see README); flags given on the command line override the recipe's values",
    )
    ap.add_argument(
        "-o",
        "--output",
        default=None,
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
    ap.add_argument(
        "--rank-energy",
        type=float,
        default=None,
        metavar="E",
        help="truncate each module to the fewest singular directions holding fraction E (0 < E <= 1) of its "
        "squared Frobenius norm (with --rank: at most R of them); prints the relative error this costs",
    )
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the saved factors")
    ap.add_argument(
        "--format",
        choices=list(FORMATS),
        default=None,
        help="file format of the output: PEFT adapter, kohya / sd-scripts or diffusers LoRA (default: the inputs')",
    )
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha for bare .safetensors inputs")
    ap.add_argument(
        "--extra",
        choices=["drop", "average"],
        default="drop",
        help="non-LoRA tensors (modules_to_save): leave out (default) or average",
    )
    ap.add_argument("--force", action="store_true", help="merge adapters of different base models")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the per-module work on a Ray cluster at ADDRESS (host:port; none: a local Ray started "
        "for the merge); the same result; needs pip install 'knots-ext[ray]' and adapter paths every worker reads",
    )
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


def _given_on_command_line(parser: argparse.ArgumentParser, argv, dests: set) -> set:
    """The options argv sets (a recipe's values fill the others): parsed again into a namespace
    whose every attribute is a marker, which argparse's defaults leave alone."""
    unset = object()
    marked = argparse.Namespace(**{name: unset for name in dests})
    parser.parse_args(argv, marked)
    return {name for name, value in vars(marked).items() if value is not unset and value != []}


def _apply_recipe(args, given: set, parser_dests: set) -> list:
    """Fills args from the --config recipe where the command line left them; returns the warning
    lines (adapter files whose hashes differ from the recipe's). A recipe's params for another
    method than a --method given here are dropped (they belong to the recipe's method)."""
    from . import recipe
    from .methods import get_method

    loaded = recipe.load(args.config)
    values = dict(loaded.values)
    params = values.pop("params", {})
    if "method" in given:
        params = {k: v for k, v in params.items() if k in get_method(args.method).param_names}
    for name, value in params.items():
        if not hasattr(args, name):  # (method flags are absent unless given)
            setattr(args, name, value)
    for key, value in values.items():
        if key not in parser_dests:
            if value is not None:
                raise ValueError(f"{args.config}: {key}: this knots-merge has no such setting")
        elif key not in given:
            setattr(args, key, value)
    return loaded.hash_warnings() if "adapters" not in given else []


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    dests = set(vars(parser.parse_args([])))  # every option but the method's (absent unless given)
    given = _given_on_command_line(parser, argv, dests) if args.config is not None else set()
    try:
        with _sigterm_raises():
            return _run(args, given, dests)
    except KeyboardInterrupt:
        print("knots-merge: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("knots-merge: terminated", file=sys.stderr)
        return 143


def _run(args, given: set, parser_dests: set) -> int:
    from . import io
    from .engine import merge_to

    def fail(msg: str) -> int:
        print(f"knots-merge: error: {msg}", file=sys.stderr)
        return 2

    if args.config is not None:
        try:
            for line in _apply_recipe(args, given, parser_dests):
                print(f"knots-merge: warning: {line}", file=sys.stderr)
        except ValueError as e:
            return fail(_error_line(e))
    if not args.adapters:
        return fail("no adapters to merge: give them as arguments or in a --config recipe")
    if args.output is None:
        return fail("no output folder: give -o OUT, or output in a --config recipe")
    if args.rank is not None and args.rank < 1:
        return fail(f"--rank must be >= 1, got {args.rank}")
    if args.rank_energy is not None and not 0.0 < args.rank_energy <= 1.0:
        return fail(f"--rank-energy must be in (0, 1], got {args.rank_energy}")
    params = {name: getattr(args, name) for name in ALL_PARAMS if hasattr(args, name)}
    try:
        io.check_output(args.output, inputs=args.adapters, overwrite=args.overwrite)  # before a long merge
        summary = merge_to(
            args.output,
            args.adapters,
            method=args.method,
            rank=args.rank,
            rank_energy=args.rank_energy,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
            device=args.device,
            alpha=args.alpha,
            force=args.force,
            extra=args.extra,
            quiet=args.quiet,
            weights=args.weights,
            module_weights=args.module_weights,
            format=args.format,
            executor="local" if args.ray is None else "ray",
            ray_address=args.ray or None,
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
        if summary.truncation is not None:
            t = summary.truncation
            print(
                f"truncation ({_truncation_flags(args)}) costs a relative error ||dW - BA||_F / ||dW||_F of "
                f"{t.relative:.3g} over all modules; worst module {t.worst_module}: {t.worst:.3g}",
                file=sys.stderr,
            )
    return 0


def _truncation_flags(args) -> str:
    flags = [] if args.rank is None else [f"--rank {args.rank}"]
    return " ".join(flags + ([] if args.rank_energy is None else [f"--rank-energy {args.rank_energy:g}"]))


if __name__ == "__main__":
    raise SystemExit(main())
