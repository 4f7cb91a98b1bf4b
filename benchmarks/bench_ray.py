"""Ray benchmark (issue 15): the same merge in one process and on a local Ray with 1 and 2
workers, measured in the same run, plus a projection for N workers from the measured per-module
task times. Synthetic rank-16 adapters of Llama-3-8B attention shapes (benchmarks/synthetic.py,
the cache folder bench_scale.py uses).

    python benchmarks/bench_ray.py                       # knots-ties and ties, n = 8 and 32, 2 layers
    python benchmarks/bench_ray.py --quick               # small shapes, n = 4, 1 layer: < 1 minute

Every figure comes from a fresh child process (harness.run_child):

  local        knots_ext.merge(paths, method) in one process with 2 threads (the default), and
               with 1 thread (a Ray worker's share here: Ray runs each 1-CPU worker with 1 thread).
  ray W        a local Ray started with W CPUs (W workers), then merge(..., executor="ray") with
               the driver's torch at 1 thread (so each task runs with 1 thread on 1 CPU: RayPasses)
               twice: the first merge pays the workers' start (Python, torch, the adapters'
               headers), the second is the steady state. Ray's own start is reported apart.
  tasks        the Ray tasks of the merge run inline in one process with 1 thread (distributed.
               RayPasses with a stand-in for Ray that calls each task at once and times it): each
               task's seconds, in the order the driver sends them, and the driver's own time (the
               rest: thresholds, majority sign, emitting), and the states' size. The results of the
               1-thread runs (local, inline, Ray) are compared bit by bit (the 2-thread merge's
               KnOTS basis rounds differently: torch's float64 GEMMs depend on the thread count).
               States: kept in the object store (what the merge does) vs
               made again in every later phase (the extra work that would cost, from their times).

Projection for N workers (reported, with its assumptions), for --project-layers (default 32: all
of Llama-3-8B's attention, each measured layer's tasks repeated): the driver's own time, plus per phase
(states, each threshold round, merge: the driver waits for each phase's results before the next)
the makespan of its tasks on N workers, each task going to the first worker free, in the order
sent (Ray's FIFO queue), plus Ray's measured per-task overhead (the steady-state 1-worker time
minus the inline run's, per task), given two ways: paid by the driver one task after another
(an upper bound), or by the workers as part of each task (a lower bound). Assumes workers as fast as one core
here, adapters read from a filesystem as fast as this disk, and object-store transfers as cheap
as on one machine (states and merged rows cross the network on a real cluster).

Results: printed and written to benchmarks/results/results_ray.json."""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from harness import RESULTS, fmt_table, log, run_child, say  # noqa: E402
from synthetic import LLAMA3_8B  # noqa: E402

SMALL = {"q_proj": (64, 64), "k_proj": (16, 64), "v_proj": (16, 64), "o_proj": (64, 64)}


def _params(method: str) -> dict:
    return dict(top_k=0.2, **(dict(dare_p=0.5, seed=0) if "dare" in method else {}))


def _digest(result) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(result.modules):
        u = result.modules[name]
        for t in (u.B, u.A) if hasattr(u, "B") else (u.W,):
            h.update(name.encode())
            h.update(t.contiguous().view(torch.int32).numpy().tobytes())
    return h.hexdigest()


def job_generate(folder: str, n: int, rank: int, shapes: dict, layers: int) -> None:
    """The adapters of the cache folder up to n (those already there, complete, are kept)."""
    from synthetic import write_adapters

    start = 0
    while start < n and (Path(folder) / f"adapter{start}" / "adapter_config.json").exists():
        start += 1
    write_adapters(Path(folder), n, rank, layers, shapes=shapes, dtype="bfloat16", seed=0, start=start)


def job_local(paths: list, method: str, threads: int) -> dict:
    import torch

    import knots_ext

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    result = knots_ext.merge(paths, method, **_params(method))
    return dict(seconds=time.perf_counter() - t0, digest=_digest(result))


def job_ray(paths: list, method: str, workers: int) -> dict:
    import ray
    import torch

    import knots_ext

    torch.set_num_threads(1)  # the tasks' threads (RayPasses): one a worker, as many tasks as workers
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter() - t0
    times, digests = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        result = knots_ext.merge(paths, method, executor="ray", **_params(method))
        times.append(time.perf_counter() - t0)
        digests.append(_digest(result))
    ray.shutdown()
    return dict(start=start, first=times[0], steady=times[1], digest=digests[1], same=digests[0] == digests[1])


class InlineRay:
    """What RayPasses calls of Ray, running each task at once in this process: its seconds and
    phase recorded (a phase ends where the driver first fetches a result)."""

    def __init__(self):
        self.tasks: list = []  # (phase, task name, seconds)
        self.phase, self.fetched = 0, False
        self.state_bytes = 0  # the states the object store holds between the passes

    def remote(self, **options):
        def wrap(fn):
            ray = self

            class Task:
                @staticmethod
                def options(**options):
                    return Task

                @staticmethod
                def remote(*args):
                    if ray.fetched:
                        ray.phase, ray.fetched = ray.phase + 1, False
                    t0 = time.perf_counter()
                    out = fn(*args)
                    ray.tasks.append((ray.phase, fn.__name__, time.perf_counter() - t0))
                    if fn.__name__ == "_prepare":
                        ray.state_bytes += sum(t.numel() * t.element_size() for t in _flatten(out[0])[0])
                    return out

            return Task

        return wrap

    def get(self, value):
        self.fetched = True
        return value


def job_tasks(paths: list, method: str) -> dict:
    import torch

    from knots_ext import distributed, engine

    torch.set_num_threads(1)
    inline = InlineRay()
    spec, declared, device, adapters, weights = engine._prepare(paths, method, _params(method), "cpu", None, False,
                                                                "drop")
    job = distributed.Job("bench", tuple(paths), method, dict(declared), None, False, weights, 1)
    out: dict = {}
    t0 = time.perf_counter()
    engine.run_merge(spec, engine._setup(spec, declared, adapters), adapters, device,
                     lambda ref, u: out.__setitem__(ref.name, u), True, weights,
                     passes=lambda space, load: distributed.RayPasses(inline, job, space, load))
    wall = time.perf_counter() - t0
    result = type("R", (), {"modules": out})()
    return dict(wall=wall, tasks=inline.tasks, digest=_digest(result), state_bytes=inline.state_bytes)


def _flatten(state):
    from knots_ext.driver import _flatten as flatten

    return flatten(state)


def makespan(seconds: list, workers: int) -> float:
    """Tasks in the order sent, each to the first worker free."""
    free = [0.0] * workers
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def project(tasks: list, driver_s: float, overhead_s: float, workers: int, copies: int = 1,
            serial: bool = True) -> float:
    """copies: the model's layers as that many copies of the measured ones (each phase's tasks
    repeated, the driver's time scaled alike). serial: the per-task overhead paid by the driver
    one task after another (an upper bound), else by the workers with each task (a lower one)."""
    phases: dict = {}
    for phase, _, s in tasks:
        phases.setdefault(phase, []).append(s if serial else s + overhead_s)
    spans = sum(makespan(s * copies, workers) for s in phases.values())
    return copies * (driver_s + (overhead_s * len(tasks) if serial else 0.0)) + spans


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="knots-ties,ties")
    ap.add_argument("--ns", default="8,32")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--workers", default="1,2", help="Ray workers of the measured runs (default 1,2)")
    ap.add_argument("--project", default="1,2,4,8,16,32,64,128", help="N of the projection")
    ap.add_argument("--project-layers", type=int, default=32,
                    help="the projection's model: this many layers, copies of the measured ones (default 32)")
    ap.add_argument("--quick", action="store_true", help="small shapes, n = 4, 1 layer")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "knots_ext_bench_scale"))
    ap.add_argument("--out", default=None, help="default benchmarks/results/results_ray.json (_quick with --quick)")
    args = ap.parse_args(argv)
    shapes, shapes_name, rank = LLAMA3_8B, "llama3-8b", 16
    if args.quick:
        shapes, shapes_name, rank, args.layers, args.ns = SMALL, "small", 4, 1, "4"
    ns = [int(x) for x in args.ns.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    folder = Path(args.cache) / f"{shapes_name}-r{rank}-L{args.layers}-bfloat16-seed0"
    log(f"bench_ray: adapters in {folder} (generated where missing) ...")
    run_child(job_generate, str(folder), max(ns), rank, shapes, args.layers)
    rows, runs = [], []
    for method in methods:
        for n in ns:
            paths = [str(folder / f"adapter{i}") for i in range(n)]
            log(f"{method} n={n}: local, inline tasks, ray ...")
            local2 = run_child(job_local, paths, method, 2).result
            local1 = run_child(job_local, paths, method, 1).result
            inline = run_child(job_tasks, paths, method).result
            ray_runs = {w: run_child(job_ray, paths, method, w).result for w in map(int, args.workers.split(","))}
            task_s = sum(s for _, _, s in inline["tasks"])
            driver_s = max(inline["wall"] - task_s, 0.0)
            steady1 = ray_runs[min(ray_runs)]["steady"]
            overhead = max(steady1 - inline["wall"], 0.0) / max(len(inline["tasks"]), 1)
            # the tasks run with 1 thread: the bits of the 1-thread merge in one process
            digests = {local1["digest"], inline["digest"], *(r["digest"] for r in ray_runs.values())}
            same = len(digests) == 1
            copies = max(1, args.project_layers // args.layers)
            projection = {N: project(inline["tasks"], driver_s, overhead, N, copies)
                          for N in map(int, args.project.split(","))}
            projection_parallel = {N: project(inline["tasks"], driver_s, overhead, N, copies, serial=False)
                                   for N in projection}
            local_full = local2["seconds"] * copies
            # States kept in the object store vs made again in each later phase that reads them
            prepare_s = sum(s for _, name, s in inline["tasks"] if name == "_prepare")
            later = len({p for p, name, _ in inline["tasks"] if name != "_prepare"})
            say(f"  states: {prepare_s:.2f} s to make, {inline['state_bytes'] / 2**20:.1f} MiB kept in the object "
                f"store; made again in each of the {later} later phases instead: +{prepare_s * later:.2f} s of work")
            runs.append(dict(method=method, n=n, layers=args.layers, local_2threads=local2, local_1thread=local1,
                             inline=dict(wall=inline["wall"], driver=driver_s, tasks=inline["tasks"]),
                             ray={str(w): r for w, r in ray_runs.items()}, overhead_per_task=overhead,
                             states=dict(seconds=prepare_s, bytes=inline["state_bytes"], later_phases=later,
                                         recompute_extra_seconds=prepare_s * later),
                             projection={str(k): v for k, v in projection.items()},
                             projection_overhead_in_tasks={str(k): v for k, v in projection_parallel.items()},
                             projection_layers=copies * args.layers, local_2threads_projected=local_full,
                             same_bits=same,
                             same_bits_as_2_threads=local2["digest"] == local1["digest"]))
            rows.append([method, n, f"{local2['seconds']:.2f}", f"{local1['seconds']:.2f}",
                         *(f"{r['steady']:.2f} ({r['steady'] / local2['seconds']:.2f}x)" for r in ray_runs.values()),
                         f"{ray_runs[min(ray_runs)]['start']:.1f} / {ray_runs[min(ray_runs)]['first']:.1f}",
                         len(inline["tasks"]), f"{overhead * 1e3:.1f}", "yes" if same else "NO"])
            say(f"  projection for {copies * args.layers} layers ({copies} x the measured {args.layers}); one process, "
                f"2 threads: {local_full:.1f} s (x{copies} of the measured)")
            say(fmt_table(["N workers (projected)", "s, overhead serial", "vs one process", "s, overhead in tasks",
                           "vs one process"],
                          [[N, f"{v:.2f}", f"{v / local_full:.2f}x", f"{projection_parallel[N]:.2f}",
                            f"{projection_parallel[N] / local_full:.2f}x"] for N, v in projection.items()]))
    workers = list(map(int, args.workers.split(",")))
    say(fmt_table(["method", "n", "local 2 thr s", "local 1 thr s", *(f"ray {w} worker(s) s" for w in workers),
                   "ray start / first merge s", "tasks", "overhead ms/task", "same bits"], rows))
    out = Path(args.out) if args.out else RESULTS / ("results_ray_quick.json" if args.quick else "results_ray.json")
    out.write_text(json.dumps(dict(args=vars(args), runs=runs), indent=1))
    say(f"results: {out}")
    if not all(r["same_bits"] for r in runs):
        raise SystemExit("the Ray merge differs from the single-process merge")


if __name__ == "__main__":
    main()
