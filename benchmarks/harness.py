"""The benchmarks' shared harness: timing, peak RSS, child processes, the environment line, the
printed output, and the folder the results go to. Standard library only (no torch), so that a
benchmark's parent process can stay small while its children measure.

Peak RSS, two figures (MiB):
  peak_rss_mb()  ru_maxrss of getrusage. On Linux a child started from a parent inherits the
                 parent's ru_maxrss at its exec (vfork/fork + exec keeps the larger of the two):
                 a child of a parent that once held 1.5 GB reports >= 1.5 GB however little it
                 uses. Figures built on it are increases within one process (after - before).
  vm_hwm_mb()    VmHWM of /proc/<pid>/status: the peak RSS of the process's own address space
                 since its exec, nothing inherited: a child's own peak.

Child processes: run_child(fn, *args) runs fn(*args) in a fresh Python (the interpreter running
this one, same sys.path; fn a module-level function, also of the __main__ script) and returns a
ChildRun: fn's result, the child's wall time, its ru_maxrss and CPU seconds (user, system)
from os.wait4, its own peak (VmHWM when fn returned), or timed_out with the peak so far.
in_child(fn, *args) returns the result only. The child's stdout and stderr are the parent's."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"  # every benchmark's result files


# ----------------------------------------------------------------------------------------------
# timing and memory

def timed(fn, repeats: int, budget_s: float, between=None):
    """Runs fn up to `repeats` times (at least once, and again only while the total stays under
    budget_s); returns (list of seconds, the last result). `between(result)` runs untimed before
    each repeat (e.g. to drop the previous result)."""
    times, out = [], None
    while True:
        if out is not None and between is not None:
            between(out)
        out = None
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= repeats or sum(times) + min(times) > budget_s:
            return times, out


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    """ru_maxrss in MiB (Linux reports KiB); includes what a child inherited at its exec."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def vm_hwm_mb(pid="self") -> float | None:
    """Peak RSS of a process's own address space so far (VmHWM in /proc), in MiB, or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rel_err(x, ref) -> tuple[float, float]:
    """(max |x - ref| / max |ref|, ||x - ref||_F / ||ref||_F) of two torch tensors, in float64."""
    x, ref = x.double(), ref.double()
    diff = x - ref
    return (float(diff.abs().max() / ref.abs().max().clamp_min(1e-300)),
            float(diff.norm() / ref.norm().clamp_min(1e-300)))


# ----------------------------------------------------------------------------------------------
# child processes

@dataclass
class ChildRun:
    result: Any = None
    wall_seconds: float = 0.0  # start of the Python process to its exit (or to the kill)
    peak_rss_mb: float | None = None  # ru_maxrss from os.wait4 (includes the parent's, see above)
    own_peak_rss_mb: float | None = None  # the child's VmHWM when fn returned (or when killed)
    timed_out: bool = False
    # CPU seconds of the child (its threads together, its start included) from os.wait4: in user
    # mode, and in the kernel on its behalf (page faults, the page cache of the files it writes)
    user_seconds: float | None = None
    system_seconds: float | None = None


def child_setup():
    """Quiets warnings in a child process (call it first in a job)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _target(fn) -> dict:
    """How the child finds fn: its module by name, or the __main__ script by its file."""
    if fn.__module__ == "__main__":
        return dict(main_file=os.path.abspath(sys.modules["__main__"].__file__), name=fn.__qualname__)
    return dict(module=fn.__module__, name=fn.__qualname__)


def run_child(fn, *args, timeout: float | None = None) -> ChildRun:
    """Runs fn(*args) in a fresh Python process; see the module docstring. An exception in fn
    is raised here again (with the child's traceback printed by the child); a child still running
    after `timeout` seconds is killed and comes back as timed_out, with its peak RSS so far."""
    with tempfile.TemporaryDirectory(prefix="bench_child_") as tmp:
        spec, out = Path(tmp) / "spec.pkl", Path(tmp) / "out.pkl"
        spec.write_bytes(pickle.dumps(dict(sys_path=list(sys.path), target=_target(fn),
                                           args=pickle.dumps(args))))
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(spec), str(out)])
        try:
            while True:  # os.wait4 (not Popen.wait) so that the child's own rusage comes back
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    hwm = vm_hwm_mb(proc.pid)
                    proc.kill()
                    _, status, usage = os.wait4(proc.pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    return ChildRun(wall_seconds=time.perf_counter() - t0, timed_out=True,
                                    peak_rss_mb=max(hwm or 0.0, usage.ru_maxrss / 1024.0), own_peak_rss_mb=hwm,
                                    user_seconds=usage.ru_utime, system_seconds=usage.ru_stime)
                time.sleep(0.05)
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if not out.exists():
            raise RuntimeError(f"child running {fn.__qualname__} died (exit {proc.returncode}) without a result")
        sys.modules.setdefault("__mp_main__", sys.modules["__main__"])  # classes of the script, as the child named it
        ok, value, own_peak = pickle.loads(out.read_bytes())
        if not ok:
            raise value
        return ChildRun(result=value, wall_seconds=wall, peak_rss_mb=usage.ru_maxrss / 1024.0,
                        own_peak_rss_mb=own_peak, user_seconds=usage.ru_utime, system_seconds=usage.ru_stime)


def in_child(fn, *args):
    """Runs fn(*args) in a fresh Python process and returns its result."""
    return run_child(fn, *args).result


def _child_main(spec_path: str, out_path: str) -> None:
    spec = pickle.loads(Path(spec_path).read_bytes())
    sys.path[:] = spec["sys_path"]
    target = spec["target"]
    if "main_file" in target:  # the parent's script, imported as multiprocessing's spawn does
        mod_spec = importlib.util.spec_from_file_location("__mp_main__", target["main_file"])
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules["__mp_main__"] = sys.modules["__main__"] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target["module"])
    fn = module
    for part in target["name"].split("."):
        fn = getattr(fn, part)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C stops the child with the parent
    try:
        result = (True, fn(*pickle.loads(spec["args"])), vm_hwm_mb())
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        traceback.print_exc()
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001
            e = RuntimeError(f"{type(e).__name__}: {e}")
        result = (False, e, vm_hwm_mb())
    tmp = out_path + ".part"
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, out_path)


# ----------------------------------------------------------------------------------------------
# environment and output

def environment() -> dict:
    """Versions, threads, CPUs and the load average at the start (imports torch and knots_ext)."""
    import torch

    import knots_ext
    return dict(python=platform.python_version(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                cpus=os.cpu_count(), knots_ext=knots_ext.__version__, build=knots_ext.build_info(),
                loadavg_start=os.getloadavg(), machine=platform.machine())


def warn_if_busy(env: dict) -> None:
    if env["loadavg_start"][0] > (env["cpus"] or 1):
        say("warning: the machine is busy (load average above the CPU count): times are noisy")


_T0 = time.perf_counter()


def say(*a):
    print(*a, flush=True)


def log(*a):
    """Progress, with the time since the start."""
    print(f"[{time.perf_counter() - _T0:6.1f} s]", *a, flush=True)


def fmt_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child_main(sys.argv[2], sys.argv[3])
