"""benchmarks/gpu_check.sh and benchmarks/bench_gpu.py on the CPU, so that the GPU check cannot rot
before a GPU machine runs it: the dry run names every step with its time box, bad arguments are
one line, the device check outside pytest fails where there is no GPU (a CPU-only machine cannot
pass it), and the benchmark runs every measurement at toy sizes on the CPU and writes its files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BENCH = ROOT / "benchmarks" / "bench_gpu.py"


def run(*args, env=None, timeout=300):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_parses_and_dry_run_names_every_step(tmp_path):
    assert run("bash", "-n", SCRIPT).returncode == 0
    out = tmp_path / "out"
    done = run("bash", SCRIPT, "--dry-run", "--out-dir", out)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for step in ("[env]", "[build]", "[check]", "[tests]", "[bench]"):
        line = next(l for l in text.splitlines() if step in l)
        assert "timeout" in line, line
    build = next(l for l in text.splitlines() if "[build]" in l)
    assert "KNOTS_EXT_CUDA=1" in build and "CUDAARCHS=90" in build
    assert "pip install" in build and "--no-build-isolation --no-deps" in build and build.endswith(" -e .")
    assert "-m pytest" in text and "-m cuda" in text
    assert f"bench_gpu.py --out-dir {out}" in text
    assert 'info["cuda_compiled"]' in text and 'info["cuda_devices"] < 1' in text  # the check outside pytest
    assert "knots-ties n = 64: 32 layers" in text and "ties n = 1000: 2 layers" in text  # the benchmark's plan
    assert not out.exists()  # a dry run writes nothing
    archs = run("bash", SCRIPT, "--dry-run", "--step", "build", env={"CUDAARCHS": "100"})
    assert "CUDAARCHS=100 " in archs.stdout and "[tests]" not in archs.stdout


@pytest.mark.parametrize("args", [["--bogus"], ["--out-dir"], ["--step", "nope"]])
def test_script_bad_arguments_are_one_line(args):
    done = run("bash", SCRIPT, *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "gpu_check.sh: error" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check passes there")
def test_device_check_fails_without_a_gpu(tmp_path):
    """The check that runs outside pytest: without a device it fails, so a machine (or build)
    where every CUDA test would be skipped cannot pass the GPU check."""
    done = run("bash", SCRIPT, "--step", "check", "--out-dir", tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[check] FAILED" in done.stdout and "sees no CUDA device" in (tmp_path / "gpu_check_check.log").read_text()
    assert "[check] FAILED" in (tmp_path / "gpu_check_summary.txt").read_text()


def test_bench_tiny_run_writes_every_measurement(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = run(sys.executable, BENCH, "--tiny", "--device", "cpu", "--repeats", "2", "--merge-repeats", "1",
               "--out-dir", out, "--work", work, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["copy"]["gb_per_s"] > 0 and results["copy"]["bytes_moved"] == 2 * (8 << 20)
    kernels = {r["kernel"].split(" ")[0]: r for r in results["kernels"]}
    assert set(kernels) == {"ties_merge", "ties_apply", "task_arithmetic", "DARE-TA", "DARE-TIES",
                            "magnitude_threshold"}
    for r in kernels.values():
        assert r["seconds"] > 0 and len(r["times"]) == 2
        assert r["fraction_of_copy"] == pytest.approx(r["gb_per_s"] / results["copy"]["gb_per_s"])
    assert kernels["magnitude_threshold"]["read_passes"] > 0
    merges = results["merges"]
    assert [(m["method"], m["n"]) for m in merges] == [("knots-ties", 3), ("ties", 12)]
    for m in merges:
        assert m["gpu_seconds"] > 0 and m["cpu_seconds_subsample"] > 0 and m["gpu_seconds_subsample"] > 0
        scale = m["layers"] / m["cpu_layers"]
        assert m["cpu_seconds_extrapolated"] == pytest.approx(m["cpu_seconds_subsample"] * scale)
        assert m["speedup_extrapolated"] == pytest.approx(m["cpu_seconds_extrapolated"] / m["gpu_seconds"])
        assert m["max_rel_diff_gpu_vs_cpu"] <= 1e-6  # the same merge in two processes
    table = (out / "gpu_results.md").read_text()
    assert "| ties n = 12 | 2 |" in table and "EXTRAPOLATED" in table and "Goals of issue 12" in table
    assert {p.name for p in out.iterdir()} == {"gpu_results.json", "gpu_results.md"}
