"""knots_ext.peft.add_weighted_adapter vs PEFT's own PeftModel.add_weighted_adapter, side by side on
the same live model: a stand-in with `--layers` square Linear layers of width `--width` (4096: the
hidden size of Llama-class models), n LoRA adapters of rank r with random factors loaded into one
PeftModel, each combination_type timed for both in the same child process (the model built once,
the added adapter deleted between repeats), with the ratio PEFT / knots_ext of the fastest
repeat's wall time and of its process CPU time (all threads; steadier on a shared machine).

Besides time, each row says what the added adapter is: its rank, and the relative Frobenius error
of its B @ A on layer 0 against the float64 merge of the full updates w_i s_i B_i @ A_i (the sum
for linear / cat / svd; TIES with a per-module trim, PEFT's scope, for ties / ties_svd) with the
number of entries that differ by more than 1e-5 of the largest (those a trim or a sign election
decided the other way). PEFT's linear, ties and dare_* merge lora_A and lora_B separately and its
*_svd truncate to rank r, so their errors are large; knots_ext's come from float32 rounding (ties
here with top_k_scope="module" to match PEFT's per-module trim). dare_* draw random masks: no
reference. knots_ties has no PEFT counterpart (its row has no ratio).

    python benchmarks/bench_peft_dropin.py                  # 2 layers of 4096 x 4096, n = 4 and 8, r = 16
    python benchmarks/bench_peft_dropin.py --quick          # 1 layer of 512, n = 2 and 4: a smoke run
    python benchmarks/bench_peft_dropin.py --combinations svd,ties_svd --layers 1 --ns 4 \
        --out benchmarks/results/results_peft_dropin_svd.json   # the SVD-truncating ones (slow)

Results: benchmarks/results/results_peft_dropin[_quick].json (or --out)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, child_setup, environment, fmt_table, in_child, log, say, timed, warn_if_busy  # noqa: E402

COMBINATIONS = ["linear", "cat", "ties", "dare_ties", "dare_linear", "svd", "ties_svd", "knots_ties"]
# svd / ties_svd take a full SVD of every dense 4096 x 4096 update in both libraries (minutes each on
# 2 cores): asked for with --combinations, e.g. --combinations svd,ties_svd --layers 1 --ns 4
DEFAULT = [c for c in COMBINATIONS if not c.endswith("svd")]
PEFT_HAS = {"linear", "cat", "ties", "dare_ties", "dare_linear", "svd", "ties_svd"}


def build_model(layers: int, width: int, n: int, r: int, seed: int = 0):
    """A PeftModel over `layers` width x width Linear layers with n LoRA adapters t0..t{n-1}
    (rank r, lora_alpha 2r, random non-zero factors)."""
    import peft
    import torch

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layers." + str(i) for i in range(layers)])
    model = peft.get_peft_model(Stack(), config, adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model.eval()


def ref_ties(x, top_k: float):
    """TIES (DESIGN.md §1) on the (n, P) float64 updates of one module: per-task trim keeping the
    entries >= the (P - floor(P top_k))-th smallest magnitude, elected sign of the sum (the
    majority sign where it is 0), disjoint mean."""
    import torch

    n, P = x.shape
    k = P - math.floor(P * top_k)
    trimmed = x.clone()
    for i in range(n):
        if k > 0:
            t = torch.kthvalue(x[i].abs(), k).values
            trimmed[i][x[i].abs() < t] = 0
    total = trimmed.sum(0)
    sign = torch.sign(total)
    majority = torch.sign(sign.sum())
    sign[total == 0] = majority
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def job(layers, width, n, r, density, combinations, repeats, budget):
    """Times both implementations of every combination on one model (in a fresh process)."""
    child_setup()
    import peft
    import torch

    from knots_ext.peft import add_weighted_adapter

    torch.set_grad_enabled(False)
    model = build_model(layers, width, n, r)
    names = [f"t{i}" for i in range(n)]
    weights = [1.0] * n
    check = "base_model.model.layers.0"
    layer = model.get_submodule(check)
    updates = torch.stack([layer.scaling[a] * (layer.lora_B[a].weight.double() @ layer.lora_A[a].weight.double())
                           for a in names])
    refs = {"sum": updates.sum(0)}
    refs["ties"] = ref_ties(updates.reshape(n, -1), density).reshape(width, width)
    del updates
    rows = []
    for comb in combinations:
        for impl in ("peft", "knots_ext"):
            if impl == "peft" and comb not in PEFT_HAS:
                continue
            new = f"m_{impl}_{comb}"
            if impl == "peft":
                density_arg = density if comb not in ("linear", "cat", "svd") else None

                def call(comb=comb, new=new, density_arg=density_arg):
                    model.add_weighted_adapter(names, weights, new, combination_type=comb, density=density_arg)
                    return new
            else:
                scope = {"top_k_scope": "module"} if comb in ("ties", "ties_svd", "dare_ties") else {}

                def call(comb=comb, new=new, scope=scope):
                    add_weighted_adapter(model, names, weights, new, combination_type=comb, density=density, **scope)
                    return new

            cpu: list = []  # CPU seconds of the process (all its threads): steadier than wall time on a busy machine

            def measured(call=call, cpu=cpu):
                c0 = time.process_time()
                out = call()
                cpu.append(time.process_time() - c0)
                return out

            log(f"n={n} {impl} {comb} ...")
            times, _ = timed(measured, repeats, budget, between=model.delete_adapter)
            target = model.get_submodule(check)
            got = target.scaling[new] * (target.lora_B[new].weight.double() @ target.lora_A[new].weight.double())
            ref = {"linear": "sum", "cat": "sum", "svd": "sum", "ties": "ties", "ties_svd": "ties"}.get(comb)
            ref = refs[ref] if ref else None
            err = None if ref is None else float((got - ref).norm() / ref.norm())
            # entries off by more than float32 rounding: a trim or sign decided the other way
            off = None if ref is None else int(((got - ref).abs() > 1e-5 * ref.abs().max()).sum())
            rows.append(dict(n=n, combination=comb, impl=impl, seconds=min(times), times=times,
                             cpu_seconds=min(cpu), cpu_times=cpu, rank=int(target.r[new]), rel_error=err,
                             entries_off=off))
            model.delete_adapter(new)
    return dict(rows=rows, peft=peft.__version__, threads=torch.get_num_threads())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--ns", default="4,8", help="comma list of adapter counts")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--combinations", default=",".join(DEFAULT), help=f"comma list from {COMBINATIONS}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per measurement before repeats stop")
    ap.add_argument("--quick", action="store_true", help="1 layer of 512, n = 2 and 4, one repeat")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/results_peft_dropin*.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.ns, args.repeats = 1, 512, "2,4", 1
    ns = [int(v) for v in args.ns.split(",")]
    combinations = [c.strip() for c in args.combinations.split(",") if c.strip()]
    unknown = sorted(set(combinations) - set(COMBINATIONS))
    if unknown:
        ap.error(f"unknown combinations {unknown}; choose from {COMBINATIONS}")
    env = environment()
    warn_if_busy(env)
    say(f"{args.layers} layers of {args.width} x {args.width}, r = {args.r}, density = {args.density}, n = {ns}")
    t0 = time.perf_counter()
    rows, info = [], {}
    for n in ns:
        out = in_child(job, args.layers, args.width, n, args.r, args.density, combinations, args.repeats, args.budget)
        rows += out["rows"]
        info = {k: v for k, v in out.items() if k != "rows"}
    peft_rows = {(r["n"], r["combination"]): r for r in rows if r["impl"] == "peft"}
    table = []
    for row in rows:
        theirs = peft_rows.get((row["n"], row["combination"])) if row["impl"] == "knots_ext" else None
        if theirs is not None:
            row["peft_over_knots_ext"] = theirs["seconds"] / row["seconds"]
            row["peft_over_knots_ext_cpu"] = theirs["cpu_seconds"] / row["cpu_seconds"]
        err = "n/a" if row["rel_error"] is None else f"{row['rel_error']:.2e}"
        ratio = f"{row['peft_over_knots_ext']:.2f}x / {row['peft_over_knots_ext_cpu']:.2f}x" if theirs else ""
        off = "n/a" if row["entries_off"] is None else f"{row['entries_off']} / {args.width ** 2}"
        table.append([row["n"], row["combination"], row["impl"], f"{row['seconds']:.3f}", f"{row['cpu_seconds']:.3f}",
                      ratio, row["rank"], err, off])
    say(fmt_table(["n", "combination", "impl", "wall s", "CPU s", "peft / knots_ext (wall / CPU)", "rank",
                   "rel. error (layer 0)", "entries off"], table))
    result = dict(config=dict(layers=args.layers, width=args.width, ns=ns, r=args.r, density=args.density,
                              repeats=args.repeats, quick=args.quick, combinations=combinations),
                  environment={**env, **info}, rows=rows, seconds_total=time.perf_counter() - t0)
    path = Path(args.out) if args.out else RESULTS / f"results_peft_dropin{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
