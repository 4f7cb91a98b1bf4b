"""knots-adapt: merge coefficients for a pool of LoRA adapters learned on a few target examples
(knots_ext.adaptive), from the command line.

    knots-adapt ADAPTER... -o OUT --task TASK.py [--per-module] [--optimizer adam|search]
                [--steps 100] [--lr 0.05] [--budget 40] [--top M] [--random-pool SEED]
                [--overwrite] [--quiet]

TASK.py is a Python file of the user's (code, like a config file of a training run) that defines
`model()`, the torch model the adapters were trained on (its Linear modules named as theirs,
without PEFT's "base_model.model."), and `loss(model)`, the target examples' loss as a scalar
tensor: the callables of the Python API. --top M keeps the M adapters whose loss alone is lowest
(retrieve); --random-pool SEED replaces every adapter's factors by random ones of the same shapes
and norms (the control); --optimizer adam (default: lr, steps) or search (LoraHub's gradient-free
search: budget; needs pip install 'knots-ext[adapt]'). OUT is a PEFT adapter of the merged update,
the coefficients in its knots_merge.json. Exit code 0; 2 on bad input or a refused OUT (one error
line on stderr, nothing written; OUT is checked before the work starts)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from . import io
from .adaptive import Pool, check_settings, learn_coefficients, retrieve, search_coefficients
from .cli import _error_line, _Parser


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="knots-adapt", description=__doc__.split("\n\n")[0])
    ap.add_argument("adapters", nargs="+", help="the pool: adapter folders or files")
    ap.add_argument("-o", "--output", required=True, help="the merged adapter's folder")
    ap.add_argument("--task", required=True, help="a Python file defining model() and loss(model)")
    ap.add_argument("--per-module", action="store_true", help="a coefficient per (adapter, module)")
    ap.add_argument("--optimizer", choices=["adam", "search"], default="adam")
    ap.add_argument("--steps", type=int, default=100, help="Adam steps (default 100)")
    ap.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate (default 0.05)")
    ap.add_argument("--budget", type=int, default=40, help="evaluations of the gradient-free search (default 40)")
    ap.add_argument("--top", type=int, default=None, help="keep the M adapters whose own loss is lowest")
    ap.add_argument("--random-pool", type=int, default=None, metavar="SEED", help="the random-pool control")
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha for bare .safetensors inputs")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier output")
    ap.add_argument("--quiet", action="store_true", help="no summary")
    return ap


def load_task(path: str):
    """The task file's model and loss callables; one ValueError line naming the file otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such task file")
    spec = importlib.util.spec_from_file_location("knots_adapt_task", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # (the user's code: any error, one line naming the file)
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from None
    missing = [name for name in ("model", "loss") if not callable(getattr(module, name, None))]
    if missing:
        raise ValueError(f"{path}: defines no {' and no '.join(missing)}() (it needs model() and loss(model))")
    return module.model, module.loss


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"knots-adapt: error: {message}", file=sys.stderr)
        return 2

    try:
        # (before any work: the API checks them again where it uses them)
        check_settings(steps=args.steps, lr=args.lr, budget=args.budget, top=args.top)
        io.check_output(args.output, inputs=args.adapters, overwrite=args.overwrite)
        make_model, loss = load_task(args.task)
        pool = Pool.load(args.adapters, alpha=args.alpha)
        if args.random_pool is not None:
            pool = pool.random_like(args.random_pool)
        model = make_model()
        if args.top is not None:
            order, losses = retrieve(pool, model, loss, top=args.top)
            pool = pool.subset(order)
            if not args.quiet:
                for i, value in zip(order, losses):
                    print(f"retrieved {args.adapters[i]}: loss {value:.4g}")
        if args.optimizer == "adam":
            coefs, history = learn_coefficients(
                pool, model, loss, per_module=args.per_module, steps=args.steps, lr=args.lr
            )
        else:
            coefs, history = search_coefficients(pool, model, loss, per_module=args.per_module, budget=args.budget)
        pool.save(args.output, coefs, overwrite=args.overwrite)
    except (io.AdapterError, ValueError, KeyError, OSError) as e:
        return fail(_error_line(e))
    if not args.quiet:
        print(f"{args.optimizer}: loss {history[0]:.4g} -> {min(history):.4g}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
