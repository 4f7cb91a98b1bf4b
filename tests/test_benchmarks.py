"""The benchmarks' shared harness (benchmarks/harness.py: timing, peak RSS, child processes) and
the scaling benchmark's quick mode (benchmarks/bench_scale.py --quick): it runs end to end and
writes the figures it promises. No figure is checked against a goal: only that each is there and
sane (positive, consistent with the others)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def allocate(mb: int) -> int:
    """Touches mb MiB in the child (run_child finds this function by its module's name)."""
    block = bytearray(mb << 20)
    return len(block)


def test_child_returns_result_and_peak_rss():
    run = harness.run_child(math.factorial, 10)
    assert run.result == 3628800 and not run.timed_out
    assert run.wall_seconds > 0
    assert run.peak_rss_mb > 0 and run.own_peak_rss_mb > 0
    assert harness.run_child(os.getpid).result != os.getpid()
    assert harness.in_child(math.factorial, 5) == 120


def test_child_own_peak_rss_counts_its_memory():
    run = harness.run_child(allocate, 100)
    assert run.result == 100 << 20
    assert run.own_peak_rss_mb >= 100
    assert run.peak_rss_mb >= run.own_peak_rss_mb - 1  # ru_maxrss: the child's own, or the parent's if larger


def spin(seconds: float) -> int:
    """Keeps one CPU busy in user mode for `seconds` of wall time in the child."""
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        count += 1
    return count


def test_child_cpu_seconds_are_its_own():
    run = harness.run_child(spin, 0.5)
    assert run.result > 0
    assert run.user_seconds >= 0.4  # the spin (and the child's start) on one thread
    assert run.system_seconds >= 0
    assert run.user_seconds + run.system_seconds <= run.wall_seconds * (os.cpu_count() or 1) + 0.5
    idle = harness.run_child(time.sleep, 0.5)
    assert idle.user_seconds < run.user_seconds - 0.3  # sleeping takes no CPU: not the parent's, not the spin's


def test_child_exception_is_raised_in_parent():
    with pytest.raises(ValueError):
        harness.run_child(math.sqrt, -1.0)


def test_child_timeout_stops_it():
    t0 = time.perf_counter()
    run = harness.run_child(time.sleep, 30, timeout=1.0)
    assert run.timed_out and run.result is None
    assert time.perf_counter() - t0 < 20
    assert run.peak_rss_mb > 0


def test_timed_repeats_and_budget():
    times, out = harness.timed(lambda: 7, 3, 10.0)
    assert out == 7 and len(times) == 3 and all(t >= 0 for t in times)
    times, _ = harness.timed(lambda: time.sleep(0.05), 5, 0.01)  # over budget after one run
    assert len(times) == 1
    assert harness.peak_rss_mb() > 0 and harness.vm_hwm_mb() > 0


def test_bench_scale_quick(tmp_path):
    out = tmp_path / "results" / "scale.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_scale.py"), "--quick", "--cache", str(tmp_path / "cache"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "merge_to s" in proc.stdout and "Goals" in proc.stdout
    res = json.loads(out.read_text())
    assert {"config", "env", "adapters", "runs", "goals"} <= set(res)
    cfg = res["config"]
    assert cfg["quick"] and cfg["ns"] == [2, 4] and cfg["layers"] == 1
    methods = {"knots-ties", "ties", "dare-ties"}
    main = [r for r in res["runs"] if r["group"] == "main"]
    large = [r for r in res["runs"] if r["group"] == "large"]
    assert {(r["method"], r["n"]) for r in main} == {(m, n) for m in methods for n in (2, 4)}
    assert {(r["method"], r["n"]) for r in large} == {("ties", 8), ("dare-ties", 8)}
    for r in res["runs"]:
        s = r["stream"]
        assert not s["timed_out"]
        assert s["seconds"] > 0 and s["seconds_32_layers"] == pytest.approx(s["seconds"] * 32 / r["layers"])
        assert 0 < s["rss_after_import_mb"] <= s["peak_rss_mb"]
        assert s["modules"] == 4 * r["layers"]
        assert s["output_bytes"] > 0 and r["read_pass_seconds"] > 0
        assert r["factors_bytes"] > 0 and r["factors_bytes_float32"] == 2 * r["factors_bytes"]
        assert r["ratios"]["vs_read_pass"] > 0
        if r["group"] == "main" and r["n"] == 4:  # the in-memory baseline runs at the largest n in --quick
            m = r["in_memory"]
            assert m["seconds"] > 0 and m["peak_rss_mb"] > 0 and m["output_bytes"] == s["output_bytes"]
            assert m["equal_to_merge_to"]["equal"]
            assert r["ratios"]["vs_in_memory"] > 0
    for method in methods:
        g = res["goals"][method]
        assert g["flat_in_n"]["n_low"] == 2 and g["flat_in_n"]["n_high"] == 4 and g["flat_in_n"]["ratio"] > 0
        assert g["peak_rss"]["n"] == 4 and isinstance(g["peak_rss"]["met"], bool)
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_floor_runs_and_adds_up(tmp_path):
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_floor.py"), "--ns", "2", "--layers", "1", "--repeats", "1",
                           "--cache", str(tmp_path / "cache"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rates, (run,) = res["rates"], res["runs"]
    assert rates["matmul_gflops"] > 0 and rates["write_gb_s"] > 0 and rates["threads"] >= 1
    assert run["n"] == 2 and set(run["bases"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, mod in run["bases"].items():
        assert mod["k"] == 32 and mod["knots_svd_s"] > 0 and mod["eigh_s"] > 0, name  # n r = 32 < every d_out
    assert run["floor_s"] >= run["floor_eigh_only_s"] > 0
    assert run["merge_s"] > 0 and run["merge_over_floor"] == pytest.approx(run["merge_s"] / run["floor_s"])
    assert run["merge_cpu_s"]["user"] > 0 and run["merge_cpu_s"]["system"] >= 0
    assert "goal_s" not in run  # (no goal for n = 2)
    # The floor's arithmetic, on figures chosen by hand: one 8 x 4 module, k = 2, rank 1, n = 2, 3 layers.
    import bench_floor

    bases = {"m": dict(d_out=8, d_in=4, k=2, knots_svd_s=0.5, eigh_s=0.25)}
    got = bench_floor.floor_of(bases, dict(matmul_gflops=1e-9, write_gb_s=1e-9, threads=2), n=2, rank=1, layers=3)
    flops, out_bytes = 2 * 2 * 2 * 4 * 2 * 3, (8 + 4) * 2 * 4 * 3  # passes x n x k x d_in x 2r x layers; output
    assert got["passes_s"] == pytest.approx(flops) and got["output_thread_s"] == pytest.approx(out_bytes)
    assert got["floor_s"] == pytest.approx((1.5 + out_bytes) / 2 + flops)
    assert got["floor_eigh_only_s"] == pytest.approx((0.75 + out_bytes) / 2 + flops)


def test_bench_floor_dare_ties_runs_and_adds_up(tmp_path):
    out = tmp_path / "floor.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_floor.py"), "--method", "dare-ties", "--ns", "2,8",
                           "--layers", "1", "--repeats", "1", "--cache", str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rates, runs = res["rates"], res["runs"]
    assert rates["mask_ns_per_word"] > 0 and 0 < rates["mask_blocks_needed"] <= 1
    assert [r["n"] for r in runs] == [2, 8] and set(runs[0]["shapes"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for r in runs:
        assert r["masks_s"] > 0 and r["floor_s"] == pytest.approx(r["passes_s"] + r["masks_s"])
        assert r["merge_s"] > 0 and r["merge_over_floor"] == pytest.approx(r["merge_s"] / r["floor_s"])
        assert r["merge_cpu_s"]["user"] > 0 and r["merge_cpu_s"]["system"] >= 0
    assert "goal_s" not in runs[0] and runs[1]["goal_s"] == pytest.approx(15.0 / 32)  # (n = 8's goal, for 1 of 32 layers)
    # The arithmetic, on figures chosen by hand: one 8 x 4 module, rank 1, n = 2, 3 layers.
    import bench_floor

    shapes, rates = {"m": dict(d_out=8, d_in=4)}, dict(matmul_gflops=1e-9)
    entries = 8 * 4 * 2 * 3  # d_out x d_in x n x layers
    got = bench_floor.dense_floor_of(shapes, rates, 0.5, n=2, rank=1, layers=3)
    assert got["passes_s"] == pytest.approx(2 * entries * 2) and got["masks_s"] == pytest.approx(2 * entries * 0.5)
    assert got["floor_s"] == pytest.approx(2 * entries * 2 + entries)
    ties = bench_floor.dense_floor_of(shapes, rates, None, n=2, rank=1, layers=3)
    assert ties["masks_s"] == 0 and ties["mask_words_g"] == 0 and ties["floor_s"] == pytest.approx(2 * entries * 2)


def test_bench_ray_quick(tmp_path):
    out = tmp_path / "ray.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_ray.py"), "--quick", "--cache", str(tmp_path / "cache"),
                           "--project", "1,2,4", "--project-layers", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["method"], r["n"]) for r in res["runs"]} == {("knots-ties", 4), ("ties", 4)}
    for r in res["runs"]:
        assert r["same_bits"] and set(r["ray"]) == {"1", "2"}
        assert all(w["same"] and w["steady"] > 0 and w["start"] > 0 for w in r["ray"].values())
        tasks = r["inline"]["tasks"]
        names = [name for _, name, _ in tasks]  # 4 modules: their states, >= 1 round of counts (4 a task), the merge
        assert names[:4] == ["_prepare"] * 4 and names[-4:] == ["_apply"] * 4 and "_count" in names[4:-4]
        assert all(s >= 0 for _, _, s in tasks) and [p for p, _, _ in tasks] == sorted(p for p, _, _ in tasks)
        p = r["projection"]
        assert p["1"] >= p["2"] >= p["4"] > 0  # more workers never take longer in the model
    sys.path.insert(0, str(BENCH))
    import bench_ray

    assert bench_ray.makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0 and bench_ray.makespan([1.0, 1.0, 1.0], 2) == 2.0
    assert bench_ray.makespan([2.0, 2.0], 1) == 4.0


def test_adapt_eval_runs(tmp_path):
    """benchmarks/adapt_eval.py on one target with 2 optimisation steps (its quick mode does all five
    targets with 100): every row, an accuracy within its bootstrap interval, the own adapter well above
    chance."""
    out = tmp_path / "adapt"
    proc = subprocess.run([sys.executable, str(BENCH / "adapt_eval.py"), "--quick", "--tasks", "sms_spam", "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["pool"] == 20
    rows = res["results"]["sms_spam/k=16"]
    assert set(rows) == {"zero-shot", "uniform ta", "uniform ties", "uniform knots-ties", "adaptive-grad",
                         "adaptive-free", "adaptive-grad-random", "adaptive-free-random", "new-lora", "own adapter"}
    for mean, lo, hi in rows.values():
        assert 0.0 <= lo <= mean <= hi <= 1.0
    assert rows["own adapter"][0] > 0.8
    assert (out / "results.md").read_text().count("|") > 20 and (out / "accuracy.png").stat().st_size > 0
    gaps = res["differences"]
    assert len(gaps) == 5 and all(key.endswith("/k=16") for key in gaps)
    for mean, lo, hi in gaps.values():
        assert -1.0 <= lo <= mean <= hi <= 1.0
    # --resume: the kept run is reused, nothing is run again, the same figures come out
    again = subprocess.run([sys.executable, str(BENCH / "adapt_eval.py"), "--quick", "--tasks", "sms_spam",
                            "--steps", "2", "--out", str(out), "--resume"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sms_spam/k=16/seed=0:" in proc.stdout and "sms_spam/k=16/seed=0:" not in again.stdout
    assert json.loads((out / "results.json").read_text())["results"] == res["results"]


def test_adapt_eval_paired_differences():
    """adapt_eval.differences: the mean over targets of the per-target accuracy gaps, and a paired
    interval: one row that only adds correct answers to another lies above 0, equal rows give 0."""
    import numpy as np

    import adapt_eval

    rng = np.random.RandomState(0)
    correct = {}
    for task, n in (("a", 50), ("b", 80)):
        base = rng.rand(3, n) < 0.6
        rows = {r: base.copy() for r in adapt_eval.ROWS}
        rows["adaptive-grad"] = base | (rng.rand(3, n) < 0.3)
        correct[(task, 16)] = rows
    gaps = adapt_eval.differences(correct, [16, 64])
    assert set(gaps) == {f"{a} - {b}/k=16" for a, b in adapt_eval.DIFFERENCES}
    expected = np.mean([(r["adaptive-grad"].astype(float) - r["new-lora"]).mean() for r in correct.values()])
    mean, lo, hi = gaps["adaptive-grad - new-lora/k=16"]
    assert abs(mean - expected) < 1e-12 and 0.0 < lo <= mean <= hi
    assert gaps["uniform knots-ties - uniform ties/k=16"] == (0.0, 0.0, 0.0)
