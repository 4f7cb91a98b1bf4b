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
finite). Results: printed, and written to benchmarks/results_llama_full.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL_SECONDS = 30.0
GOAL_RSS_GB = 3.0


def _maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def child(spec_path: str) -> None:
    """The measured process: imports, merges, optionally saves; prints one JSON line."""
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    import torch

    import knots_ext
    out = dict(import_seconds=time.perf_counter() - t0, rss_after_import_mb=_maxrss_mb(),
               threads=knots_ext.build_info().get("openmp_threads"), torch_threads=torch.get_num_threads())
    t0 = time.perf_counter()
    res = knots_ext.merge(spec["paths"], method=spec["method"], top_k=spec["top_k"])
    out["merge_seconds"] = time.perf_counter() - t0
    out["peak_rss_after_merge_mb"] = _maxrss_mb()
    out["modules"] = len(res.modules)
    if spec.get("save_dir"):
        dtype = getattr(torch, spec["out_dtype"])
        t0 = time.perf_counter()
        res.save(spec["save_dir"], dtype=dtype, overwrite=True)
        out["save_seconds"] = time.perf_counter() - t0
        out["peak_rss_after_save_mb"] = _maxrss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS so far of a running process (VmHWM in /proc), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def run_child(spec: dict, workdir: Path, timeout: float) -> dict:
    """Runs `child` in a fresh Python; returns its JSON plus its peak RSS from os.wait4. A child
    still running after `timeout` seconds is stopped and reported as timed out (with its peak RSS
    so far)."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                            stdout=subprocess.PIPE, text=True)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    try:
        while True:  # os.wait4 (not Popen.wait) so that the child's own rusage comes back
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                hwm = _vm_hwm_mb(proc.pid)
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                return dict(timed_out=True, child_wall_seconds=time.perf_counter() - t0,
                            child_peak_rss_mb=max(hwm or 0.0, usage.ru_maxrss / 1024.0))
            time.sleep(0.1)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    reader.join()
    stdout = "".join(chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed (exit {proc.returncode}):\n{stdout}")
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["child_peak_rss_mb"] = usage.ru_maxrss / 1024.0
    out["child_wall_seconds"] = wall
    return out


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
    ap.add_argument("--out", default=str(HERE / "results_llama_full.json"))
    ap.add_argument("--timeout", type=float, default=1200.0,
                    help="stop a child after this many seconds and report it as not finished (default 1200)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    # a TERM (e.g. from a job runner) unwinds like Ctrl-C: the child is stopped, temp files removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.path.insert(0, str(HERE))
    from synthetic import LLAMA3_8B, fmt_table, write_adapters

    import knots_ext
    import torch
    n_modules = args.layers * len(LLAMA3_8B)
    env = dict(python=platform.python_version(), torch=torch.__version__, cpus=os.cpu_count(),
               knots_ext=knots_ext.__version__, build=knots_ext.build_info(), loadavg_start=os.getloadavg())
    print(f"bench_llama_full: {args.method} top_k={args.top_k}, Llama-3-8B q,k,v,o x {args.layers} layers = "
          f"{n_modules} modules, r={args.rank}, bf16 inputs; n = {', '.join(map(str, args.n))}", flush=True)
    print(f"env: torch {env['torch']}, {env['cpus']} cpus, load average {env['loadavg_start'][0]:.1f}, "
          f"knots_ext build {env['build']}", flush=True)
    if env["loadavg_start"][0] > (env["cpus"] or 1):
        print("warning: the machine is busy (load average above the CPU count): times are noisy", flush=True)

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
            merge_only = run_child(spec, tmp, args.timeout)
            run.update(merge_child=merge_only, merge_peak_rss_mb=merge_only["child_peak_rss_mb"],
                       getrusage_children_maxrss_mb=_maxrss_mb(resource.RUSAGE_CHILDREN))
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
                with_save = run_child(dict(spec, save_dir=str(save_dir), out_dtype=args.out_dtype), tmp,
                                      args.timeout)
                run.update(save_child=with_save, getrusage_children_maxrss_mb=_maxrss_mb(resource.RUSAGE_CHILDREN))
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
