"""The merge device (cpu or cuda[:N]) and a GPU merge's module-by-module traffic.

A GPU merge holds one module's working set on the device at a time, as the CPU merge does in host
memory. Each module's factors are read on the host (zero updates dropped there, so that nothing is
sent for them and no device sync decides it), packed into one pinned host buffer and sent with one
non-blocking copy on torch's current stream; the custom kernels and torch.linalg (cuSOLVER) run on
that stream. Each merged update goes back with non-blocking copies into pinned host memory and is
handed on one module later, so that the host's work for the next module (reading its factors,
queueing its kernels) and the previous module's copy back overlap. Before a module is sent, an
estimate of its working set is compared with the device's free memory: a module that cannot fit is
refused with one line naming it and the memory it needs (DeviceMemoryError, a ValueError)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from . import _C
from .methods.spaces import ModuleTasks

# Offsets of the tensors packed into one staging buffer: a multiple of every element size, and of
# the 256 bytes CUDA aligns its own allocations to (full-width loads in the kernels).
PACK_ALIGN = 256
# Room for what the estimate does not itemise: cuBLAS / cuSOLVER workspaces, the caching
# allocator's rounding, the kernels' small per-call buffers.
SLACK_BYTES = 64 << 20
# The CUDA threshold pass counts 64 tasks per launch into 2^16 uint32 bins each
# (csrc/cuda/histogram.cuh: kMaxSlots, csrc/common/magnitude_select.h: kRound0Bins).
HISTOGRAM_TASKS, HISTOGRAM_BINS = 64, 1 << 16


class DeviceMemoryError(ValueError):
    """A module's merge does not fit in the device's free memory."""


def check_device(device, needs_kernels: bool) -> torch.device:
    """The merge device, or a one-line ValueError: unknown names, CUDA without a device or without
    the CUDA build of the kernels (needs_kernels: the method runs them)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r} is not supported (cpu or cuda)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device on this machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if needs_kernels and not _C.build_info()["cuda_compiled"]:
        raise ValueError(
            f"device {device!r}: knots_ext was built without its CUDA kernels "
            "(reinstall with KNOTS_EXT_CUDA=1 where nvcc is available)"
        )
    return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)


# ------------------------------------------------------------------------------ memory


def working_set_bytes(method, shape: Sequence[int], ranks: Sequence[int]) -> int:
    """An estimate, meant as an upper bound, of the device memory one module's merge takes: its
    float32 factors, what the method's space or rule computes (DESIGN.md §1: the factored SVD's
    float64 QR factors and k x k core, the merged rows, a dense m x c result, RegMean's d_in x d_in
    Grams and solve), and the threshold pass's histograms. shape is (d_out, d_in), ranks the
    ranks of the tasks that take part; k = sum(ranks)."""
    d_out, d_in = (int(d) for d in shape)
    k, n = sum(int(r) for r in ranks), len(ranks)
    f32, f64 = 4, 8
    factors = f32 * (d_out + d_in) * k
    histograms = f32 * min(n, HISTOGRAM_TASKS) * HISTOGRAM_BINS
    space = getattr(method.space, "name", None)
    # A float64 QR of a tall d x k matrix holds its input, a working copy and Q: 3 d k.
    if space == "dense":  # the merged row is the d_out x d_in update
        work = f32 * d_out * d_in + histograms
    elif space == "knots":  # QR of B_cat, the A_i, the core and its SVD (float64); U and the merged rows (float32)
        work = f64 * (3 * d_out * k + k * d_in + 4 * k * k) + f32 * (d_out * k + 2 * k * d_in) + histograms
    elif space == "core":  # QR + SVD of [s_i B_i] and [A_i]^T (float64); the task cores' factors, the merged core
        work = f64 * (3 * (d_out + d_in) * k + 4 * k * k) + f32 * ((d_out + d_in) * k + 2 * k * k) + histograms
    else:  # a rule on the factors: float64 QR of the concatenated factors and SVDs of k x k cores
        work = f64 * (3 * (d_out + d_in) * k + 4 * k * k)
        if "grams" in method.param_names:  # sum of Grams, a shrunk Gram, the LU copy, pinv's SVD fallback
            work += f64 * (6 * d_in * d_in + 2 * k * d_in)
    return int(1.1 * (factors + work)) + SLACK_BYTES


def free_bytes(device: torch.device) -> int | None:
    """Memory a merge can still take on `device`: for CUDA the device's free memory plus what
    torch's caching allocator holds unused; None for the host (not checked: the host merge
    holds one module's working set, like the GPU merge, and the OS says when memory runs out)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _too_large(m: ModuleTasks, ranks: list, method, device, need: int, free: int | None) -> DeviceMemoryError:
    what = f"about {format_bytes(need)}" + ("" if free is None else f", {format_bytes(free)} free")
    return DeviceMemoryError(
        f"module {m.name}: merging it with {method.name} on {device} takes {what} "
        f"({len(ranks)} adapters, total rank {sum(ranks)}, {m.shape[0]} x {m.shape[1]}); "
        "merge on the CPU (--device cpu), or with fewer adapters or a larger GPU"
    )


# ------------------------------------------------------------------------------ host -> device


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each tensor lies in a packed byte buffer: (byte offset, dtype, shape) per tensor."""

    entries: tuple
    nbytes: int


def pack(tensors: Sequence[torch.Tensor], pin: bool) -> tuple[torch.Tensor, PackedLayout]:
    """The tensors copied into one uint8 host buffer (pinned if pin), each at a PACK_ALIGN-aligned
    offset, and the layout that unpack() reads them back with."""
    entries, offset = [], 0
    for t in tensors:
        entries.append((offset, t.dtype, tuple(t.shape)))
        offset += -(-t.numel() * t.element_size() // PACK_ALIGN) * PACK_ALIGN
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    layout = PackedLayout(tuple(entries), offset)
    for t, view in zip(tensors, unpack(buffer, layout)):
        view.copy_(t)
    return buffer, layout


def unpack(buffer: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Views of `buffer` (a packed uint8 buffer on any device) as the tensors of `layout`."""
    views = []
    for offset, dtype, shape in layout.entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        views.append(buffer[offset : offset + size].view(dtype).view(shape))
    return views


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on `device`: for CUDA one pinned staging buffer and one non-blocking copy on
    the current stream, the results views of one device buffer. The pinned buffer goes back to
    torch's caching host allocator when dropped, which reuses it only once the copy has run (the
    copy records an event on it), so it is safe to drop at once. Tensors not all on the host (an
    in-memory adapter's, already on a GPU) are moved one by one."""
    if device.type != "cuda" or any(t.device.type != "cpu" for t in tensors):
        return [t.to(device) for t in tensors]
    staged, layout = pack(tensors, pin=True)
    return unpack(staged.to(device, non_blocking=True), layout)


# ------------------------------------------------------------------------------ device -> host


def _tensor_fields(update) -> list[str]:
    return [f.name for f in dataclasses.fields(update) if isinstance(getattr(update, f.name), torch.Tensor)]


class HostResults:
    """emit(ref, update) with the update's tensors on the host, one module late: each update from
    the device is copied with non-blocking copies into pinned buffers on the current stream and
    handed on when the next one arrives (or at flush), after its copy has completed. The handed
    tensors are ordinary host memory (copied out of the pinned buffers, which are reused module
    after module), so pinned memory stays bounded whatever the caller keeps."""

    def __init__(self, emit: Callable, device: torch.device):
        self.emit, self.device = emit, device
        self.pending: tuple | None = None

    def __call__(self, ref, update) -> None:
        pinned = {}
        for name in _tensor_fields(update):
            t = getattr(update, name)
            if t.device.type == "cuda":
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
            pinned[name] = t
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        previous, self.pending = self.pending, (ref, dataclasses.replace(update, **pinned), done)
        if previous is not None:
            self._hand_on(*previous)

    def flush(self) -> None:
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._hand_on(*previous)

    def _hand_on(self, ref, update, done) -> None:
        done.synchronize()
        fields = {name: getattr(update, name) for name in _tensor_fields(update)}
        self.emit(ref, dataclasses.replace(update, **{k: v.clone() if v.is_pinned() else v for k, v in fields.items()}))


# ------------------------------------------------------------------------------ the merge's placement


class Placement:
    """Where a merge runs: load(m) takes a module's tasks (host factors) to the device, checking
    that its working set fits; results(emit) is the context in which the driver runs, yielding
    the emit it calls (updates handed to `emit` on the host, in order)."""

    def __init__(self, device: torch.device, method):
        self.device, self.method = device, method
        # The module on the device now, as errors name it: without its factors (only their ranks),
        # which would otherwise stay alive until the next module is loaded.
        self.current: tuple[ModuleTasks, list] | None = None

    def load(self, m: ModuleTasks) -> ModuleTasks:
        """m (factors on the host, zero updates already dropped) on the merge device."""
        ranks = [int(A.shape[0]) for _, A in m.factors]
        self.current = (dataclasses.replace(m, factors=[]), ranks)
        if not m.tasks:
            return m
        need = working_set_bytes(self.method, m.shape, ranks)
        free = free_bytes(self.device)
        if free is not None and need > free:
            raise _too_large(m, ranks, self.method, self.device, need, free)
        if self.device.type != "cuda":
            return m
        flat = to_device([t for pair in m.factors for t in pair], self.device)
        factors = list(zip(flat[0::2], flat[1::2]))
        return ModuleTasks(m.name, m.tasks, factors, m.scales, m.shape)

    @contextlib.contextmanager
    def results(self, emit: Callable) -> Iterator[Callable]:
        if self.device.type != "cuda":
            yield emit
            return
        host = HostResults(emit, self.device)
        try:
            with torch.cuda.device(self.device):
                yield host
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory() from None
        except RuntimeError as e:  # the kernels' own allocations report CUDA's "out of memory"
            if "out of memory" not in str(e):
                raise
            raise self._out_of_memory() from None
        host.flush()

    def _out_of_memory(self) -> DeviceMemoryError:
        if self.current is None or not self.current[0].tasks:
            return DeviceMemoryError(f"the merge ran out of memory on {self.device}: merge on the CPU (--device cpu)")
        m, ranks = self.current
        need = working_set_bytes(self.method, m.shape, ranks)
        return _too_large(m, ranks, self.method, self.device, need, free_bytes(self.device))
