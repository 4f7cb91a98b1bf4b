"""Array views for the kernels: torch tensors, numpy arrays and CuPy arrays are turned into
(pointer, length, stride, dtype code, device, stream) without copies where possible, and
outputs are allocated by the same library as the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Codes of csrc/common/dtype.h.
F32, F16, BF16 = 0, 1, 2
_ITEMSIZE = {F32: 4, F16: 2, BF16: 2}


def all_finite(t) -> bool:
    """No NaN or Inf in the torch tensor t. A host tensor of a kernel dtype is scanned in one pass
    (_C.widen_f32); otherwise a finite sum proves it (a NaN or an Inf anywhere makes the sum NaN or
    Inf, whatever the order of the additions), and only a sum that came out non-finite --
    possibly an overflow of finite entries -- is checked entry by entry."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    code = _host_code(t)
    if code is not None:
        return not _C().widen_f32(t.data_ptr(), t.numel(), code) & _C().SAW_NONFINITE
    torch = _torch()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def has_zero(t) -> bool:
    """Whether the torch tensor t holds an entry equal to 0 (either sign)."""
    if t.numel() == 0:
        return False
    code = _host_code(t)
    if code is not None:
        return bool(_C().widen_f32(t.data_ptr(), t.numel(), code) & _C().SAW_ZERO)
    return not bool(t.all())


def finite_and_zero(t) -> tuple[bool, bool]:
    """(no NaN or Inf in the torch tensor t, some entry equal to 0), in one pass for a host
    tensor of a kernel dtype."""
    code = _host_code(t)
    if code is None or t.numel() == 0:
        return all_finite(t), has_zero(t)
    return _finite_zero(_C().widen_f32(t.data_ptr(), t.numel(), code))


def _finite_zero(seen: int) -> tuple[bool, bool]:
    """widen_f32's flags as (no NaN or Inf seen, a 0 seen)."""
    return not seen & _C().SAW_NONFINITE, bool(seen & _C().SAW_ZERO)


def float32_checked(t):
    """(t as float32, whether all its entries are finite, whether one equals 0) for a torch
    tensor: a host tensor of a kernel dtype in one pass that converts and checks (a float32 one
    is not copied)."""
    torch = _torch()
    code = _host_code(t)
    if code is None:
        t32 = t.to(torch.float32)
        return (t32, *finite_and_zero(t32))
    t32 = t if code == F32 else torch.empty(t.shape, dtype=torch.float32)
    seen = _C().widen_f32(t.data_ptr(), t.numel(), code, 0 if t32 is t else t32.data_ptr())
    return (t32, *_finite_zero(seen))


_HOST_CODES = {"torch.float32": F32, "torch.float16": F16, "torch.bfloat16": BF16}


def _host_code(t) -> int | None:
    """The kernels' dtype code of a contiguous host (CPU) torch tensor they can read, else None."""
    if t.device.type != "cpu" or not t.is_contiguous():
        return None
    return _HOST_CODES.get(str(t.dtype))


_ext = None


def _C():
    """The compiled extension, imported on first use (it is not needed to build views)."""
    global _ext
    if _ext is None:
        from . import _C as ext

        _ext = ext
    return _ext


def _torch():
    import torch

    return torch


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _is_cupy(x) -> bool:
    return type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


@dataclass
class Flat:
    """One array seen as a 1-D run of elements: data pointer, length, element stride."""

    array: object  # kept alive while the kernel runs
    ptr: int
    numel: int
    stride: int
    dtype: int
    device: int  # -1: host memory, else CUDA ordinal
    lib: str

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]


def _dtype_code(name: str, what: str) -> int:
    codes = {"float32": F32, "float16": F16, "bfloat16": BF16}
    if name not in codes:
        raise TypeError(f"{what}: dtype {name} is not supported (use float32, float16 or bfloat16)")
    return codes[name]


def _flat_stride(shape, strides) -> int | None:
    """The element stride if the array is one evenly strided run, else None."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 1
    stride = dims[-1][1]
    expected = stride
    for n, s in reversed(dims):
        if s != expected:
            return None
        expected = s * n
    return stride


def flat(x, what: str = "input") -> Flat:
    """The 1-D view of any array (copied to contiguous only if it is not one strided run)."""
    if _is_torch(x):
        torch = _torch()
        name = str(x.dtype).replace("torch.", "")
        code = _dtype_code(name, what)
        stride = _flat_stride(x.shape, x.stride())
        if stride is None or stride <= 0:
            x = x.contiguous()
            stride = 1
        device = x.device.index if x.device.type == "cuda" else -1
        if x.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{what}: device {x.device} is not supported (cpu or cuda)")
        if device is None:
            device = torch.cuda.current_device()
        return Flat(x, x.data_ptr(), x.numel(), stride, code, device, "torch")
    if _is_cupy(x):
        code = _dtype_code(str(x.dtype), what)
        stride = _flat_stride(x.shape, [s // x.itemsize for s in x.strides])
        if stride is None or stride <= 0 or any(s % x.itemsize for s in x.strides):
            x = x.copy()
            stride = 1
        return Flat(x, x.data.ptr, x.size, stride, code, x.device.id, "cupy")
    if isinstance(x, np.ndarray):
        code = _dtype_code(str(x.dtype), what)
        stride = _flat_stride(x.shape, [s // x.itemsize for s in x.strides])
        if stride is None or stride <= 0 or any(s % x.itemsize for s in x.strides):
            x = np.ascontiguousarray(x)
            stride = 1
        return Flat(x, x.ctypes.data, x.size, stride, code, -1, "numpy")
    raise TypeError(f"{what}: expected a torch tensor, numpy array or CuPy array, got {type(x).__name__}")


_DTYPE_NAMES = {F32: "float32", F16: "float16", BF16: "bfloat16"}


def out_view(out, ref: Flat) -> Flat:
    """`out` as the kernels write it: ref.numel elements of ref's dtype on ref's device, laid out
    contiguously in row-major order (any shape). Checked on `out` itself and never copied: the
    kernels write at its pointer, so a copy's layout would say nothing about where they write."""
    if _is_torch(out):
        lib, dtype, contiguous, writeable = "torch", str(out.dtype).replace("torch.", ""), out.is_contiguous(), True
        device = {"cpu": -1, "cuda": out.device.index}.get(out.device.type, -2)  # -2: unsupported
        numel, strides = out.numel(), tuple(out.stride())
    elif _is_cupy(out) or isinstance(out, np.ndarray):
        lib = "cupy" if _is_cupy(out) else "numpy"
        dtype, contiguous, writeable = str(out.dtype), out.flags.c_contiguous, out.flags.writeable
        device = out.device.id if lib == "cupy" else -1
        numel, strides = out.size, tuple(s // out.itemsize for s in out.strides)
    else:
        raise TypeError(f"out: expected a torch tensor, numpy array or CuPy array, got {type(out).__name__}")
    problems = [
        problem
        for problem, bad in [
            (f"{numel} elements", numel != ref.numel),
            (f"dtype {dtype}", dtype != _DTYPE_NAMES[ref.dtype]),
            (f"on {_device_name(device, out)}", device != ref.device),
            (f"not contiguous (element strides {strides})", not contiguous),
            ("read-only", not writeable),
        ]
        if bad
    ]
    if problems:
        raise ValueError(
            f"out must be a contiguous (row-major) writable array of {ref.numel} elements, dtype "
            f"{_DTYPE_NAMES[ref.dtype]}, on {_device_name(ref.device)}; got: {', '.join(problems)}"
        )
    return Flat(out, data_ptr(out), numel, 1, ref.dtype, device, lib)


def _device_name(device: int, array=None) -> str:
    if device == -2:
        return str(array.device)
    return "cpu" if device < 0 else f"cuda:{device}"


def rows_of(x, what: str = "x") -> list[Flat]:
    """The task rows of a 2-D (n, P) array, or of a sequence of arrays with equal numel."""
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{what}: no arrays given")
        rows = [flat(a, f"{what}[{i}]") for i, a in enumerate(x)]
    else:
        shape = tuple(x.shape)
        if len(shape) != 2:
            raise ValueError(f"{what}: expected shape (n_tasks, P), got {shape}")
        if shape[0] == 0:
            raise ValueError(f"{what}: no tasks (shape {shape})")
        rows = [flat(x[i], f"{what}[{i}]") for i in range(shape[0])]
    first = rows[0]
    for i, r in enumerate(rows):
        if r.numel != first.numel:
            raise ValueError(f"{what}: row {i} has {r.numel} elements, row 0 has {first.numel}")
        if r.dtype != first.dtype:
            raise TypeError(f"{what}: row {i} has another dtype than row 0")
        if r.device != first.device or r.lib != first.lib:
            raise ValueError(f"{what}: row {i} is on another device or library than row 0")
    if len({r.stride for r in rows}) != 1:
        rows = [flat(_contiguous(r.array), f"{what}[{i}]") for i, r in enumerate(rows)]
    return rows


def _contiguous(a):
    if _is_torch(a):
        return a.contiguous().reshape(-1)
    if _is_cupy(a):
        import cupy

        return cupy.ascontiguousarray(a).reshape(-1)
    return np.ascontiguousarray(a).reshape(-1)


def empty_like_rows(ref: Flat, shape):
    """A contiguous output of `shape`, in ref's library, device and dtype."""
    if ref.lib == "torch":
        torch = _torch()
        dt = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[ref.dtype]
        dev = "cpu" if ref.device < 0 else f"cuda:{ref.device}"
        return torch.empty(shape, dtype=dt, device=dev)
    if ref.lib == "cupy":
        import cupy

        with cupy.cuda.Device(ref.device):
            return cupy.empty(shape, dtype={F32: cupy.float32, F16: cupy.float16}[ref.dtype])
    return np.empty(shape, dtype={F32: np.float32, F16: np.float16}[ref.dtype])


def data_ptr(out) -> int:
    if _is_torch(out):
        return out.data_ptr()
    if _is_cupy(out):
        return out.data.ptr
    return out.ctypes.data


def current_stream(ref: Flat) -> int:
    """The caller's current CUDA stream on ref's device (0 for host arrays)."""
    if ref.device < 0:
        return 0
    if ref.lib == "torch":
        return _torch().cuda.current_stream(ref.device).cuda_stream
    import cupy

    with cupy.cuda.Device(ref.device):
        return cupy.cuda.get_current_stream().ptr


class KernelStream:
    """The CUDA stream one kernel call runs on (`stream`, a handle; None: the current stream of
    ref's library), ordered against that library's current stream, and the call's device scratch.

    Inputs are copied and outputs allocated on the current stream, and the caller reads the
    output there: when the kernel stream is another one, entering makes it wait for the work
    queued so far on the current stream, and leaving makes the current stream wait for the
    kernels (events, on the device: the host does not block). Scratch (`alloc`, called by the
    kernels through _C) is allocated by ref's library in the kernel stream's order (torch's
    caching allocator, CuPy's pool), kept until leaving, then freed: only work queued after the
    kernels on that stream can reuse it. Host arrays need none of this (no-ops, no scratch)."""

    def __init__(self, ref: Flat, stream: int | None = None):
        self.ref = ref
        self._blocks: list = []
        self._kernel: Any = None  # the kernel stream's object where it is not the current stream
        self._current: Any = None
        if ref.device < 0:
            self.ptr = 0
            return
        from . import _C

        if not _C.build_info()["cuda_compiled"]:
            raise RuntimeError("a CUDA array was given but knots_ext was built without CUDA")
        current = current_stream(ref)
        self.ptr = current if stream is None else int(stream)
        if ref.lib == "torch":
            torch = _torch()
            self._current = torch.cuda.current_stream(ref.device)
            if self.ptr != current:
                self._kernel = torch.cuda.ExternalStream(self.ptr, device=torch.device("cuda", ref.device))
        else:
            import cupy

            with cupy.cuda.Device(ref.device):
                self._current = cupy.cuda.get_current_stream()
                if self.ptr != current:
                    self._kernel = cupy.cuda.ExternalStream(self.ptr, ref.device)

    @property
    def scratch(self):
        """The allocator the kernels get (None for host arrays)."""
        return None if self.ref.device < 0 else self.alloc

    def alloc(self, nbytes: int) -> int:
        """Device memory of nbytes on ref's device, in the kernel stream's order; its address."""
        if self.ref.lib == "torch":
            torch = _torch()
            with torch.cuda.device(self.ref.device), torch.cuda.stream(self._kernel or self._current):
                block = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=f"cuda:{self.ref.device}")
            ptr = block.data_ptr()
        else:
            import cupy

            with cupy.cuda.Device(self.ref.device), self._kernel or self._current:
                block = cupy.empty(max(int(nbytes), 1), dtype=cupy.uint8)
            ptr = block.data.ptr
        self._blocks.append(block)
        return ptr

    def _wait(self, waiter, producer) -> None:
        if self.ref.lib == "torch":
            waiter.wait_stream(producer)
        else:
            import cupy

            with cupy.cuda.Device(self.ref.device):
                waiter.wait_event(producer.record())

    def __enter__(self) -> KernelStream:
        if self._kernel is not None:
            self._wait(self._kernel, self._current)
        return self

    def __exit__(self, *exc) -> None:
        if self._kernel is not None:
            self._wait(self._current, self._kernel)
        self._blocks.clear()
