"""Scaling benchmark (issue 11): time and peak RSS of the streaming merge, knots_ext.merge_to
(each module's factors written to the output folder as soon as they are final, so the output is
never held in memory), as the number of adapters n grows, against baselines measured in the same
run. Synthetic rank-16 adapters of Llama-3-8B attention shapes (q, k, v, o; bfloat16 files from
benchmarks/synthetic.py), generated once into a cache folder and reused by later runs.

    python benchmarks/bench_scale.py            # knots-ties, ties, dare-ties at n = 8..256 on 2 layers,
                                                # then ties and dare-ties at n = 1000 on 2 layers: hours
    python benchmarks/bench_scale.py --ns 8,64 --large-n 0       # shorter: the flat-in-n pair only
    python benchmarks/bench_scale.py --shapes q_proj=1024x1024,k_proj=256x1024,v_proj=256x1024,o_proj=1024x1024 \
        --ns 8,32 --layers 1 --large-n 0 --out /tmp/calib.json   # minutes: 1/16 of the elements, to
                                                # estimate a full run (ties: seconds per adapter x 16)
    python benchmarks/bench_scale.py --quick    # tiny shapes, n = 2, 4 (and 8), 1 layer: < 1 minute
    python benchmarks/bench_scale.py --methods ties --ns 8 --layers 32 --large-n 0 --no-output
                                                # the merge alone, its output excluded (all 32 layers)

Measured, every merge in a fresh child process (harness.run_child), one merge per child:

  merge_to     knots_ext.merge_to(out, paths, method, top_k=0.2 [, dare_p=0.5, seed]) with the
               output lossless (--out-rank) in float32 (--out-dtype): its wall time (reading the
               adapters and writing the output included; starting Python and importing torch and
               knots_ext excluded), the child's own peak RSS (VmHWM: the peak of the child's own
               address space, importing torch included; ru_maxrss would also count the parent's
               peak, inherited at the child's exec), its RSS after the imports, and the output's
               size on disk.
  in-memory    the previous path to the same output: knots_ext.merge(paths, ...) (a MergeResult
               holding every module's update) then MergeResult.save(out): time (merge, save) and
               peak RSS the same way; its output is checked to equal merge_to's, tensor by tensor
               (after its peak is read). At the n of --baseline-ns (default 8 and 64; 'all').
  read pass    one pass over the inputs: every adapter file loaded (safetensors) and each factor
               converted to float32, one adapter at a time; best of 3, one child for all of them.

Reported per (method, n): seconds, the ratios merge_to / read pass and merge_to / in-memory
(same run), peak RSS, the factors' own size (n adapters' lora_A and lora_B as stored, bf16; and as
float32), the output's size; and, for --layers < 32, the time and sizes EXTRAPOLATED to the 32
layers of Llama-3-8B by per-layer cost (x 32 / layers; the peak RSS is reported as measured, not
scaled: the streaming merge is meant to hold one module at a time plus a bounded store of KnOTS
states; --layers 32 measures it). Goals (reported, not asserted):
peak RSS flat in n (n = 64 within 1.3x of n = 8, plus the n = 64 factors' own size) and <= 1 GB at
n = 256. --large-n (default 1000) merges that many adapters with --large-methods (ties, dare-ties)
on --large-layers (default 2), extrapolated to 32 layers likewise.

No figure is asserted; the outputs' equality is (after the results are written). Results:
printed, written to benchmarks/results/results_scale.json (results_scale_quick.json with --quick)
and plotted beside it (.png: time and peak RSS vs n)."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from harness import RESULTS, environment, fmt_table, log, run_child, say, timed, vm_hwm_mb, warn_if_busy  # noqa: E402
from synthetic import LLAMA3_8B  # noqa: E402 (synthetic imports torch only where it writes or reads)

FULL_LAYERS = 32  # Llama-3-8B
SMALL = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 64)}
STORED_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GOAL_FLAT_RATIO = 1.3  # peak RSS at n = 64 <= 1.3 x that at n = 8 + the n = 64 factors' own size
GOAL_PEAK_MB = 1024.0  # peak RSS at n = 256


# ----------------------------------------------------------------------------------------------
# child-process jobs (no torch in the parent: a child's figures are its own)

def job_generate(folders: list, rank: int, shapes: dict, dtype: str, seed: int) -> dict:
    """Writes the adapters missing from each (cache folder, n, layers) and returns the
    environment; adapters already there (with their config, written last) are reused."""
    from synthetic import write_adapters
    out = dict(env=environment(), written={})
    for folder, n, layers in folders:
        folder = Path(folder)
        have = 0
        while have < n and (folder / f"adapter{have}" / "adapter_config.json").exists():
            have += 1
        t0 = time.perf_counter()
        if have < n:
            write_adapters(folder, n, rank, layers, shapes=shapes, dtype=dtype, seed=seed, start=have)
        out["written"][str(folder)] = dict(reused=have, written=max(0, n - have), seconds=time.perf_counter() - t0)
    return out


def job_read(sets: list) -> list:
    """Seconds of one read pass (best of 3) over each list of adapter paths."""
    import torch
    from safetensors.torch import load_file

    def read(paths):
        for p in paths:
            for t in load_file(str(Path(p) / "adapter_model.safetensors")).values():
                t.to(torch.float32)

    return [min(timed(lambda paths=paths: read(paths), 3, 60.0)[0]) for paths in sets]


def job_write(out_dir: str, shapes: dict, layers: int) -> dict:
    """The lossless dense output's writer vs a plain write of the same bytes, in the same child:
    per module a random float32 W (d_out x d_in) and the identity, as merge_to writes a dense
    result ((W, I)); the AdapterWriter (add with finite=True, as merge_to) and a plain file write
    (f.write of each tensor's bytes), each closed with an fsync. Seconds and MiB/s of both."""
    import torch

    import knots_ext
    from knots_ext.engine import update_factors
    from knots_ext.methods.spaces import DenseUpdate

    torch.manual_seed(0)
    updates = {f"base_model.model.model.layers.{i}.self_attn.{name}": DenseUpdate(torch.randn(d_out, d_in))
               for i in range(layers) for name, (d_out, d_in) in shapes.items()}
    t0 = time.perf_counter()
    # header room reserved for the keys, as merge_to does (else close() copies the data behind the header)
    keys = [f"{name}.lora_{ab}.weight" for name in updates for ab in "AB"]
    with knots_ext.io.AdapterWriter(Path(out_dir) / "writer", base_model=None, reserve_keys=keys) as w:
        # as merge_to calls it (builds before finite= was added: without it)
        checked = dict(finite=True) if "finite" in inspect.signature(w.add).parameters else {}
        for name, update in updates.items():
            w.add(name, *update_factors(update), **checked)
    writer_s = time.perf_counter() - t0
    written = _folder_bytes(Path(out_dir) / "writer")
    t0 = time.perf_counter()
    with open(Path(out_dir) / "plain.bin", "wb") as f:
        for update in updates.values():
            for t in update_factors(update):
                f.write(t.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    plain_s = time.perf_counter() - t0
    mib = written / 2**20
    return dict(mib=mib, writer_seconds=writer_s, plain_seconds=plain_s, writer_mib_s=mib / writer_s,
                plain_mib_s=mib / plain_s, ratio=writer_s / plain_s)


def _merge_params(method: str, top_k: float, dare_p: float, seed: int) -> dict:
    return dict(top_k=top_k, **(dict(dare_p=dare_p, seed=seed) if method.startswith("dare") else {}))


def _imports() -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import knots_ext
    return dict(import_seconds=time.perf_counter() - t0, rss_after_import_mb=vm_hwm_mb(),
                threads=knots_ext.build_info().get("openmp_threads"))


def _folder_bytes(folder) -> int:
    """The bytes of the written tensors and config: the safetensors header (whose metadata holds the
    recipe, with the output's own path and the date) and the recipe / model card files are left
    out, so that two outputs of one merge compare."""
    weights = Path(folder) / "adapter_model.safetensors"
    with open(weights, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return weights.stat().st_size - 8 - header + (Path(folder) / "adapter_config.json").stat().st_size


def job_stream(paths, method, params, out_dir, out_rank, out_dtype) -> dict:
    """The streaming merge; the harness adds the child's own peak RSS when this returns."""
    out = _imports()
    import torch

    import knots_ext
    t0 = time.perf_counter()
    if out_dir is None:  # --no-output: each merged module computed, checked finite, then dropped
        from knots_ext import driver, engine

        class Dropped(driver.Patcher):  # as merge_to's writer: modules waiting for the majority are not held
            def accepts(self, ref, update):
                return True

            def apply(self, ref, positions, values):
                pass

        spec, declared, device, adapters, weights = engine._prepare(
            [str(p) for p in paths], method, params, "cpu", None, False, "drop")
        merged = []
        engine.run_merge(spec, engine._setup(spec, declared, adapters), adapters, device,
                         lambda ref, update: merged.append(ref.name), True, weights, consumed=True,
                         patcher=Dropped())
        out.update(seconds=time.perf_counter() - t0, modules=len(merged), output_bytes=0)
        return out
    summary = knots_ext.merge_to(out_dir, [str(p) for p in paths], method, rank=out_rank,
                                 dtype=getattr(torch, out_dtype), **params)
    out["seconds"] = time.perf_counter() - t0
    out.update(modules=len(summary.modules), output_bytes=_folder_bytes(out_dir))
    return out


def job_in_memory(paths, method, params, out_dir, out_rank, out_dtype, compare_to) -> dict:
    """merge() then save(): the same output through a MergeResult. Its peak RSS is read before
    the output is compared with compare_to (merge_to's, when it finished)."""
    out = _imports()
    import torch

    import knots_ext
    t0 = time.perf_counter()
    res = knots_ext.merge([str(p) for p in paths], method, **params)
    out["merge_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    res.save(out_dir, rank=out_rank, dtype=getattr(torch, out_dtype))
    out["save_seconds"] = time.perf_counter() - t1
    out["seconds"] = time.perf_counter() - t0
    out.update(modules=len(res.modules), output_bytes=_folder_bytes(out_dir), peak_rss_mb=vm_hwm_mb())
    del res
    if compare_to is not None:
        out["equal_to_merge_to"] = _same_output(Path(out_dir), Path(compare_to))
    return out


def _same_output(a: Path, b: Path) -> dict:
    """Whether two merge outputs hold the same tensors (bit for bit) and the same config."""
    from safetensors.torch import load_file
    ta, tb = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    differ = sorted(k for k in set(ta) | set(tb) if k not in ta or k not in tb or not ta[k].equal(tb[k]))
    same_config = json.loads((a / "adapter_config.json").read_text()) == json.loads(
        (b / "adapter_config.json").read_text())
    return dict(equal=not differ and same_config, tensors=len(ta), differing=differ[:5], config_equal=same_config)


# ----------------------------------------------------------------------------------------------
# the parent

def parse_shapes(text: str) -> tuple[str, dict]:
    """'llama3-8b', 'small', or NAME=OUTxIN,... (e.g. q_proj=1024x1024,k_proj=256x1024)."""
    if text in ("llama3-8b", "small"):
        return text, dict(LLAMA3_8B if text == "llama3-8b" else SMALL)
    shapes = {}
    for item in text.split(","):
        name, dims = item.split("=")
        d_out, d_in = dims.lower().split("x")
        shapes[name.strip()] = (int(d_out), int(d_in))
    return "custom-" + "-".join(f"{k}{a}x{b}" for k, (a, b) in shapes.items()), shapes


def factor_bytes(n: int, rank: int, layers: int, shapes: dict, per_elem: int) -> int:
    """The n adapters' lora_A and lora_B: n * layers * sum over modules of r (d_out + d_in)."""
    return n * layers * sum(rank * (d_out + d_in) for d_out, d_in in shapes.values()) * per_elem


def ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()] if text not in ("", "none") else []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny: small shapes, n = 2, 4, 1 layer, rank 4, --large-n 8 (checks that it all works)")
    ap.add_argument("--ns", default="8,32,64,128,256", help="adapter counts (default 8,32,64,128,256)")
    ap.add_argument("--methods", default="knots-ties,ties,dare-ties", help="default knots-ties,ties,dare-ties")
    ap.add_argument("--layers", type=int, default=2,
                    help=f"layers of q,k,v,o (default 2; {FULL_LAYERS} = the whole model, no extrapolation)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the inputs (default 16)")
    ap.add_argument("--shapes", default="llama3-8b",
                    help="llama3-8b (default), small (64 / 16), or NAME=OUTxIN,... "
                         "(e.g. q_proj=1024x1024,k_proj=256x1024)")
    ap.add_argument("--top-k", type=float, default=0.2, help="TIES top_k (default 0.2)")
    ap.add_argument("--dare-p", type=float, default=0.5, help="DARE drop probability (default 0.5)")
    ap.add_argument("--seed", type=int, default=0, help="DARE mask seed (default 0)")
    ap.add_argument("--large-n", type=int, default=1000, help="the large run's n (default 1000; 0 skips it)")
    ap.add_argument("--large-methods", default="ties,dare-ties", help="default ties,dare-ties")
    ap.add_argument("--large-layers", type=int, default=2, help="the large run's layers (default 2)")
    ap.add_argument("--baseline-ns", default=None,
                    help="n values at which the in-memory merge + save baseline runs (default: 8 and 64, those of "
                         "the flat-in-n goal, where in --ns, else the smallest n; 'all': every n; 'none': none)")
    ap.add_argument("--large-baseline", action="store_true", help="also run the in-memory baseline at --large-n")
    ap.add_argument("--no-output", action="store_true",
                    help="time the merge with its output excluded: each merged module is computed, checked finite "
                         "and dropped (the in-memory baseline is not run)")
    ap.add_argument("--out-rank", type=int, default=None, help="output rank (default: lossless, as knots-merge)")
    ap.add_argument("--out-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="output dtype (default float32, as knots-merge)")
    ap.add_argument("--input-dtype", default="bfloat16", choices=sorted(STORED_BYTES),
                    help="dtype of the synthetic adapters (default bfloat16)")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "knots_ext_bench_scale"),
                    help="folder of the generated adapters, reused across runs (default /tmp/knots_ext_bench_scale)")
    ap.add_argument("--work", default=None, help="folder for the merge outputs (default: a new temporary folder)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="stop a child after this many seconds and report it as not finished (default 3600)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/results_scale.json, "
                                                "results_scale_quick.json with --quick); the plot: same name, .png")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.rank, args.layers, args.large_layers = "small", min(args.rank, 4), 1, 1
        args.ns = "2,4" if args.ns == ap.get_default("ns") else args.ns
        args.large_n = 8 if args.large_n == ap.get_default("large_n") else args.large_n
        args.baseline_ns = args.baseline_ns or str(max(ints(args.ns)))  # the largest n only: fewer children
    shapes_name, shapes = parse_shapes(args.shapes)
    ns = sorted(ints(args.ns))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.baseline_ns is None:
        baseline_ns = ({8, 64} & set(ns)) or set(ns[:1])
    else:
        baseline_ns = set(ns if args.baseline_ns == "all" else ints(args.baseline_ns))
    groups = [dict(name="main", methods=methods, ns=ns, layers=args.layers, baseline_ns=baseline_ns)]
    if args.large_n:
        groups.append(dict(name="large", methods=[m.strip() for m in args.large_methods.split(",") if m.strip()],
                           ns=[args.large_n], layers=args.large_layers,
                           baseline_ns={args.large_n} if args.large_baseline else set()))
    out_path = Path(args.out) if args.out else RESULTS / ("results_scale_quick.json" if args.quick
                                                          else "results_scale.json")
    cache = Path(args.cache)

    def folder_of(layers):
        return cache / f"{shapes_name}-r{args.rank}-L{layers}-{args.input_dtype}-seed{args.seed}"

    need = {}
    for g in groups:
        need[folder_of(g["layers"])] = (max(need.get(folder_of(g["layers"]), (0, 0))[0], max(g["ns"])), g["layers"])
    log(f"bench_scale: adapters in {cache} (generated where missing) ...")
    gen = run_child(job_generate, [(str(f), n, layers) for f, (n, layers) in need.items()], args.rank, shapes,
                    args.input_dtype, args.seed).result
    env = gen["env"]
    say(f"env: torch {env['torch']} ({env['torch_threads']} threads), {env['cpus']} cpus, load average "
        f"{env['loadavg_start'][0]:.1f}, knots_ext build {env['build']}")
    warn_if_busy(env)
    for f, w in gen["written"].items():
        log(f"  {f}: {w['reused']} reused, {w['written']} written in {w['seconds']:.1f} s")

    paths_of = {id(g): [folder_of(g["layers"]) / f"adapter{i}" for i in range(max(g["ns"]))] for g in groups}
    log("read passes ...")
    read_sets = [(g, n) for g in groups for n in g["ns"]]
    read_s = run_child(job_read, [[str(p) for p in paths_of[id(g)][:n]] for g, n in read_sets]).result
    read_of = {(g["name"], n): s for (g, n), s in zip(read_sets, read_s)}

    results = dict(
        config=dict(ns=ns, methods=methods, layers=args.layers, rank=args.rank, shapes_name=shapes_name,
                    shapes={k: list(v) for k, v in shapes.items()}, top_k=args.top_k, dare_p=args.dare_p,
                    seed=args.seed, large=dict(n=args.large_n, methods=groups[-1]["methods"],
                                               layers=args.large_layers) if args.large_n else None,
                    baseline_ns=sorted(baseline_ns), out_rank=args.out_rank, out_dtype=args.out_dtype, no_output=args.no_output,
                    input_dtype=args.input_dtype, full_layers=FULL_LAYERS, quick=args.quick, cache=str(cache),
                    timeout_s=args.timeout,
                    goals=dict(flat_ratio=GOAL_FLAT_RATIO, peak_rss_mb=GOAL_PEAK_MB)),
        env=env, adapters=gen["written"], runs=[])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    failed = []
    try:
        for g in groups:
            scale = FULL_LAYERS / g["layers"]
            for method in g["methods"]:
                params = _merge_params(method, args.top_k, args.dare_p, args.seed)
                for n in g["ns"]:
                    paths = paths_of[id(g)][:n]
                    fb = factor_bytes(n, args.rank, g["layers"], shapes, STORED_BYTES[args.input_dtype])
                    run = dict(group=g["name"], method=method, n=n, layers=g["layers"], k=n * args.rank,
                               params=params, read_pass_seconds=read_of[(g["name"], n)], factors_bytes=fb,
                               factors_bytes_float32=fb * 4 // STORED_BYTES[args.input_dtype],
                               factors_bytes_32_layers=fb * scale, stream=None, in_memory=None, ratios={})
                    results["runs"].append(run)
                    out_s, out_m = work / f"{method}-n{n}-L{g['layers']}-stream", work / f"{method}-n{n}-mem"
                    log(f"{method} n={n} ({g['layers']} layer(s)): merge_to ...")
                    c = run_child(job_stream, paths, method, params, None if args.no_output else str(out_s),
                                  args.out_rank, args.out_dtype, timeout=args.timeout)
                    s = dict(c.result or {}, timed_out=c.timed_out, child_wall_seconds=c.wall_seconds,
                             peak_rss_mb=c.own_peak_rss_mb, ru_maxrss_mb=c.peak_rss_mb)
                    run["stream"] = s
                    if c.timed_out:
                        log(f"  NOT FINISHED after {args.timeout:.0f} s (stopped); peak RSS so far "
                            f"{s['peak_rss_mb'] or 0:.0f} MiB")
                    else:
                        s.update(seconds_32_layers=s["seconds"] * scale,
                                 output_bytes_32_layers=s["output_bytes"] * scale)
                        run["ratios"]["vs_read_pass"] = s["seconds"] / run["read_pass_seconds"]
                        log(f"  {s['seconds']:.3f} s, peak RSS {s['peak_rss_mb']:.0f} MiB, output "
                            f"{s['output_bytes'] / 2**20:.1f} MiB")
                    if n in g["baseline_ns"] and not c.timed_out and not args.no_output:
                        log("  in-memory merge + save ...")
                        b = run_child(job_in_memory, paths, method, params, str(out_m), args.out_rank,
                                      args.out_dtype, str(out_s), timeout=args.timeout)
                        m = dict(b.result or {}, timed_out=b.timed_out, child_wall_seconds=b.wall_seconds,
                                 ru_maxrss_mb=b.peak_rss_mb)
                        if b.timed_out:
                            m["peak_rss_mb"] = b.own_peak_rss_mb
                            log(f"  in-memory: NOT FINISHED after {args.timeout:.0f} s (stopped)")
                        else:
                            run["ratios"].update(vs_in_memory=s["seconds"] / m["seconds"],
                                                 peak_rss_vs_in_memory=s["peak_rss_mb"] / m["peak_rss_mb"])
                            eq = m["equal_to_merge_to"]
                            if not eq["equal"]:
                                failed.append(f"{method} n={n}: merge_to and merge + save outputs differ {eq}")
                            log(f"  in-memory: {m['seconds']:.3f} s (merge {m['merge_seconds']:.3f} s), peak RSS "
                                f"{m['peak_rss_mb']:.0f} MiB; outputs {'equal' if eq['equal'] else 'DIFFER'}")
                        run["in_memory"] = m
                    shutil.rmtree(out_s, ignore_errors=True)
                    shutil.rmtree(out_m, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    if any(not m.startswith("knots") for m in methods) and not args.no_output:
        log("the dense output's writer vs a plain write ...")
        with tempfile.TemporaryDirectory(dir=work if args.work else None) as wdir:
            results["write"] = w = run_child(job_write, wdir, shapes, 1).result
        say(f"writing one layer's lossless dense output ({w['mib']:.0f} MiB, with fsync): AdapterWriter "
            f"{w['writer_seconds']:.3f} s ({w['writer_mib_s']:.0f} MiB/s), plain file write {w['plain_seconds']:.3f} s "
            f"({w['plain_mib_s']:.0f} MiB/s): x{w['ratio']:.2f}")
    results["goals"] = goals(results["runs"], ns)
    results["env"]["loadavg_end"] = os.getloadavg()
    report(results, args)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1, default=str))
    say(f"\nwrote {out_path}")
    png = plot(results, out_path.with_suffix(".png"))
    if png:
        say(f"wrote {png}")
    say(f"adapters kept in {cache} for later runs (delete it to free the disk)")
    assert not failed, f"checks failed: {failed}"


def goals(runs: list, ns: list) -> dict:
    """Per method of the main runs: the flat-in-n goal (peak RSS at n = 64 <= 1.3 x that at n = 8
    + the n = 64 factors' own size; the smallest and largest n stand in where 8 or 64 are not run)
    and the peak-RSS goal at n = 256 (the largest n where 256 is not run). Reported only."""
    out = {}
    lo, hi = (8, 64) if {8, 64} <= set(ns) else (ns[0], ns[-1])
    top = 256 if 256 in ns else ns[-1]
    for method in dict.fromkeys(r["method"] for r in runs if r["group"] == "main"):
        by_n = {r["n"]: r for r in runs if r["group"] == "main" and r["method"] == method}
        peak = {n: (r["stream"] or {}).get("peak_rss_mb") for n, r in by_n.items()}
        imp = {n: (r["stream"] or {}).get("rss_after_import_mb") for n, r in by_n.items()}
        g = {}
        if peak.get(lo) and peak.get(hi) and not by_n[hi]["stream"]["timed_out"]:
            allowed = GOAL_FLAT_RATIO * peak[lo] + by_n[hi]["factors_bytes"] / 2**20
            g["flat_in_n"] = dict(n_low=lo, n_high=hi, peak_low_mb=peak[lo], peak_high_mb=peak[hi],
                                  ratio=peak[hi] / peak[lo], allowed_mb=allowed, met=peak[hi] <= allowed,
                                  # the same without what importing torch and knots_ext holds
                                  increase_low_mb=peak[lo] - imp[lo], increase_high_mb=peak[hi] - imp[hi],
                                  increase_ratio=(peak[hi] - imp[hi]) / max(peak[lo] - imp[lo], 1e-9))
        if peak.get(top):
            g["peak_rss"] = dict(n=top, peak_mb=peak[top], goal_mb=GOAL_PEAK_MB,
                                 finished=not by_n[top]["stream"]["timed_out"],
                                 met=peak[top] <= GOAL_PEAK_MB and not by_n[top]["stream"]["timed_out"])
        out[method] = g
    return out


def report(results: dict, args) -> None:
    def mib(b):
        return "-" if b is None else f"{b / 2**20:.1f}"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    rows = []
    for r in results["runs"]:
        s, m = r["stream"], r["in_memory"] or {}
        done = not s["timed_out"]
        rows.append([r["method"], r["n"], r["layers"],
                     num(s.get("seconds"), ".3f") if done else f"> {args.timeout:.0f}",
                     num(s.get("seconds_32_layers"), ".1f") if r["layers"] != FULL_LAYERS else "(measured)",
                     num(r["ratios"].get("vs_read_pass"), ".0f"), num(m.get("seconds"), ".3f"),
                     num(r["ratios"].get("vs_in_memory"), ".2f"), num(s.get("peak_rss_mb"), ".0f"),
                     num(s.get("rss_after_import_mb"), ".0f"), num(m.get("peak_rss_mb"), ".0f"),
                     mib(r["factors_bytes"]), mib(s.get("output_bytes")),
                     "-" if "equal_to_merge_to" not in m else ("yes" if m["equal_to_merge_to"]["equal"] else "NO")])
    c = results["config"]
    say("")
    say(f"knots_ext.merge_to of n synthetic rank-{c['rank']} adapters ({c['shapes_name']} q,k,v,o shapes, "
        f"{c['input_dtype']} files), top_k {c['top_k']}, dare_p {c['dare_p']}; output "
        f"{'EXCLUDED (--no-output: merged modules computed, checked finite, dropped)' if c.get('no_output') else ('lossless' if c['out_rank'] is None else 'rank ' + str(c['out_rank'])) + ' ' + c['out_dtype']}. "
        f"s@{FULL_LAYERS}L = seconds x {FULL_LAYERS} / layers (EXTRAPOLATED by per-layer cost); xread = merge_to / one "
        f"read pass over the inputs; xmem = merge_to / in-memory merge + save (same run); peak RSS = the child's "
        f"own (VmHWM), importing torch included (after import: 'import'); factors = the n adapters' lora_A + "
        f"lora_B as stored")
    say(fmt_table(["method", "n", "layers", "merge_to s", f"s@{FULL_LAYERS}L", "xread", "in-mem s", "xmem",
                   "peak MiB", "import MiB", "in-mem peak MiB", "factors MiB", "output MiB", "equal"], rows))
    say("")
    say("Goals (reported, not asserted):")
    for method, g in results["goals"].items():
        if "flat_in_n" in g:
            f = g["flat_in_n"]
            say(f"  {method}: peak RSS n={f['n_high']} {f['peak_high_mb']:.0f} MiB vs n={f['n_low']} "
                f"{f['peak_low_mb']:.0f} MiB (x{f['ratio']:.2f}); allowed {GOAL_FLAT_RATIO} x n={f['n_low']} + "
                f"factors = {f['allowed_mb']:.0f} MiB: {'met' if f['met'] else 'MISSED'} (above the imports: "
                f"{f['increase_high_mb']:.0f} vs {f['increase_low_mb']:.0f} MiB, x{f['increase_ratio']:.2f})")
        if "peak_rss" in g:
            p = g["peak_rss"]
            say(f"  {method}: peak RSS at n={p['n']} {p['peak_mb']:.0f} MiB"
                + ("" if p["finished"] else " (so far: NOT FINISHED)")
                + f", goal <= {p['goal_mb']:.0f} MiB: {'met' if p['met'] else 'MISSED'}")


def plot(results: dict, path: Path):
    """Time and peak RSS vs n, per method (merge_to solid, in-memory dashed, read pass dotted);
    the large-n runs as separate markers. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib not installed: no plot")
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    runs = [r for r in results["runs"] if not r["stream"]["timed_out"]]
    colors = {}
    for r in runs:
        colors.setdefault(r["method"], f"C{len(colors)}")
    for method, color in colors.items():
        for group, marker in (("main", "o"), ("large", "s")):
            rs = sorted((r for r in runs if r["method"] == method and r["group"] == group), key=lambda r: r["n"])
            if not rs:
                continue
            label = method + (f" (large n, {rs[0]['layers']} layer(s))" if group == "large" else "")
            ns = [r["n"] for r in rs]
            ax_t.plot(ns, [r["stream"]["seconds"] for r in rs], marker=marker, color=color, label=label)
            ax_m.plot(ns, [r["stream"]["peak_rss_mb"] for r in rs], marker=marker, color=color, label=label)
            mem = [r for r in rs if r["in_memory"] and not r["in_memory"]["timed_out"]]
            if mem:
                ax_t.plot([r["n"] for r in mem], [r["in_memory"]["seconds"] for r in mem], ls="--", marker=marker,
                          color=color, alpha=0.6, label=f"{method} in-memory")
                ax_m.plot([r["n"] for r in mem], [r["in_memory"]["peak_rss_mb"] for r in mem], ls="--",
                          marker=marker, color=color, alpha=0.6, label=f"{method} in-memory")
    reads = sorted({(r["n"], r["read_pass_seconds"]) for r in runs if r["group"] == "main"})
    if reads:
        ax_t.plot(*zip(*reads), ls=":", marker=".", color="k", label="read pass")
    ax_m.axhline(GOAL_PEAK_MB, color="gray", lw=0.8, ls="-.", label=f"goal {GOAL_PEAK_MB:.0f} MiB")
    c = results["config"]
    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS (MiB, child's own)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n adapters")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.set_title(f"merge_to time ({c['layers']} layer(s) of {c['shapes_name']}, r={c['rank']})")
    ax_m.set_title("peak RSS")
    for ax in (ax_t, ax_m):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
