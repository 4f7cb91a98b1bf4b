"""Methods benchmark: knots_ext.merge (from the LoRA factors) against dense versions of the same
methods written here (every dW_i materialised in float32, dense torch.linalg SVDs), for iso-c,
tsv-m and core-ties (optionally iso-cts and regmean, with synthetic Grams), on the same synthetic adapters (synthetic.write_adapters:
n = 8, r = 16, Llama-3-8B attention shapes 4096 x 4096 / 1024 x 4096, 1 layer by default).

Each run is in a fresh child process; its time is the best of --repeats, its memory the child's
peak RSS increase over its own start (ru_maxrss, after imports). knots_ext's time and memory are
those of knots_ext.merge, whose result is factored (B, A per module); the dense versions' include
their dense d_out x d_in results. knots_ext's dense updates are formed after the measurement,
for the check only. Each dense result is checked against
knots_ext's (max |dense - knots_ext| / max |dense| over all modules, asserted < --max-err; for
core-ties the Frobenius relative error is asserted, since float32 rounding can flip single entries
at the TIES trim threshold).
Prints a table and writes benchmarks/results/results_methods.json (results_methods_quick.json with --quick).

core-ties is compared with top_k_scope="module" (TIES thresholds per module: the dense version
trims each module's cores with a torch.kthvalue threshold)."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from harness import RESULTS, child_setup, fmt_table, in_child, peak_rss_mb, rel_err, timed  # noqa: E402
from synthetic import LLAMA3_8B, load_lora, write_adapters  # noqa: E402

TOL = 1e-5
METHODS = ("iso-c", "tsv-m", "core-ties")
QUICK_SHAPES = {"q_proj": (256, 256), "k_proj": (64, 256), "v_proj": (64, 256), "o_proj": (256, 256)}


# ----------------------------------------------------------------------------------------------
# dense versions (float32, every dW_i materialised)

def _load_dense(paths):
    """{module: [dW_i float32]} and {module: [(s_i B_i, A_i) float32]}."""
    loras = [load_lora(p) for p in paths]
    dWs, facs = {}, {}
    for name in loras[0]:
        facs[name] = [(s * B.float(), A.float()) for B, A, s in (lo[name] for lo in loras)]
        dWs[name] = [sB @ A for sB, A in facs[name]]
    return dWs, facs


def _polar(M):
    P, _, Qt = torch.linalg.svd(M, full_matrices=False)
    return P @ Qt


def dense_iso_c(dWs, lam, tol=TOL):
    U, S, Vh = torch.linalg.svd(sum(dWs), full_matrices=False)
    keep = S > tol
    return lam * S[keep].mean() * (U[:, keep] @ Vh[keep])


def dense_iso_cts(dWs, lam, f=0.8, tol=TOL):
    U, S, Vh = torch.linalg.svd(sum(dWs), full_matrices=False)
    R, n = int((S > tol).sum()), len(dWs)
    k = int(R * f)
    ts = round((R - k) / n) * n
    ts = ts if ts <= R else (R // n) * n
    k, per_task = R - ts, ts // n
    Us, Ss, Vs = [], [], []
    for dW in dWs:
        u, s, vh = torch.linalg.svd(dW - U[:, :k] @ (U[:, :k].T @ dW), full_matrices=False)
        keep = min(per_task, int((s > tol).sum()))
        Us.append(u[:, :keep]), Ss.append(s[:keep]), Vs.append(vh[:keep])
    S_all = torch.cat(Ss + [S[:k]])
    return lam * S_all.mean() * _polar(torch.cat(Us + [U[:, :k]], 1)) @ _polar(torch.cat(Vs + [Vh[:k]], 0).T).T


def dense_tsv_m(dWs, lam, tol=TOL):
    per_task = max(1, min(dWs[0].shape) // len(dWs))
    Us, Ss, Vs = [], [], []
    for dW in dWs:
        u, s, vh = torch.linalg.svd(dW, full_matrices=False)
        keep = min(per_task, int((s > tol * s[0]).sum()))  # the task's rank
        Us.append(u[:, :keep]), Ss.append(s[:keep]), Vs.append(vh[:keep].T)
    return lam * _polar(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ _polar(torch.cat(Vs, 1)).T


def _ties_rows(x, top_k, lam):
    """TIES on (n, P) rows: per-row exact threshold (k-th smallest |x|, k = P - floor(P top_k),
    ties kept), sign election (zero sums: majority sign), disjoint mean, times lam."""
    n, P = x.shape
    k = P - math.floor(P * top_k)
    if k > 0:
        t = torch.kthvalue(x.abs(), k, dim=1).values[:, None]
        x = torch.where(x.abs() >= t, x, torch.zeros((), dtype=x.dtype))
    tsum = x.sum(0)
    sign = torch.sign(tsum)
    ssum = float(sign.sum())
    sign = torch.where(tsum == 0, torch.full_like(sign, float((ssum > 0) - (ssum < 0))), sign)
    agree = (x != 0) & (torch.sign(x) == sign)
    return lam * torch.where(agree, x, torch.zeros((), dtype=x.dtype)).sum(0) / agree.sum(0).clamp(min=1)


def dense_core_ties(dWs, facs, top_k, lam, tol=TOL):
    U_B, S_B, _ = torch.linalg.svd(torch.cat([sB for sB, _ in facs], 1), full_matrices=False)
    V_A, S_A, _ = torch.linalg.svd(torch.cat([A for _, A in facs], 0).T, full_matrices=False)
    U_B, V_A = U_B[:, S_B > tol * S_B[0]], V_A[:, S_A > tol * S_A[0]]
    cores = torch.stack([(U_B.T @ dW @ V_A).reshape(-1) for dW in dWs])
    M = _ties_rows(cores, top_k, lam).reshape(U_B.shape[1], V_A.shape[1])
    return U_B @ M @ V_A.T


GRAMS = "grams.safetensors"  # RegMean's Gram file, written into each adapter's directory
REGMEAN_ALPHA = 0.9


def write_grams(paths, seed: int = 100):
    """A Gram per module and adapter, I + U U^T with U d_in x 64 (positive definite, cheap):
    written untimed, beside each adapter, as knots_ext.grams files."""
    from knots_ext.grams import save_grams
    for i, p in enumerate(paths):
        gen = torch.Generator().manual_seed(seed + i)
        grams = {}
        for name, (_, A, _) in load_lora(p).items():
            U = torch.randn(A.shape[1], 64, generator=gen, dtype=torch.float64) / 8
            grams[name.removeprefix("base_model.model.")] = torch.eye(A.shape[1], dtype=torch.float64) + U @ U.T
        save_grams(Path(p) / GRAMS, grams)


def dense_regmean(dWs, grams, lam, alpha=REGMEAN_ALPHA):
    """(sum_i dW_i G~_i)(sum_i G~_i)^-1 on the dense dW_i (float32 products, float64 solve)."""
    shrunk = [(alpha * G + (1 - alpha) * torch.diag(torch.diag(G))).float() for G in grams]
    num = sum(dW @ G for dW, G in zip(dWs, shrunk))
    return lam * torch.linalg.solve(sum(shrunk).double(), num.double().T).T.float()  # G~ symmetric


def dense_merge(paths, method, top_k, lam):
    dWs, facs = _load_dense(paths)
    if method == "regmean":
        from safetensors.torch import load_file
        gram_files = [load_file(str(Path(p) / GRAMS)) for p in paths]
    out = {}
    for name in dWs:
        if method == "regmean":
            key = name.removeprefix("base_model.model.")
            out[name] = dense_regmean(dWs[name], [g[key] for g in gram_files], lam)
        elif method == "iso-c":
            out[name] = dense_iso_c(dWs[name], lam)
        elif method == "iso-cts":
            out[name] = dense_iso_cts(dWs[name], lam)
        elif method == "tsv-m":
            out[name] = dense_tsv_m(dWs[name], lam)
        elif method == "core-ties":
            out[name] = dense_core_ties(dWs[name], facs[name], top_k, lam)
        else:
            raise ValueError(method)
    return out


# ----------------------------------------------------------------------------------------------
# child-process jobs

def job(paths, method, impl, top_k, lam, repeats, budget):
    child_setup()
    import knots_ext  # imported before the baseline, in both jobs
    before = peak_rss_mb()

    if impl == "dense":
        def run():
            return dense_merge(paths, method, top_k, lam)
    else:
        def run():  # the merge only: its result stays factored (res.delta is taken after)
            kw = dict(top_k=top_k, top_k_scope="module") if method == "core-ties" else {}
            if method == "regmean":
                kw = dict(grams=[Path(p) / GRAMS for p in paths], regmean_alpha=REGMEAN_ALPHA)
            return knots_ext.merge([str(p) for p in paths], method=method, lam=lam, **kw)

    times, out = timed(run, repeats, budget)
    rss_mb = peak_rss_mb() - before
    if impl != "dense":  # materialised for the check only, outside the timing and the memory figure
        out = {name: out.delta(name) for name in out.modules}
    return dict(times=times, rss_mb=rss_mb, deltas=out, threads=torch.get_num_threads())


def rel_errs(got: dict, want: dict) -> tuple[float, float]:
    """harness.rel_err over all modules together (max and Frobenius relative errors)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    return rel_err(torch.cat([got[k].reshape(-1) for k in want]), torch.cat([want[k].reshape(-1) for k in want]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (256 / 64), < 1 minute")
    ap.add_argument("--n", type=int, default=8, help="adapters (default 8)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--layers", type=int, default=1, help="layers of q,k,v,o (default 1)")
    ap.add_argument("--top-k", type=float, default=0.2, help="core-ties top_k (default 0.2)")
    ap.add_argument("--lam", type=float, default=1.0, help="lam (default 1.0)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS + ('iso-cts', 'regmean'))} (default {','.join(METHODS)})")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    ap.add_argument("--repeat-budget", type=float, default=20.0,
                    help="repeat only while a method's total time stays under this (default 20 s)")
    ap.add_argument("--max-err", type=float, default=1e-3, help="asserted bound on the max relative error")
    ap.add_argument("--ties-max-err", type=float, default=5e-2,
                    help="asserted bound on core-ties' Frobenius relative error (float32 trim flips)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else LLAMA3_8B
    out_path = Path(args.out) if args.out else RESULTS / ("results_methods_quick.json" if args.quick
                                                          else "results_methods.json")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    try:
        paths = write_adapters(tmp / "adapters", args.n, args.rank, args.layers, shapes=shapes)
        if "regmean" in methods:
            write_grams(paths)
        rows, results = [], {}
        for method in methods:
            r = {}
            for impl in ("knots_ext", "dense"):
                t0 = time.perf_counter()
                r[impl] = in_child(job, paths, method, impl, args.top_k, args.lam, args.repeats, args.repeat_budget)
                print(f"  {method:10s} {impl:9s} best {min(r[impl]['times']):8.3f} s  "
                      f"(wall {time.perf_counter() - t0:.1f} s)", flush=True)
            err, ferr = rel_errs(r["knots_ext"]["deltas"], r["dense"]["deltas"])
            k, d = min(r["knots_ext"]["times"]), min(r["dense"]["times"])
            results[method] = dict(knots_ext_s=k, dense_s=d, ratio=d / k, knots_ext_times=r["knots_ext"]["times"],
                                   dense_times=r["dense"]["times"], knots_ext_rss_mb=r["knots_ext"]["rss_mb"],
                                   dense_rss_mb=r["dense"]["rss_mb"], max_rel_err=err, fro_rel_err=ferr)
            rows.append([method, f"{k:.3f}", f"{d:.3f}", f"{d / k:.1f}x", f"{r['knots_ext']['rss_mb']:.0f}",
                         f"{r['dense']['rss_mb']:.0f}", f"{err:.1e}", f"{ferr:.1e}"])
            # TIES: the dense cores U_B^T dW_i V_A, computed in float32 through the materialised dW_i,
            # carry rounding errors that flip entries lying near the trim threshold (kept by one side,
            # dropped by the other); knots_ext's cores (float64 from the factors) match a float64 dense
            # core-ties to ~2e-7, the float32 dense version is ~1e-2 off it (Frobenius). For TIES the
            # Frobenius error is asserted, against the looser --ties-max-err.
            bound = ferr if "ties" in method else err
            limit = args.ties_max_err if "ties" in method else args.max_err
            assert bound < limit, f"{method}: dense and knots_ext differ, relative error {bound:.3g}"
        print()
        print(f"n={args.n} r={args.rank} layers={args.layers} shapes={sorted(set(shapes.values()))} "
              f"torch threads={r['dense']['threads']}")
        print(fmt_table(["method", "knots_ext s", "dense s", "dense/knots_ext", "knots_ext peak RSS +MB",
                         "dense peak RSS +MB", "max rel err", "Frobenius rel err"], rows))
        meta = dict(n=args.n, rank=args.rank, layers=args.layers, shapes=shapes, top_k=args.top_k, lam=args.lam,
                    quick=args.quick, torch=torch.__version__, threads=r["dense"]["threads"],
                    cpus=os.cpu_count(), machine=platform.platform(), core_ties_top_k_scope="module")
        out_path.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        print(f"wrote {out_path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
