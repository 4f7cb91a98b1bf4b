"""The least time a merge of n rank-r adapters of Llama-3-8B attention (q, k, v, o x 32 layers, as
benchmarks/bench_scale.py) can take on this machine, against the merge itself, measured in one run:
knots-ties with the package's exact float64 KnOTS bases (issue 11's goals: n = 8 <= 3 s, n = 64
<= 45 s), or ties / dare-ties (goal: n = 1000 <= 15 min, output excluded).

    python benchmarks/bench_floor.py                 # knots-ties n = 8 and 64, the merges included: ~3 min
    python benchmarks/bench_floor.py --ns 64 --no-merge
    python benchmarks/bench_floor.py --method dare-ties --ns 1000 --layers 1   # ~2 min

A floor, from the work the merge cannot leave out, each part timed alone at its best (every part in
a fresh child process, harness.run_child; the synthetic adapters of bench_scale, cached there):
  bases    knots_ext.linalg.knots_svd of each of layer 0's modules at n, on ONE torch thread, best of
           --repeats, as KnotsSpace.prepare calls it: the float64 Gram of B_cat, its Cholesky,
           the eigendecomposition of the m x m core (m = min(d_out, n r)) and U's product; x the
           layers. Beside it the eigendecompositions alone (torch.linalg.eigh of an m x m float64
           matrix, one thread): the part no other way to the same bases avoids.
  passes   the window pass and the TIES apply each compute every task's k x d_in representation
           entries, 2 r flops an entry (the sample pass, 1/16 of them, left out), at
           torch.matmul's float32 rate on all threads (4096^3, best of 5).
  output   the lossless output's bytes ((d_out + d_in) k float32 a module) at the rate of writing
           a new file here (write and fsync of 512 MiB, one thread; the same with O_DIRECT is
           reported beside it).
  floor = (bases + output) / threads + passes: every CPU busy all the time, each part at its best
  rate, nothing else (reading the inputs, the sign fixes, Python) counted.
The merge: bench_scale's job_stream (merge_to, lossless float32 output) in a child, its wall time
and its CPU seconds in user mode and in the kernel (system: page faults on new memory, the page
cache of the files it writes; its start and imports included).

ties and dare-ties (--method), output excluded (the merge: job_stream with no output, as
bench_scale --no-output):
  passes   the window pass and the TIES apply each compute every task's d_out x d_in entries,
           2 r flops an entry, at torch.matmul's rate (as above).
  masks    dare-ties only: in each of the two passes a DARE mask word for every entry of every
           task (the DESIGN.md contract: Philox4x32-10, one block of 4 words per 4 entries), at
           the rate the kernels compute them on all threads: factor_ops.weighted_sum (TA) of 16
           tasks of a 512 x 4096 module with DARE minus without, best of --repeats.
  floor = passes + masks. Beside it, the share of the Philox blocks whose words could change
  the merge (some entry of the block, rescaled by 1/(1-p), at or above its task's TIES
  threshold: elsewhere the entry is trimmed whether dropped or kept), in layer 0's q_proj of up
  to 4 adapters (thresholds from a torch.rand mask: an estimate): the blocks a kernel that
  skipped the others would still compute.
Goals are for 32 layers; with --layers L they are taken as L/32 of that (work per layer is the same).

Reported per n: each part's thread-seconds and seconds, the floor (and the floor with the bases
reduced to their eigendecompositions), the merge, merge / floor and goal / floor. Nothing is
asserted. Results: printed and written to benchmarks/results/results_floor.json."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from bench_scale import FULL_LAYERS, job_generate, job_stream  # noqa: E402
from harness import RESULTS, fmt_table, log, run_child, say, warn_if_busy  # noqa: E402
from synthetic import LLAMA3_8B  # noqa: E402

GOAL_S = {"knots-ties": {8: 3.0, 64: 45.0, 256: 1800.0},  # issue 11, on all 32 layers
          "ties": {8: 15.0, 1000: 900.0}, "dare-ties": {8: 15.0, 1000: 900.0}}
TOP_K, DARE_P = 0.2, 0.5  # bench_scale's defaults
WRITE_PROBE_BYTES = 512 << 20


def job_bases(paths: list, repeats: int) -> dict:
    """Per module of layer 0: (d_out, d_in, k, knots_svd seconds, eigh seconds), one thread."""
    import torch

    from knots_ext import io
    from knots_ext.linalg import knots_svd

    torch.set_num_threads(1)
    adapters = [io.load_adapter(p) for p in paths]
    f32, out = torch.float32, {}
    for module in [m for m in adapters[0].modules if ".layers.0." in m]:
        factors = [a.factors(module) for a in adapters]
        Bs, As = [B for B, _ in factors], [A for _, A in factors]
        scales = [a.scale(module) for a in adapters]
        svd_s, svd = [], None
        for _ in range(repeats):
            svd = None
            t0 = time.perf_counter()
            svd = knots_svd(Bs, As, scales, coef_dtype=f32, u_dtype=f32)
            svd_s.append(time.perf_counter() - t0)
        k = svd.U.shape[1]
        m = min(Bs[0].shape[0], sum(A.shape[0] for A in As))
        X = torch.randn(m, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        core = X @ X.T
        eigh_s = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.linalg.eigh(core)
            eigh_s.append(time.perf_counter() - t0)
        out[module.rsplit(".", 1)[1]] = dict(d_out=Bs[0].shape[0], d_in=As[0].shape[1], k=k,
                                             knots_svd_s=min(svd_s), eigh_s=min(eigh_s))
    return out


def job_shapes(path: str) -> dict:
    """(d_out, d_in) of each module of layer 0."""
    from knots_ext import io

    adapter = io.load_adapter(path)
    out = {}
    for module in [m for m in adapter.modules if ".layers.0." in m]:
        B, A = adapter.factors(module)
        out[module.rsplit(".", 1)[1]] = dict(d_out=int(B.shape[0]), d_in=int(A.shape[1]))
    return out


def job_mask_rate(repeats: int) -> float:
    """Seconds per DARE mask word in the factored kernels on all threads: TA of 16 rank-16 tasks
    of a 512 x 4096 module with dare_p DARE_P minus without."""
    import torch

    from knots_ext import factor_ops

    n, m, c, r = 16, 512, 4096, 16
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(m, r, generator=g), torch.randn(r, c, generator=g), 1.0) for _ in range(n)]
    out, weights, tasks = torch.empty(m, c), [1.0] * n, list(range(n))

    def best(p: float) -> float:
        times = []
        for _ in range(max(repeats, 3)):
            t0 = time.perf_counter()
            factor_ops.weighted_sum(factors, weights, p, 0, "m", tasks, out=out)
            times.append(time.perf_counter() - t0)
        return min(times)

    best(DARE_P)  # (warm: the kernels' kept memory)
    return max(best(DARE_P) - best(0.0), 0.0) / (n * m * c)


def job_mask_blocks(paths: list) -> float:
    """The share of Philox blocks (4 consecutive entries) of layer 0's q_proj that hold an entry
    whose rescaled magnitude reaches its task's threshold at TOP_K, DARE_P (an estimate: the
    threshold of a torch.rand mask), over the given adapters."""
    import torch

    from knots_ext import io

    needed = total = 0
    for i, path in enumerate(paths):
        adapter = io.load_adapter(path)
        module = next(m for m in adapter.modules if ".layers.0." in m and m.endswith("q_proj"))
        B, A = adapter.factors(module)
        rescaled = (adapter.scale(module) * B.float() @ A.float()).abs().flatten() / (1 - DARE_P)
        kept = torch.rand(rescaled.numel(), generator=torch.Generator().manual_seed(i)) >= DARE_P
        dared = torch.where(kept, rescaled, 0.0)[::16]  # (a 1/16 sample: torch.quantile's size limit)
        threshold = torch.quantile(dared, 1 - TOP_K)
        needed += int((rescaled >= threshold).view(-1, 4).any(1).sum())
        total += rescaled.numel() // 4
    return needed / total


def job_rates(folder: str) -> dict:
    """torch.matmul's float32 GFLOP/s on all threads, and GB/s of writing a new file in folder."""
    import torch

    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    chunk = bytes(64 << 20)
    path = os.path.join(folder, "write_probe.bin")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(WRITE_PROBE_BYTES // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    os.remove(path)
    return dict(matmul_gflops=2 * 4096**3 / best / 1e9, write_gb_s=WRITE_PROBE_BYTES / write_s / 1e9,
                direct_write_gb_s=_direct_write_gb_s(path, chunk), threads=torch.get_num_threads())


def _direct_write_gb_s(path: str, chunk: bytes) -> float | None:
    """GB/s of the same write with O_DIRECT (past the page cache), for comparison; None where
    the filesystem refuses it. The package writes through the page cache."""
    import mmap

    aligned = mmap.mmap(-1, len(chunk))  # (O_DIRECT needs page-aligned memory)
    aligned.write(chunk)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return None
    try:
        t0 = time.perf_counter()
        for _ in range(WRITE_PROBE_BYTES // len(chunk)):
            os.write(fd, aligned)
        os.fsync(fd)
        return WRITE_PROBE_BYTES / (time.perf_counter() - t0) / 1e9
    except OSError:
        return None
    finally:
        os.close(fd)
        os.remove(path)


def floor_of(bases: dict, rates: dict, n: int, rank: int, layers: int) -> dict:
    """The floor's parts (seconds) from job_bases' and job_rates' figures."""
    threads = rates["threads"]
    flops = out_bytes = svd_ts = eigh_ts = 0.0
    for mod in bases.values():
        flops += 2 * n * mod["k"] * mod["d_in"] * 2 * rank * layers  # window pass + apply
        out_bytes += (mod["d_out"] + mod["d_in"]) * mod["k"] * 4 * layers
        svd_ts += mod["knots_svd_s"] * layers
        eigh_ts += mod["eigh_s"] * layers
    passes_s = flops / (rates["matmul_gflops"] * 1e9)
    output_ts = out_bytes / (rates["write_gb_s"] * 1e9)
    return dict(bases_thread_s=svd_ts, eigh_thread_s=eigh_ts, passes_s=passes_s, passes_tflop=flops / 1e12,
                output_thread_s=output_ts, output_gb=out_bytes / 1e9,
                floor_s=(svd_ts + output_ts) / threads + passes_s,
                floor_eigh_only_s=(eigh_ts + output_ts) / threads + passes_s)


def dense_floor_of(shapes: dict, rates: dict, mask_s_per_word: float | None, n: int, rank: int,
                   layers: int) -> dict:
    """ties / dare-ties (mask_s_per_word given): the floor's parts (seconds)."""
    entries = sum(mod["d_out"] * mod["d_in"] for mod in shapes.values()) * n * layers
    flops = 2 * entries * 2 * rank  # window pass + apply
    passes_s = flops / (rates["matmul_gflops"] * 1e9)
    words = 2 * entries if mask_s_per_word is not None else 0
    masks_s = words * (mask_s_per_word or 0.0)
    return dict(passes_tflop=flops / 1e12, passes_s=passes_s, mask_words_g=words / 1e9, masks_s=masks_s,
                floor_s=passes_s + masks_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="knots-ties", choices=sorted(GOAL_S), help="default knots-ties")
    ap.add_argument("--ns", default="8,64", help="adapter counts (default 8,64)")
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="layers of the merge (default 32)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the inputs (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many for each timed part (default 3)")
    ap.add_argument("--no-merge", action="store_true", help="the floor only, not the merge")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "knots_ext_bench_scale"),
                    help="bench_scale's folder of generated adapters (default /tmp/knots_ext_bench_scale)")
    ap.add_argument("--out", default=str(RESULTS / "results_floor.json"),
                    help="JSON output (default results_floor.json; results_floor_<method>.json for ties, dare-ties)")
    args = ap.parse_args(argv)
    if args.method != "knots-ties" and args.out == ap.get_default("out"):
        args.out = str(RESULTS / f"results_floor_{args.method}.json")
    ns = sorted(int(x) for x in args.ns.split(",") if x.strip())
    folder = Path(args.cache) / f"llama3-8b-r{args.rank}-L{args.layers}-bfloat16-seed0"
    log(f"bench_floor: adapters in {folder} (generated where missing) ...")
    env = run_child(job_generate, [(str(folder), max(ns), args.layers)], args.rank, LLAMA3_8B, "bfloat16", 0).result
    env = env["env"]
    warn_if_busy(env)
    paths = [str(folder / f"adapter{i}") for i in range(max(ns))]
    results: dict = dict(env=env, args=vars(args), runs=[])
    dense, dare = args.method != "knots-ties", args.method.startswith("dare")
    with tempfile.TemporaryDirectory(prefix="bench_floor_") as work:
        log("rates: torch.matmul, writing a new file ...")
        rates = run_child(job_rates, work).result
        say(f"  matmul {rates['matmul_gflops']:.0f} GFLOP/s on {rates['threads']} threads; "
            f"a new file written at {rates['write_gb_s']:.2f} GB/s (O_DIRECT: {rates['direct_write_gb_s'] or 0:.2f})")
        if dare:
            log("rates: DARE's mask words in the kernels ...")
            rates["mask_ns_per_word"] = run_child(job_mask_rate, args.repeats).result * 1e9
            rates["mask_blocks_needed"] = run_child(job_mask_blocks, paths[:4]).result
            say(f"  a mask word {rates['mask_ns_per_word']:.3f} ns on {rates['threads']} threads; blocks whose words "
                f"can change the merge: {100 * rates['mask_blocks_needed']:.1f}%")
        results["rates"] = rates
        shapes = run_child(job_shapes, paths[0]).result if dense else None
        for n in ns:
            if dense:
                mask_s = rates["mask_ns_per_word"] * 1e-9 if dare else None
                run = dict(n=n, shapes=shapes, **dense_floor_of(shapes, rates, mask_s, n, args.rank, args.layers))
                params: dict = dict(top_k=TOP_K, **(dict(dare_p=DARE_P, seed=0) if dare else {}))
                out_dir = None  # (output excluded, as the goal)
            else:
                log(f"n = {n}: bases of layer 0, one thread ...")
                bases = run_child(job_bases, paths[:n], args.repeats).result
                run = dict(n=n, bases=bases, **floor_of(bases, rates, n, args.rank, args.layers))
                params, out_dir = dict(top_k=TOP_K), os.path.join(work, f"merged{n}")
            if not args.no_merge:
                log(f"n = {n}: the merge ...")
                child = run_child(job_stream, paths[:n], args.method, params, out_dir, None, "float32")
                run["merge_s"] = child.result["seconds"]
                run["merge_over_floor"] = run["merge_s"] / run["floor_s"]
                run["merge_cpu_s"] = dict(user=child.user_seconds, system=child.system_seconds)
            if n in GOAL_S[args.method]:
                run["goal_s"] = GOAL_S[args.method][n] * args.layers / FULL_LAYERS
                run["goal_over_floor"] = run["goal_s"] / run["floor_s"]
            results["runs"].append(run)
    report(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    say(f"results: {args.out}")


def report(results: dict) -> None:
    threads, layers = results["rates"]["threads"], results["args"]["layers"]
    dense = results["args"]["method"] != "knots-ties"
    rows = []
    for r in results["runs"]:
        passes = f"{r['passes_tflop']:.2f} / {r['passes_s']:.1f}"
        if dense:
            parts = [passes, f"{r['mask_words_g']:.0f} / {r['masks_s']:.1f}", f"{r['floor_s']:.1f}"]
        else:
            parts = [f"{r['bases_thread_s']:.1f} ({r['eigh_thread_s']:.1f})", passes,
                     f"{r['output_gb']:.2f} / {r['output_thread_s']:.1f}",
                     f"{r['floor_s']:.1f} ({r['floor_eigh_only_s']:.1f})"]
        cpu = r.get("merge_cpu_s")
        rows.append([r["n"], *parts,
                     f"{r['merge_s']:.1f}" if "merge_s" in r else "-",
                     f"{cpu['user']:.1f} / {cpu['system']:.1f}" if cpu else "-",
                     f"{r['merge_over_floor']:.2f}" if "merge_over_floor" in r else "-",
                     f"{r['goal_s']:.1f} ({r['goal_over_floor']:.2f})" if "goal_s" in r else "-"])
    heads = (["passes TFLOP / s", "mask G words / s", f"floor s on {threads} threads"] if dense else
             ["bases thread-s (eigh alone)", "passes TFLOP / s", "output GB / thread-s",
              f"floor s on {threads} threads (eigh only)"])
    say(f"{results['args']['method']}, {layers} layer(s):")
    say(fmt_table(["n", *heads, "merge s", "merge CPU s user / system", "merge / floor",
                   f"goal s for {layers} layer(s) (/ floor)"], rows))


if __name__ == "__main__":
    main()
