"""The same merge on a Ray cluster: merge(..., executor="ray") and knots-merge --ray [ADDRESS].

The driver (driver.py, in this process) keeps what is global: the modules' order, TIES's
thresholds, the majority sign and the output. The per-module work runs in Ray tasks: each worker
opens the adapters itself from their paths (every worker must see them: a shared filesystem),
makes a module's space state (a KnOTS SVD), kept in Ray's object store between the passes,
counts the module's task rows for the thresholds and merges it. A threshold round is counted by
the workers into copies of the driver's selection with nothing counted (MagnitudeThreshold.
counting_copy) and added up on the driver: integer counts, so the thresholds are the same bits
as in one process, and so is every kernel's output (independent of where, and with how many
threads, it runs). A worker that dies is replaced and its task run again by Ray.

Ray is optional (pip install 'knots-ext[ray]'). Only the CPU: the workers' kernels run there."""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import driver, factor_ops
from .driver import ModuleRef
from .methods.spaces import zero_update
from .weights import TaskWeights

# A worker that exits before its task is done (killed, out of memory) is replaced and the task
# run again this many times.
RETRIES = 3
# Modules counted per Ray task in a threshold round: each task sends back one copy of the
# selection's histograms (their nonzero bins), so a few modules a task amortise that.
MODULES_PER_COUNT = 4


def import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("executor='ray' needs Ray, which is not installed: pip install 'knots-ext[ray]'") from None
    return ray


@contextmanager
def cluster(address: str | None):
    """Ray, connected: the running one if this process already called ray.init, else the cluster
    at `address` ("host:port"), else (None) a local one started here and stopped at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address:
        _check_reachable(address)
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """One clear line now, instead of Ray's retries, when nothing answers at host:port."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port (or 'auto', or ray://host:port)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Job:
    """What a worker needs to open the merge's inputs itself: plain values (adapter paths, the
    method, its checked parameters, the merge's weights and options)."""

    key: str
    paths: tuple
    method: str
    params: dict
    alpha: float | None
    force: bool
    weights: TaskWeights
    threads: int  # torch's threads in every task: the driver's (see RayPasses)


@dataclass
class Opened:
    """A job as a worker process opened it."""

    method: object  # the Method spec
    params: dict  # its parameters after the method's setup (Gram files opened, ...)
    space: object  # the method's Space, or None
    load: object  # load(ref) -> ModuleTasks


_opened: dict = {}  # in each worker process: Job.key -> Opened


def _open(job: Job):
    """The merge as this worker sees it, opened once per job and worker process."""
    torch.set_num_threads(job.threads)
    if job.key not in _opened:
        from . import engine
        from .device import Placement

        spec, declared, device, adapters, _ = engine._prepare(
            list(job.paths), job.method, dict(job.params), "cpu", job.alpha, job.force, "drop"
        )
        params = engine._setup(spec, declared, adapters)
        space = spec.space(params) if spec.space is not None else None
        _opened.clear()  # (one job at a time: a worker runs the tasks of one merge after another)
        load = engine.module_loader(adapters, job.weights, Placement(device, spec))
        _opened[job.key] = Opened(spec, params, space, load)
    return _opened[job.key]


# The Ray tasks. Plain functions here, made remote by _remote() (Ray is imported only when used).


def _merge_module(job: Job, ref: ModuleRef):
    o = _open(job)
    m = o.load(ref)
    return zero_update(ref) if not m.tasks else driver.merge_module(o.method, o.space, o.params, ref, m)[0]


def _prepare(job: Job, ref: ModuleRef, threads: int | None = None):
    """(the module's state, whether it has tasks, the state's bytes: driver.cpu_state_bytes):
    three objects, so that the driver fetches the small ones only. threads: torch's threads for
    the basis (driver.bases_threads), None: the job's."""
    o = _open(job)
    m = o.load(ref)
    if not m.tasks:
        return None, False, None
    with driver.torch_threads(threads):
        state = o.space.prepare(m)
    return state, True, driver.cpu_state_bytes(state)


def _count(job: Job, refs: list, has_tasks: list, sel, dare_p: float, seed: int, *states):
    o = _open(job)
    counted = set(sel.counted())
    for ref, has, state in zip(refs, has_tasks, states):
        if has and not counted.isdisjoint(ref.tasks):
            m = driver.load_counted(o.space, o.load, ref, counted)
            m = o.load(ref) if m is None else m
            driver.count_rows(sel, counted, ref.name, m.tasks, o.space.row_factors(m, state), dare_p, seed)
    return sel


def _apply(job: Job, ref: ModuleRef, thresholds, lam: float, dare_p: float, seed: int, has_tasks: bool, state):
    """(merged rows, sign sum, zero-sum positions, update) as driver.Passes.apply gives them, but
    the merged rows are sent only for a module whose positions wait for the majority sign."""
    _crash_once_for_tests()
    o = _open(job)
    if not has_tasks:
        return None, 0, [], zero_update(ref)
    m = o.load(ref)
    factors = o.space.row_factors(m, state)
    own = [thresholds[t] for t in m.tasks]
    merged, signs, zero = factor_ops.ties_apply(factors, own, lam, dare_p, seed, ref.name, m.tasks)
    if zero:
        return merged, signs, zero, None
    return None, signs, zero, o.space.update(ref, merged, state)


def _crash_once_for_tests() -> None:
    """The tests' worker failure: with KNOTS_EXT_RAY_CRASH_ONCE set to a path that does not exist
    yet, the first task to get here creates it and its worker process exits at once."""
    marker = os.environ.get("KNOTS_EXT_RAY_CRASH_ONCE")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


_remotes: dict = {}


def _remote(ray, name: str, returns: int = 1):
    if name not in _remotes:
        _remotes[name] = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_returns=returns)(globals()[name])
    return _remotes[name]


class RayPasses(driver.Passes):
    """driver.Passes on a Ray cluster (see the module's docstring). States stay in the object
    store, referenced here, until the module's last pass.

    Every task runs torch with the driver's thread count and asks Ray for as many CPUs (at most
    a node's): torch's float64 GEMMs (the KnOTS basis U = B_cat R^-1 W) round differently with
    another thread count, so the bits are those of the merge in one process with that many
    threads (set torch.set_num_threads, or OMP_NUM_THREADS, in the driver: 1 for the most tasks
    at once). The merge kernels' own results do not depend on threads."""

    def __init__(self, ray, job: Job, space, load, cpus: int | None = None):
        self.ray, self.job, self.space, self.load = ray, job, space, load
        self.cpus = job.threads if cpus is None else cpus
        self.states: dict = {}  # module name -> ObjectRef of its state
        self.has_tasks: dict = {}  # module name -> whether it has tasks

    def _call(self, name: str, *args, returns: int = 1):
        return _remote(self.ray, name, returns).options(num_cpus=self.cpus).remote(self.job, *args)

    def _in_order(self, pending, progress, desc):
        """The results of pending (ref, ObjectRef) in order, each fetched when reached."""
        for ref, result in progress(pending, desc):
            yield ref, self.ray.get(result)

    def updates(self, modules, progress, method, params, pool):
        pending = [(ref, self._call("_merge_module", ref)) for ref in modules]
        yield from self._in_order(pending, progress, method.name)

    def selection(self, modules, n_tasks, top_k, progress, desc):
        from . import ops

        pending = []
        # Each basis with the threads one process would give it (the same bits): the first module
        # with tasks sizes the others' (driver.LocalPasses._bases).
        threads, sized = driver.bases_threads(modules), False
        widest = max((sum(ref.shape) for ref in modules), default=1)
        for ref in modules:
            self.states[ref.name], has, nbytes = self._call("_prepare", ref, threads, returns=3)
            pending.append((ref, has))
            if not sized and self.ray.get(has):
                threads = driver.bases_threads(modules, driver.bases_workers(ref, self.ray.get(nbytes), widest))
                sized = True
        for ref, has in self._in_order(pending, progress, f"{desc}: bases"):
            self.has_tasks[ref.name] = has
        # (the kernels run on the workers' CPUs: the sampled thresholds whenever there are rows)
        return ops.MagnitudeThreshold(n_tasks, top_k, sampled=any(self.has_tasks.values()))

    def count(self, modules, sel, dare_p, seed, progress, desc):
        copy = sel.counting_copy()
        pending = []
        for i in range(0, len(modules), MODULES_PER_COUNT):
            chunk = modules[i : i + MODULES_PER_COUNT]
            has = [self.has_tasks[r.name] for r in chunk]
            states = [self.states[r.name] for r in chunk]
            pending.append((chunk, self._call("_count", chunk, has, copy, dare_p, seed, *states)))
        for _, counted in self._in_order(pending, progress, desc):
            sel.add_counts(counted)

    def apply(self, modules, thresholds, lam, dare_p, seed, pool, progress, desc):
        pending = []
        for ref in modules:
            has, state = self.has_tasks[ref.name], self.states[ref.name]
            pending.append((ref, self._call("_apply", ref, thresholds, lam, dare_p, seed, has, state)))
        for ref, (merged, signs, zero, update) in self._in_order(pending, progress, desc):
            if update is not None:
                del self.states[ref.name]
                yield ref, None, signs, zero, update
            else:  # (the majority fix writes into it: a copy of the object store's read-only bytes)
                yield ref, merged.clone(), signs, zero, None

    def state(self, ref, pop: bool = False):
        return self.ray.get(self.states.pop(ref.name) if pop else self.states[ref.name])

    def factors_of(self, ref, counted: set | None = None):
        m = self.load(ref)
        return m, self.space.row_factors(m, self.state(ref))

    def close(self) -> None:
        self.states.clear()


def passes_for(ray, paths, method: str, declared: dict, alpha, force: bool, weights):
    """driver.run's passes(space, load) for this merge on the connected Ray cluster."""
    threads = torch.get_num_threads()
    paths = tuple(os.fspath(p) for p in paths)
    job = Job(uuid.uuid4().hex, paths, method, dict(declared), alpha, force, weights, threads)
    # (a task asking for more CPUs than any node has would never start)
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=1)
    return lambda space, load: RayPasses(ray, job, space, load, cpus=max(1, min(threads, largest)))


def check_executor(executor: str, device, adapters) -> None:
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        if torch.device(device).type != "cpu":
            raise ValueError(f"executor='ray' merges on the workers' CPUs: device must be 'cpu', got {device!r}")
        memory = [a for a in adapters if getattr(a, "path", None) is None or not os.path.exists(os.fspath(a.path))]
        if memory:
            where = getattr(memory[0], "path", None) or type(memory[0]).__name__
            raise ValueError(f"executor='ray': {where} is an adapter held in memory, not a path the workers can read")
