"""knots-ext: fast, exact merging of LoRA adapters (KnOTS, TIES, DARE, Task Arithmetic)."""

from . import _C, io, ops
from .engine import MergeResult, MergeSummary, merge, merge_to

__version__ = "0.1.0"


def build_info() -> dict:
    """What was built: the CPU kernels (always), OpenMP threads, whether the CUDA kernels were
    compiled and how many CUDA devices are visible."""
    return dict(_C.build_info())


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use (OpenMP)."""
    _C.set_num_threads(int(n))


__all__ = [
    "MergeResult",
    "MergeSummary",
    "__version__",
    "build_info",
    "io",
    "merge",
    "merge_to",
    "ops",
    "set_num_threads",
]
