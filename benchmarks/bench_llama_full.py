"""Full Llama-3-8B attention merge: n synthetic LoRA adapters (q,k,v,o x 32 layers = 128 modules,
r = 16, bfloat16 files from benchmarks/synthetic.py in a temporary directory) merged with
knots_ext.merge(method="knots-ties", top_k=0.2) in a child process.

    python benchmarks/bench_llama_full.py              # n = 8
    python benchmarks/bench_llama_full.py --n 8 64     # also 64 adapters (slow, and big: see below)
    python benchmarks/bench_llama_full.py --layers 2   # a small run, to check that it works

Measured per n, each in a fresh child process (writing the synthetic inputs is not timed):

  merge     wall time of the knots_ext.merge call (reading the adapter files included; starting
            Python and importing torch excluded), and the child's peak RSS (os.wait4's rusage of
            that child: the ru_maxrss that resource.getrusage(RUSAGE_CHILDREN) reports);
  + save    a second child does the merge again and then MergeResult.save (a PEFT adapter of rank
            n*r, --out-dtype): the save's wall time and that child's peak RSS.

The merge time reported is the better of the two children's merges. Goals: merge <= 30 s and peak
RSS <= 3 GB (n = 8); reported, not asserted. A child still running after --timeout seconds is
stopped and reported as not finished, with its peak RSS so far. Each child also reports its RSS after importing torch
and knots_ext (part of every peak). The saved adapter is checked (every module, shapes, rank,
finite). Results: printed, and written to benchmarks/results/results_llama_full.json."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from harness import RESULTS, environment, fmt_table, peak_rss_mb, run_child, warn_if_busy  # noqa: E402

GOAL_SECONDS = 30.0
GOAL_RSS_GB = 3.0


def job(spec: dict) -> dict:
    """The measured process: imports, merges, optionally saves; returns its figures."""
    t0 = time.perf_counter()
    import torch

    import knots_ext
    out = dict(import_seconds=time.perf_counter() - t0, rss_after_import_mb=peak_rss_mb(),
               threads=knots_ext.build_info().get("openmp_threads"), torch_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    res = knots_ext.merge(spec["paths"], method=spec["method"], top_k=spec["top_k"])
    out["merge_seconds"] = time.perf_counter() - t0
    out["peak_rss_after_merge_mb"] = peak_rss_mb()
    out["modules"] = len(res.modules)
    if spec.get("save_dir"):
        dtype = getattr(torch, spec["out_dtype"])
        t0 = time.perf_counter()
        res.save(spec["save_dir"], dtype=dtype, overwrite=True)
        out["save_seconds"] = time.perf_counter() - t0
        out["peak_rss_after_save_mb"] = peak_rss_mb()
    return out


def measure(spec: dict, timeout: float) -> dict:
    """Runs `job` in a fresh Python (harness.run_child); returns its figures plus its peak RSS from
    os.wait4. A child still running after `timeout` seconds is stopped and reported as timed out
    (with its peak RSS so far)."""
    run = run_child(job, spec, timeout=timeout)
    if run.timed_out:
        return dict(timed_out=True, child_wall_seconds=run.wall_seconds, child_peak_rss_mb=run.peak_rss_mb)
    return dict(run.result, child_peak_rss_mb=run.peak_rss_mb, child_wall_seconds=run.wall_seconds)


def check_saved(out_dir: Path, n_modules: int, max_rank: int, shapes: dict) -> dict:
    """The saved adapter: every module, B/A shapes, rank <= max_rank, all finite."""
    import torch
    from safetensors import safe_open
    with safe_open(str(out_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        a_keys = [k for k in keys if k.endswith(".lora_A.weight")]
        assert len(a_keys) == n_modules, f"saved {len(a_keys)} modules, want {n_modules}"
        ranks = set()
        for k in a_keys:
            A = f.get_tensor(k)
            B = f.get_tensor(k[: -len(".lora_A.weight")] + ".lora_B.weight")
            d_out, d_in = shapes[k[: -len(".lora_A.weight")].rsplit(".", 1)[1]]
            assert A.shape[1] == d_in and B.shape[0] == d_out and A.shape[0] == B.shape[1], k
            assert A.shape[0] <= max_rank, f"{k}: rank {A.shape[0]} > {max_rank}"
            assert torch.isfinite(A).all() and torch.isfinite(B).all(), f"{k}: not finite"
            ranks.add(A.shape[0])
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return dict(modules=n_modules, ranks=sorted(ranks), bytes=size, peft_type=cfg.get("peft_type"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[8], help="adapter counts to run (default 8; try 8 64)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--layers", type=int, default=32, help="layers (default 32: all of Llama-3-8B)")
    ap.add_argument("--top-k", type=float, default=0.2)
    ap.add_argument("--method", default="knots-ties")
    ap.add_argument("--out-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the saved adapter (default float32)")
    ap.add_argument("--no-save", action="store_true", help="skip the merge + save child")
    ap.add_argument("--out", default=str(RESULTS / "results_llama_full.json"))
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="stop a child after this many seconds and report it as not finished (default 1200)")
    args = ap.parse_args(argv)

    # a TERM (e.g. from a job runner) unwinds like Ctrl-C: the child is stopped, temp files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from synthetic import LLAMA3_8B, write_adapters

    n_modules = args.layers * len(LLAMA3_8B)
    env = environment()
    print(f"bench_llama_full: {args.method} top_k={args.top_k}, Llama-3-8B q,k,v,o x {args.layers} layers = "
          f"{n_modules} modules, r={args.rank}, bf16 inputs; n = {', '.join(map(str, args.n))}", flush=True)
    print(f"env: torch {env['torch']}, {env['cpus']} cpus, load average {env['loadavg_start'][0]:.1f}, "
          f"knots_ext build {env['build']}", flush=True)
    warn_if_busy(env)

    results = dict(config=dict(method=args.method, top_k=args.top_k, rank=args.rank, layers=args.layers,
                               modules=n_modules, out_dtype=args.out_dtype,
                               goals=dict(merge_seconds=GOAL_SECONDS, peak_rss_gb=GOAL_RSS_GB)),
                   env=env, runs=[])
    rows = []
    for n in args.n:
        tmp = Path(tempfile.mkdtemp(prefix=f"bench_llama_n{n}_"))
        try:
            t0 = time.perf_counter()
            paths = write_adapters(tmp / "in", n, args.rank, args.layers)
            write_s = time.perf_counter() - t0
            in_bytes = sum(f.stat().st_size for p in paths for f in Path(p).iterdir())
            print(f"n={n}: wrote the inputs ({in_bytes / 2**20:.0f} MiB) in {write_s:.1f} s (not timed); merging ...",
                  flush=True)
            spec = dict(paths=[str(p) for p in paths], method=args.method, top_k=args.top_k)
            run = dict(n=n, k=n * args.rank, input_mib=in_bytes / 2**20, write_inputs_seconds=write_s)
            results["runs"].append(run)
            merge_only = measure(spec, args.timeout)
            run.update(merge_child=merge_only, merge_peak_rss_mb=merge_only["child_peak_rss_mb"],
                       getrusage_children_maxrss_mb=peak_rss_mb(resource.RUSAGE_CHILDREN))
            if merge_only.get("timed_out"):
                run.update(timed_out=True, meets_time_goal=False,
                           meets_rss_goal=(merge_only["child_peak_rss_mb"] or 0) <= GOAL_RSS_GB * 1024)
                peak = merge_only["child_peak_rss_mb"]
                print(f"  merge: NOT FINISHED after {args.timeout:.0f} s (stopped); child peak RSS so far "
                      f"{peak if peak is None else round(peak)} MiB", flush=True)
                rows.append([n, n * args.rank, f"> {args.timeout:.0f} (stopped)", f">= {peak if peak is None else round(peak)}",
                             "-", "-", "-", "MISSED / " + ("ok so far" if run["meets_rss_goal"] else "MISSED")])
                continue
            print(f"  merge: {merge_only['merge_seconds']:.2f} s, child peak RSS "
                  f"{merge_only['child_peak_rss_mb']:.0f} MiB", flush=True)
            run["merge_seconds"] = merge_only["merge_seconds"]
            if not args.no_save:
                save_dir = tmp / "merged"
                with_save = measure(dict(spec, save_dir=str(save_dir), out_dtype=args.out_dtype),
                                    args.timeout)
                run.update(save_child=with_save, getrusage_children_maxrss_mb=peak_rss_mb(resource.RUSAGE_CHILDREN))
                if with_save.get("timed_out"):
                    print(f"  merge + save: NOT FINISHED after {args.timeout:.0f} s (stopped)", flush=True)
                else:
                    saved = check_saved(save_dir, n_modules, n * args.rank, LLAMA3_8B)
                    print(f"  merge + save: merge {with_save['merge_seconds']:.2f} s, save "
                          f"{with_save['save_seconds']:.2f} s ({saved['bytes'] / 2**20:.0f} MiB, ranks "
                          f"{saved['ranks']}), child peak RSS {with_save['child_peak_rss_mb']:.0f} MiB", flush=True)
                    run.update(save_seconds=with_save["save_seconds"], save_peak_rss_mb=with_save["child_peak_rss_mb"],
                               saved=saved, merge_seconds=min(merge_only["merge_seconds"], with_save["merge_seconds"]))
            run["meets_time_goal"] = run["merge_seconds"] <= GOAL_SECONDS
            run["meets_rss_goal"] = run["merge_peak_rss_mb"] <= GOAL_RSS_GB * 1024
            rows.append([n, n * args.rank, f"{run['merge_seconds']:.2f}", f"{run['merge_peak_rss_mb']:.0f}",
                         f"{run['save_seconds']:.2f}" if "save_seconds" in run else "-",
                         f"{run['save_peak_rss_mb']:.0f}" if "save_peak_rss_mb" in run else "-",
                         f"{merge_only['rss_after_import_mb']:.0f}",
                         ("ok" if run["meets_time_goal"] else "MISSED") + " / "
                         + ("ok" if run["meets_rss_goal"] else "MISSED")])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    results["env"]["loadavg_end"] = os.getloadavg()
    print()
    print(f"{args.method} merge of n Llama-3-8B attention adapters ({n_modules} modules, r={args.rank}); "
          f"goals: merge <= {GOAL_SECONDS:.0f} s, peak RSS <= {GOAL_RSS_GB:.0f} GB")
    print(fmt_table(["n", "k=n*r", "merge s", "merge peak RSS MiB", "save s", "merge+save peak RSS MiB",
                     "RSS after import MiB", "goals time / RSS"], rows))
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
