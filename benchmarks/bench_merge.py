"""End-to-end merge benchmark: knots_ext against the dense KnOTS algorithm and PEFT, on the same
synthetic LoRA adapters (Llama-3-8B attention shapes, benchmarks/synthetic.py), in one run.

    python benchmarks/bench_merge.py            # n=8, r=16, 2 layers: ~15 min on 2 cores (PEFT and
                                                # the dense baseline run dense SVDs; the dense one
                                                # of a 4096 x 32768 q_proj alone takes ~6 min)
    python benchmarks/bench_merge.py --layers 1 --peft-modules q_proj,k_proj   # ~8 min
    python benchmarks/bench_merge.py --quick    # tiny shapes, < 1 minute: checks that it all works

Timed, each method in a fresh child process (so that its peak memory is its own):

  dense KnOTS        the KnOTS algorithm as the reference code runs it, written here: per module,
                     every s_i B_i A_i in float64, concatenated along the input dimension, dense
                     torch.linalg.svd of d_out x (n*d_in), S > 1e-5 kept, TIES on diag(S) V_i^T
                     with the trim threshold global per task (torch.kthvalue on each task's
                     concatenated representations; exact-zero sums take the majority sign),
                     mapped back with U. Too slow to run on every module: it runs on a reduced
                     set (layer 0, --dense-modules), is checked there against knots_ext
                     knots-ties on the same reduced adapters, and its time for the full
                     configuration is EXTRAPOLATED from the measured per-module times.
  peft ties_svd/svd  PeftModel.add_weighted_adapter(combination_type=..., density=top_k, weights
                     1.0) over a stand-in LlamaForCausalLM with the Llama-3-8B attention shapes
                     (tiny MLP and vocabulary); only the add_weighted_adapter call is timed.
  knots_ext          knots_ext.merge(paths, method=...) for knots-ties, ties and ta (reading the
                     adapter files included), and "ta -> rank r" (ta, then the best rank-r factors:
                     the same work as PEFT's "svd").

Checks (printed, and asserted): dense KnOTS == knots_ext knots-ties on the reduced set; PEFT svd ==
knots_ext ta truncated to rank r; PEFT ties_svd == knots_ext's per-module TIES kernel on the dense
updates truncated to rank r (that is what ties_svd computes; it is not KnOTS) on --check-module.

What PEFT's add_weighted_adapter (peft 0.21) computes, per LoRA layer: every dW_i = s_i B_i A_i
dense in float32 (n of them at once); "svd": sum_i w_i dW_i; "ties_svd": TIES on the dense dW_i with
the trim per module (torch.topk keeps exactly int(density * numel), no threshold entry, no global
per-task threshold) and an exactly-zero sum electing +1 (not the majority sign); then
torch.linalg.svd(full_matrices=True by default) of the d_out x d_in result, truncated to svd_rank
(default max r_i = 16): a lossy rank-16 output, where knots_ext writes the exact rank-k update. So
ties_svd is neither KnOTS nor the same TIES; only "svd" is equal work with a knots_ext method.
Its memory grows with n * d_out * d_in (the stacked dense updates, masks and topk indices).

Scaling: knots-ties time as n grows (r fixed) and as r grows (n fixed), 1 layer.

Times are best of --repeats for methods that take less than --repeat-budget seconds, else one run;
ratios are against knots_ext knots-ties measured in the same run. Results: printed, and written to
benchmarks/results/results_merge.json (results_merge_quick.json with --quick)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from harness import (RESULTS, child_setup, environment, fmt_table, in_child, log, peak_rss_mb, rel_err,  # noqa: E402
                     say, timed, warn_if_busy)
from synthetic import A_SUFFIX, B_SUFFIX, LLAMA3_8B, load_lora, write_adapters  # noqa: E402

# Shapes and the stand-in Llama config PEFT's base model is built from: (d_out, d_in) per module.
PROFILES = {
    "full": dict(shapes=LLAMA3_8B, hidden=4096, heads=32, kv_heads=8),
    "quick": dict(shapes={"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 64)},
                  hidden=64, heads=4, kv_heads=1),
}

# Tolerances. Exact comparisons assert max_rel (elementwise); the rank-r truncations assert fro_rel:
# PEFT truncates with a float32 SVD, whose rank-r subspace moves by ~eps32 / (relative gap s_r - s_r+1),
# and the gap of a full-rank TIES matrix can be small (printed with the check).
TOL_KNOTS = 1e-4  # dense KnOTS (float64) vs knots_ext knots-ties (float32 representations / TIES), max_rel
TOL_PEFT_SVD = 1e-3  # PEFT svd vs knots_ext ta -> rank r, fro_rel
TOL_PEFT_TIES_SVD = 1e-3  # PEFT ties_svd vs TIES with PEFT's rules -> rank r, fro_rel


# ----------------------------------------------------------------------------------------------
# small helpers

def module_shape(name: str, shapes: dict) -> tuple:
    return tuple(shapes[name.rsplit(".", 1)[1]])


# ----------------------------------------------------------------------------------------------
# the dense KnOTS baseline

def dense_knots_ties(paths, top_k: float, lam: float = 1.0, tol: float = 1e-5):
    """KnOTS-TIES as the reference code does it, dense and in float64. Returns
    ({module: dW (float64)}, timings)."""
    t_start = time.perf_counter()
    adapters = [load_lora(p) for p in paths]
    names = sorted(adapters[0])
    n = len(adapters)
    t_module, U_of, reps = {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        dWs = [s * (B.double() @ A.double()) for B, A, s in (a[name] for a in adapters)]
        d_in = dWs[0].shape[1]
        cat = torch.cat(dWs, dim=1)  # d_out x n*d_in
        del dWs
        U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
        del cat
        keep = S > tol
        U, S, Vh = U[:, keep], S[keep], Vh[keep]
        reps[name] = [S[:, None] * Vh[:, i * d_in:(i + 1) * d_in] for i in range(n)]  # diag(S) V_i^T
        U_of[name] = U
        del Vh
        t_module[name] = time.perf_counter() - t0

    # TIES, threshold global per task: each task's representations of all modules are one vector
    t0 = time.perf_counter()
    flat = torch.stack([torch.cat([reps[m][i].reshape(-1) for m in names]) for i in range(n)])  # n x P
    P = flat.shape[1]
    kth = P - int(P * top_k)
    if kth >= 1:
        thr = flat.abs().kthvalue(kth, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= thr)
    else:
        trimmed = flat
    del flat
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())  # exact-zero sums take the majority sign
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    merged = lam * selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    del trimmed, agree, selected
    t_ties = time.perf_counter() - t0

    out, offset = {}, 0
    for name in names:
        t0 = time.perf_counter()
        k, d_in = reps[name][0].shape
        out[name] = U_of[name] @ merged[offset:offset + k * d_in].reshape(k, d_in)
        offset += k * d_in
        t_module[name] += time.perf_counter() - t0
    rep_elems = {name: reps[name][0].numel() for name in names}
    return out, dict(total=time.perf_counter() - t_start, per_module=t_module, ties=t_ties, rep_elems=rep_elems)


def peft_ties_reference(x: torch.Tensor, top_k: float) -> torch.Tensor:
    """What PEFT's merge_utils.ties computes on the (n, P) float32 dense updates of one module (weights
    1), with knots_ext's kernels. It differs from the KnOTS / TIES reference rule (DESIGN.md §1) in
    two ways: torch.topk keeps exactly int(top_k * P) entries, while the reference keeps every entry
    >= the (P - int(top_k * P))-th smallest magnitude, i.e. one more (the threshold entry itself);
    and an exactly-zero trimmed sum elects +1 (sum >= 0), not the majority sign. So: knots_ext's
    thresholds, moved one float up (keep > threshold), and majority +1."""
    from knots_ext import ops
    thr = ops.magnitude_threshold(x, top_k)
    above = [float(torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(math.inf))) for t in thr]
    out, _, zero_sum = ops.ties_apply(x, above)
    if len(zero_sum):
        ops.ties_fix_majority(x, out, above, zero_sum, 1)
    return out


# ----------------------------------------------------------------------------------------------
# child-process jobs: each returns its times, its peak RSS before and after, and the updates of
# the modules asked for (as float64 tensors)

def job_dense(paths, top_k, repeats, budget):
    child_setup()
    before = peak_rss_mb()
    runs = []

    def run():
        deltas, info = dense_knots_ties(paths, top_k)
        runs.append(info)
        return deltas

    times, deltas = timed(run, repeats, budget, between=lambda d: d.clear())
    best = min(runs, key=lambda r: r["total"])
    return dict(times=times, rss_before=before, rss_after=peak_rss_mb(), info=best, deltas=deltas)


def job_knots_ext(paths, method, top_k, repeats, budget, want, rank=None):
    child_setup()
    import knots_ext
    before = peak_rss_mb()

    def run():
        res = knots_ext.merge([str(p) for p in paths], method=method, **({} if method == "ta" else {"top_k": top_k}))
        return res, (res.factors(rank) if rank is not None else None)

    times, (res, fac) = timed(run, repeats, budget)
    deltas = {}
    for name in want:
        if fac is not None:
            B, A = fac[name]
            deltas[name] = B.double() @ A.double()
        else:
            deltas[name] = res.delta(name).double()
    return dict(times=times, rss_before=before, rss_after=peak_rss_mb(), n_modules=len(res.modules),
                deltas=deltas, threads=knots_ext.build_info().get("openmp_threads"))


def job_peft(paths, combination, top_k, profile, layers, repeats, budget, want):
    child_setup()
    import peft
    import transformers
    from peft import PeftModel
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=profile["hidden"], num_attention_heads=profile["heads"],
                                   num_key_value_heads=profile["kv_heads"], intermediate_size=8, vocab_size=16,
                                   num_hidden_layers=layers)
    base = transformers.LlamaForCausalLM(cfg).float()
    attn = base.model.layers[0].self_attn
    for mod, (d_out, d_in) in profile["shapes"].items():
        w = getattr(attn, mod).weight
        assert tuple(w.shape) == (d_out, d_in), f"stand-in {mod} is {tuple(w.shape)}, want {(d_out, d_in)}"
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="t0")
    for i, p in enumerate(paths[1:], 1):
        model.load_adapter(str(p), adapter_name=f"t{i}")
    names = [f"t{i}" for i in range(len(paths))]
    # per-module times inside add_weighted_adapter (for extrapolating from a subset of modules)
    lora_model = model.base_model
    inner = lora_model._svd_generalized_task_arithmetic_weighted_adapter
    module_seconds = []

    def timed_inner(combination_type, adapters, weights, new_rank, target, *a, **kw):
        t0 = time.perf_counter()
        out = inner(combination_type, adapters, weights, new_rank, target, *a, **kw)
        module_seconds.append(((target.out_features, target.in_features), time.perf_counter() - t0))
        return out

    lora_model._svd_generalized_task_arithmetic_weighted_adapter = timed_inner
    before = peak_rss_mb()
    runs = []  # (seconds, per-module times) of each call

    def run():
        module_seconds.clear()
        new = f"merged{len(runs)}"
        t0 = time.perf_counter()
        model.add_weighted_adapter(names, [1.0] * len(names), new, combination_type=combination,
                                   density=top_k if "ties" in combination else None)
        runs.append((time.perf_counter() - t0, list(module_seconds)))
        return new

    times, new = timed(run, repeats, budget, between=model.delete_adapter)
    deltas = {}
    with torch.no_grad():
        for name in want:
            layer = model.get_submodule(name)
            deltas[name] = layer.get_delta_weight(new).double()
    return dict(times=times, rss_before=before, rss_after=peak_rss_mb(), deltas=deltas, peft=peft.__version__,
                out_rank=model.peft_config[new].r, module_seconds=min(runs, key=lambda r: r[0])[1])


# ----------------------------------------------------------------------------------------------
# adapter sets

def subset_adapters(paths, root: Path, keep, target_modules=None) -> list:
    """Copies of the adapters with only the modules for which keep(module) is true (and, if given,
    target_modules in the config, so that PEFT injects LoRA layers there only)."""
    from safetensors.torch import load_file, save_file
    out = []
    for p in paths:
        tensors = load_file(str(Path(p) / "adapter_model.safetensors"))
        kept = {k: v for k, v in tensors.items()
                if keep(k[: -len(A_SUFFIX)] if k.endswith(A_SUFFIX) else k[: -len(B_SUFFIX)])}
        dst = root / Path(p).name
        dst.mkdir(parents=True, exist_ok=True)
        save_file(kept, str(dst / "adapter_model.safetensors"))
        cfg = json.loads((Path(p) / "adapter_config.json").read_text())
        if target_modules is not None:
            cfg["target_modules"] = sorted(target_modules)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
        out.append(dst)
    return out


def extrapolate(main_modules, shapes, per_shape: dict, cost):
    """Sum over main_modules of the measured time of a module of its shape; for a shape not
    measured, the largest measured shape's time scaled by cost(shape) / cost(measured shape)."""
    total, how = 0.0, {}
    for m in main_modules:
        s = module_shape(m, shapes)
        if s in per_shape:
            total += per_shape[s]
            how[str(s)] = "measured per-module time"
        else:
            ref = max(per_shape, key=cost)
            total += per_shape[ref] * cost(s) / cost(ref)
            how[str(s)] = f"cost-model scaling from {ref}"
    return total, how


def layer_of(module: str) -> int:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1])


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, runs in < 1 minute (checks it works)")
    ap.add_argument("--layers", type=int, default=2, help="layers of q,k,v,o in the main comparison (default 2)")
    ap.add_argument("--n", type=int, default=8, help="adapters (default 8)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    ap.add_argument("--top-k", type=float, default=0.2, help="TIES top_k / PEFT density (default 0.2)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs for fast methods (default 3)")
    ap.add_argument("--repeat-budget", type=float, default=30.0,
                    help="repeat a method only while its total time stays under this many seconds (default 30)")
    ap.add_argument("--dense-modules", default=None,
                    help="modules of layer 0 the dense KnOTS baseline runs on (default q_proj,k_proj: one of "
                         "each Llama shape; 'all' for every module of layer 0); the rest is extrapolated")
    ap.add_argument("--peft-modules", default="all",
                    help="'all' (default): PEFT merges every module of the main adapters; or a comma list "
                         "(e.g. k_proj,q_proj): those modules of layer 0 only, the rest extrapolated from the "
                         "per-module times measured inside the call")
    ap.add_argument("--check-module", default="layers.0.self_attn.k_proj",
                    help="module (suffix) whose PEFT updates are checked against knots_ext (default layer 0 k_proj)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: dense, peft, scaling")
    ap.add_argument("--scaling-n", default=None, help="n values of the scaling section (default 2,4,8,16,32,64)")
    ap.add_argument("--scaling-r", default=None, help="r values of the scaling section (default 4,8,16,32,64)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/results_merge.json, "
                                                "results_merge_quick.json with --quick)")
    ap.add_argument("--keep-adapters", action="store_true", help="keep the synthetic adapters (prints where)")
    args = ap.parse_args(argv)

    profile = PROFILES["quick" if args.quick else "full"]
    shapes = profile["shapes"]
    if args.quick:
        args.n, args.rank, args.layers = min(args.n, 4), min(args.rank, 4), min(args.layers, 2)
        args.dense_modules = args.dense_modules or "all"
        args.repeat_budget = min(args.repeat_budget, 2.0)
    scaling_n = [int(x) for x in (args.scaling_n or ("2,4,8" if args.quick else "2,4,8,16,32,64")).split(",")]
    scaling_r = [int(x) for x in (args.scaling_r or ("2,4,8" if args.quick else "4,8,16,32,64")).split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    peft_mods = None if args.peft_modules == "all" else [m.strip() for m in args.peft_modules.split(",")]
    args.dense_modules = args.dense_modules or "q_proj,k_proj"
    dense_mods = list(shapes) if args.dense_modules == "all" else [m.strip() for m in args.dense_modules.split(",")]
    for flag, mods in [("--dense-modules", dense_mods), ("--peft-modules", peft_mods or [])]:
        for m in mods:
            if m not in shapes:
                ap.error(f"{flag}: unknown module {m!r} (one of {', '.join(shapes)})")
    out_path = Path(args.out) if args.out else RESULTS / ("results_merge_quick.json" if args.quick
                                                          else "results_merge.json")

    env = environment()
    try:
        env["peft"] = importlib.metadata.version("peft")
        env["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        say("peft / transformers not installed: PEFT is skipped")
        skip.add("peft")
    say(f"bench_merge: n={args.n} r={args.rank} layers={args.layers} top_k={args.top_k} "
        f"({'quick, tiny shapes' if args.quick else 'Llama-3-8B q,k,v,o shapes'})")
    say(f"env: torch {env['torch']} ({env['torch_threads']} threads), {env['cpus']} cpus, "
        f"load average {env['loadavg_start'][0]:.1f}, knots_ext build {env['build']}")
    warn_if_busy(env)

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    results = dict(config=dict(n=args.n, rank=args.rank, layers=args.layers, top_k=args.top_k, quick=args.quick,
                               shapes={k: list(v) for k, v in shapes.items()}, repeats=args.repeats,
                               repeat_budget_s=args.repeat_budget), env=env)
    try:
        t0 = time.perf_counter()
        main_paths = write_adapters(tmp / "main", args.n, args.rank, args.layers, shapes=shapes)
        log(f"wrote {args.n} adapters ({args.layers} layers) in {time.perf_counter() - t0:.1f} s under {tmp}")
        main_modules = sorted(load_lora(main_paths[0]))
        n_main = len(main_modules)
        check = [m for m in main_modules if m.endswith(args.check_module)]
        if len(check) != 1:
            ap.error(f"--check-module {args.check_module!r} matches {len(check)} modules")
        check = check[0]

        main_rows = {}

        def add_row(key, label, secs, modules, rss_mb, note=""):
            main_rows[key] = dict(method=label, seconds=secs, modules=modules, seconds_per_module=secs / modules,
                                  peak_rss_increase_mb=rss_mb, note=note)

        # ---- knots_ext on the main adapters
        ext_methods = [("knots-ties", None), ("ties", None), ("ta", None), ("ta", args.rank)]
        ext = {}
        for method, rank in ext_methods:
            key = f"knots_ext {method}" + (f" -> rank {rank}" if rank else "")
            res = in_child(job_knots_ext, main_paths, method, args.top_k, args.repeats, args.repeat_budget,
                           [check], rank)
            ext[key] = res
            add_row(key, key, min(res["times"]), res["n_modules"], res["rss_after"] - res["rss_before"],
                    "merge + best rank-r factors (= PEFT svd's work)" if rank else "")
            log(f"  {key}: best {min(res['times']):.3f} s of {len(res['times'])}")
        base_key = "knots_ext knots-ties"
        base_s = main_rows[base_key]["seconds"]

        # check: knots_ext ta == sum of the updates (cheap, on the check module)
        adapters_f = [load_lora(p) for p in main_paths]
        ref_ta = sum(s * (B.double() @ A.double()) for B, A, s in (a[check] for a in adapters_f))
        checks = {}
        e = rel_err(ext["knots_ext ta"]["deltas"][check], ref_ta)
        checks["knots_ext ta vs float64 sum of s_i B_i A_i"] = dict(module=check, max_rel=e[0], fro_rel=e[1], tol=1e-5, asserts="max_rel")

        # ---- dense KnOTS on the reduced set, and knots_ext knots-ties on the same reduced set
        dense = None
        if "dense" not in skip:
            red_paths = subset_adapters(main_paths, tmp / "reduced",
                                        lambda m: layer_of(m) == 0 and m.rsplit(".", 1)[1] in dense_mods)
            red_modules = sorted(load_lora(red_paths[0]))
            log(f"dense KnOTS on the reduced set ({len(red_modules)} modules of layer 0: {', '.join(dense_mods)}) ...")
            dres = in_child(job_dense, red_paths, args.top_k, args.repeats, args.repeat_budget)
            eres = in_child(job_knots_ext, red_paths, "knots-ties", args.top_k, args.repeats, args.repeat_budget,
                            red_modules, None)
            errs = [rel_err(eres["deltas"][m], dres["deltas"][m]) for m in red_modules]
            checks["dense KnOTS vs knots_ext knots-ties (reduced set)"] = dict(
                modules=red_modules, max_rel=max(e[0] for e in errs), fro_rel=max(e[1] for e in errs), tol=TOL_KNOTS,
                asserts="max_rel")
            info = dres["info"]
            d_total, e_total = min(dres["times"]), min(eres["times"])
            # extrapolation: per-module time by shape (materialise + SVD + map back), TIES per element
            per_shape = {}
            for m in red_modules:
                per_shape.setdefault(module_shape(m, shapes), []).append(info["per_module"][m])
            per_shape = {s: sum(v) / len(v) for s, v in per_shape.items()}
            ties_per_elem = info["ties"] / sum(info["rep_elems"].values())

            def svd_cost(shape):  # LAPACK gesdd on a x b: ~ min(a, b)^2 max(a, b)
                a, b = shape[0], args.n * shape[1]
                return min(a, b) ** 2 * max(a, b)

            extrap, how = extrapolate(main_modules, shapes, per_shape, svd_cost)
            for m in main_modules:
                s = module_shape(m, shapes)
                extrap += ties_per_elem * args.n * min(s[0], args.n * args.rank, args.n * s[1]) * s[1]
            dense = dict(modules=red_modules, seconds=d_total, knots_ext_seconds=e_total,
                         ratio_measured=d_total / e_total,
                         per_module_seconds={m: info["per_module"][m] for m in red_modules},
                         per_shape_seconds={str(s): t for s, t in per_shape.items()}, ties_seconds=info["ties"],
                         peak_rss_increase_mb=dres["rss_after"] - dres["rss_before"],
                         knots_ext_peak_rss_increase_mb=eres["rss_after"] - eres["rss_before"],
                         extrapolated_seconds=extrap, extrapolation=how)
            add_row("dense KnOTS", "dense KnOTS (EXTRAPOLATED)", extrap, n_main, dense["peak_rss_increase_mb"],
                    f"= knots-ties (checked); extrapolated from {len(red_modules)} module(s) of layer 0")
            log(f"  dense KnOTS: {d_total:.2f} s on the reduced set vs knots_ext knots-ties {e_total:.3f} s "
                f"(x{d_total / e_total:.1f}, equal work); extrapolated to {n_main} modules: {extrap:.1f} s")
            results["dense_knots"] = dense

        # ---- PEFT add_weighted_adapter
        if "peft" not in skip:
            peft_paths, peft_layers = main_paths, args.layers
            if peft_mods is not None:
                peft_paths = subset_adapters(main_paths, tmp / "peft",
                                             lambda m: layer_of(m) == 0 and m.rsplit(".", 1)[1] in peft_mods,
                                             target_modules=peft_mods)
                peft_layers = 1
            peft_modules = sorted(load_lora(peft_paths[0]))
            if check not in peft_modules:
                ap.error(f"--check-module {args.check_module!r} is not among the modules PEFT runs on")
            # the reference for ties_svd: knots_ext's TIES kernels on the dense updates of the check
            # module with PEFT's rules (see peft_ties_reference), then the best rank-r approximation
            dWs = torch.stack([(s * (B.float() @ A.float())).reshape(-1) for B, A, s in (a[check] for a in adapters_f)])
            ties_dense = peft_ties_reference(dWs, args.top_k).double().reshape(module_shape(check, shapes))
            U, S, Vh = torch.linalg.svd(ties_dense, full_matrices=False)
            ref_ties_svd = (U[:, :args.rank] * S[:args.rank]) @ Vh[:args.rank]
            gaps = {"ties_svd": float((S[args.rank - 1] - S[args.rank]) / S[0])}
            S_ta = torch.linalg.svdvals(ref_ta)
            gaps["svd"] = float((S_ta[args.rank - 1] - S_ta[args.rank]) / S_ta[0])
            del dWs, ties_dense, U, S, Vh
            results["peft"] = {}
            for comb, ref, ref_label, tol in [
                    ("ties_svd", ref_ties_svd, "knots_ext TIES kernels with PEFT's rules (per module, exact-k trim, "
                                               "zero sum -> +1) -> rank r", TOL_PEFT_TIES_SVD),
                    ("svd", ext[f"knots_ext ta -> rank {args.rank}"]["deltas"][check], "knots_ext ta -> rank r",
                     TOL_PEFT_SVD)]:
                log(f"PEFT add_weighted_adapter {comb} on {len(peft_modules)} modules ...")
                res = in_child(job_peft, peft_paths, comb, args.top_k, profile, peft_layers, args.repeats,
                               args.repeat_budget, [check])
                measured = min(res["times"])
                note = {"ties_svd": "not KnOTS: TIES per module on dense dW_i (threshold per module), "
                                    f"then dense SVD -> rank {res['out_rank']}",
                        "svd": f"= knots_ext ta -> rank {res['out_rank']} (checked): sum of dense dW_i, dense SVD"}[comb]
                secs, how = measured, None
                if len(peft_modules) < n_main:
                    # per-module times (by shape) from inside the best call, plus the call's overhead
                    per_shape = {}
                    for (d_out, d_in), t in res["module_seconds"]:
                        per_shape.setdefault((d_out, d_in), []).append(t)
                    per_shape = {k: sum(v) / len(v) for k, v in per_shape.items()}
                    overhead = measured - sum(t for _, t in res["module_seconds"])
                    secs, how = extrapolate(main_modules, shapes, per_shape, lambda sh: min(sh) ** 2 * max(sh))
                    secs += overhead * n_main / len(peft_modules)
                    note += f"; EXTRAPOLATED from {len(peft_modules)} module(s) of layer 0 ({measured:.2f} s measured)"
                add_row(f"peft {comb}", f"peft {comb}" + (" (EXTRAPOLATED)" if how else ""),
                        secs, n_main, res["rss_after"] - res["rss_before"], note)
                results["peft"][comb] = dict(modules=peft_modules, measured_seconds=measured, times=res["times"],
                                             module_seconds=res["module_seconds"], extrapolation=how,
                                             out_rank=res["out_rank"])
                e = rel_err(res["deltas"][check], ref)
                checks[f"peft {comb} vs {ref_label}"] = dict(module=check, max_rel=e[0], fro_rel=e[1], tol=tol,
                                                             asserts="fro_rel", spectral_gap=gaps[comb])
                log(f"  peft {comb}: {measured:.2f} s on {len(peft_modules)} modules")

        # ---- the main table
        order = ["dense KnOTS", "peft ties_svd", "peft svd", base_key, "knots_ext ties", "knots_ext ta",
                 f"knots_ext ta -> rank {args.rank}"]
        table = []
        for key in order:
            if key in main_rows:
                r = main_rows[key]
                r["ratio_vs_knots_ties"] = r["seconds"] / base_s
                table.append([r["method"], f"{r['seconds']:.3f}", f"{r['seconds_per_module']:.4f}",
                              f"{r['ratio_vs_knots_ties']:.2f}", f"{r['peak_rss_increase_mb']:.0f}", r["note"]])
        say("")
        say(f"Merge of n={args.n} adapters, r={args.rank}, {args.layers} layer(s) x {len(shapes)} modules = {n_main} "
            f"modules; ratio = seconds / knots_ext knots-ties seconds (same run); peak RSS increase = child's "
            f"peak RSS during the timed call minus before it")
        say(fmt_table(["method", "seconds", "s/module", "ratio", "peakRSS+MB", "note"], table))
        say("Equal work (checked below): dense KnOTS = knots_ext knots-ties; peft svd = knots_ext ta -> rank r. The "
            "other ratios compare different computations (what each tool runs for that method name).")
        if dense:
            say(f"dense KnOTS measured on {len(dense['modules'])} module(s) of layer 0: {dense['seconds']:.2f} s vs "
                f"knots_ext knots-ties {dense['knots_ext_seconds']:.3f} s on the same adapters: "
                f"x{dense['ratio_measured']:.1f} (equal work, checked below). Per module: "
                + ", ".join(f"{m.rsplit('.', 1)[1]} {t:.2f} s" for m, t in dense["per_module_seconds"].items())
                + f"; TIES {dense['ties_seconds']:.2f} s. The full-configuration dense time is EXTRAPOLATED.")
        results["main"] = [main_rows[k] for k in order if k in main_rows]

        say("")
        say("Checks (max_rel = max|x - ref| / max|ref|, fro_rel = Frobenius relative error):")
        failed = []
        for label, c in checks.items():
            ok = c[c["asserts"]] <= c["tol"]
            c["ok"] = ok
            failed += [] if ok else [label]
            say(f"  {'ok  ' if ok else 'FAIL'} {label}: max_rel {c['max_rel']:.2e}, fro_rel {c['fro_rel']:.2e} "
                f"(asserted: {c['asserts']} <= {c['tol']:.0e}"
                + (f"; relative gap (s_r - s_r+1) / s_1 of the reference {c['spectral_gap']:.1e})" if "spectral_gap" in c
                   else ")"))
        results["checks"] = checks

        # ---- scaling
        if "scaling" not in skip:
            results["scaling"] = scaling(tmp, args, shapes, scaling_n, scaling_r)

        results["env"]["loadavg_end"] = os.getloadavg()
        out_path.write_text(json.dumps(results, indent=1, default=str))
        say(f"\nwrote {out_path}")
        assert not failed, f"checks failed: {failed}"
    finally:
        if args.keep_adapters:
            say(f"adapters kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def scaling(tmp: Path, args, shapes: dict, ns, rs) -> dict:
    """knots-ties (in this process) as n grows at r = args.rank, and as r grows at n = args.n; 1 layer."""
    import knots_ext
    out = dict(n=[], r=[])
    n_mod = len(shapes)

    def bench(paths):
        times, res = timed(lambda: knots_ext.merge([str(p) for p in paths], method="knots-ties", top_k=args.top_k),
                           args.repeats, args.repeat_budget)
        assert len(res.modules) == n_mod
        return min(times), len(times)

    say("")
    say(f"Scaling: knots_ext knots-ties, 1 layer x {n_mod} modules, top_k {args.top_k}")
    paths = write_adapters(tmp / "scale_n", max(ns), args.rank, 1, shapes=shapes, seed=1)
    rows = []
    for n in ns:
        secs, reps = bench(paths[:n])
        out["n"].append(dict(n=n, r=args.rank, k=n * args.rank, seconds=secs, seconds_per_module=secs / n_mod,
                             repeats=reps))
    for row in out["n"]:
        row["ratio_vs_first"] = row["seconds"] / out["n"][0]["seconds"]
        rows.append([row["n"], row["k"], f"{row['seconds']:.3f}", f"{row['seconds_per_module']:.4f}",
                     f"{row['ratio_vs_first']:.2f}"])
    say(f"as n grows (r = {args.rank}):")
    say(fmt_table(["n", "k=n*r", "seconds", "s/module", f"ratio vs n={ns[0]}"], rows))
    shutil.rmtree(tmp / "scale_n", ignore_errors=True)

    rows = []
    for r in rs:
        paths = write_adapters(tmp / f"scale_r{r}", args.n, r, 1, shapes=shapes, seed=2)
        secs, reps = bench(paths)
        out["r"].append(dict(n=args.n, r=r, k=args.n * r, seconds=secs, seconds_per_module=secs / n_mod,
                             repeats=reps))
        shutil.rmtree(tmp / f"scale_r{r}", ignore_errors=True)
    for row in out["r"]:
        row["ratio_vs_first"] = row["seconds"] / out["r"][0]["seconds"]
        rows.append([row["r"], row["k"], f"{row['seconds']:.3f}", f"{row['seconds_per_module']:.4f}",
                     f"{row['ratio_vs_first']:.2f}"])
    say(f"as r grows (n = {args.n}):")
    say(fmt_table(["r", "k=n*r", "seconds", "s/module", f"ratio vs r={rs[0]}"], rows))
    return out


if __name__ == "__main__":
    main()
