"""The CPU kernels' instruction-set paths (csrc/cpu/dispatch.cpp): a portable baseline and, on
x86-64, AVX2 and AVX-512 paths chosen at run time. Every path this CPU has gives the baseline's
bits, KNOTS_EXT_CPU_PATH picks a path at import, and build_info() says which one runs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import _C, ops

from conftest import randn_rows, zero_sum_data


@pytest.fixture
def restore_path():
    before = knots_ext.build_info()["cpu_path"]
    yield before
    _C.set_cpu_path(before)


def on_each_path(run):
    """run() on the baseline path, then on every other path this CPU has."""
    paths = knots_ext.build_info()["cpu_paths"]
    if len(paths) < 2:
        pytest.skip(f"this build has one CPU path only ({paths})")
    results = []
    for name in paths:
        _C.set_cpu_path(name)
        assert knots_ext.build_info()["cpu_path"] == name
        results.append(run())
    return results


def same_bits(a, b) -> bool:
    """Results equal bit for bit: tensors by their bits, floats by their float32 bits."""
    if isinstance(a, torch.Tensor):
        as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_bits(u, v) for u, v in zip(a, b))
    if isinstance(a, float):
        return np.float32(a).tobytes() == np.float32(b).tobytes()
    return a == b


def test_build_info_reports_the_cpu_path():
    info = knots_ext.build_info()
    assert info["cpu_path"] in info["cpu_paths"]
    assert info["cpu_paths"][0] == "baseline"
    assert isinstance(info["cpu_arch"], str) and info["cpu_arch"]
    with pytest.raises(ValueError, match="CPU path 'avx9000' is not available"):
        _C.set_cpu_path("avx9000")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paths_bit_identical(restore_path, dtype):
    x = randn_rows(5, 150_001, seed=1, dtype=dtype)  # over the sample size: bracketed thresholds
    xq = zero_sum_data(3, 60_001, majority=1, seed=2)[0].to(dtype)
    strided = randn_rows(3, 2 * 40_000, seed=3, dtype=dtype)[:, ::2]
    dare = dict(dare_p=0.3, seed=7, module="layers.0.v", elem_offset=5)

    def run():
        out = [ops.ties_merge(x, 0.2, -0.7, return_thresholds=True),
               ops.ties_merge(xq, 0.5, 1.3, return_thresholds=True),
               ops.ties_merge(strided, 0.05),
               ops.ties_merge(x, 0.1, 0.9, return_thresholds=True, **dare),
               ops.magnitude_threshold(x, 0.03),
               ops.magnitude_threshold(x, 0.03, **dare),
               ops.task_arithmetic(x, 0.37, weights=[1.3, -0.7, 2.1, 0.55, -1.9]),
               ops.task_arithmetic(x, 1.1, **dare),
               ops.dare(x[3], 0.45, 11, task=3, module="m")]
        applied, sign_sum, positions = ops.ties_apply(xq, out[1][1], 1.3)
        ops.ties_fix_majority(xq, applied, out[1][1], positions, sign_sum, 1.3)
        return out + [applied, sign_sum, positions]

    baseline, *others = on_each_path(run)
    for name, other in zip(knots_ext.build_info()["cpu_paths"][1:], others):
        for i, (a, b) in enumerate(zip(baseline, other)):
            assert same_bits(a, b), f"result {i} differs between the baseline and the {name} path"


def test_env_var_picks_the_path_at_import():
    for name in knots_ext.build_info()["cpu_paths"]:
        got = subprocess.run([sys.executable, "-c", "import knots_ext; print(knots_ext.build_info()['cpu_path'])"],
                             env={**os.environ, "KNOTS_EXT_CPU_PATH": name}, capture_output=True, text=True)
        assert got.returncode == 0 and got.stdout.strip() == name, got.stderr
    bad = subprocess.run([sys.executable, "-c", "import knots_ext"], env={**os.environ, "KNOTS_EXT_CPU_PATH": "fast"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "CPU path 'fast' is not available" in bad.stderr
