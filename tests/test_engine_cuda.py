"""The GPU merge path (knots_ext.device, engine's device="cuda").

On the CPU: the staging buffers' layout, the one-line refusal of a module that does not fit (the
free-memory query monkeypatched), and --device cuda without the CUDA build. Marked cuda (skipped
without a GPU, run by benchmarks/gpu_check.sh): every method merged on the GPU equals the same
merge on the CPU (the dense-space methods bit for bit, the others to 1e-6 relative: their bases
come from cuSOLVER instead of LAPACK), for fp32 / fp16 / bf16 adapters; thresholds and DARE masks
bit for bit (masks also against the independent numpy Philox of conftest); merges on a side stream;
CuPy factors; the CLI; the memory estimate against the measured peak; out-of-memory named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import knots_ext
from knots_ext import cli, device, factor_ops, io, ops
from knots_ext.methods import METHODS
from knots_ext.methods.knots import KnotsSpace
from knots_ext.methods.spaces import DenseSpace, DenseUpdate, FactoredUpdate, ModuleTasks, zero_update

from conftest import dare_keep_mask
from merge_refs import (SHAPES, close, read_updates, ref_global_ties, ref_knots, write_adapter,
                        write_random_grams)

DENSE_METHODS = sorted(n for n, m in METHODS.items() if getattr(m.space, "name", None) == "dense")


def method_params(name: str, grams=None) -> dict:
    """Parameters exercising each method: a trim, DARE, Grams and a lam other than 1."""
    names = METHODS[name].param_names
    params: dict = {}
    if "top_k" in names:
        params["top_k"] = 0.3
    if "dare_p" in names:
        params.update(dare_p=0.4, seed=7)
    if "grams" in names:
        params["grams"] = grams
    if "lam" in names:
        params["lam"] = 0.9
    return params


def write_set(root, dtype=torch.float32):
    """Four adapters: mixed ranks, rslora, one all-zero (absent from every module's merge), and
    a Gram file each."""
    paths = [write_adapter(root / "a0", 4, 8, seed=1, dtype=dtype),
             write_adapter(root / "a1", {"self_attn.q_proj": 2, "self_attn.v_proj": 6, "mlp.down_proj": 3}, 16,
                           seed=2, rslora=True, dtype=dtype),
             write_adapter(root / "a2", 8, 8, seed=3, dtype=dtype),
             write_adapter(root / "a3", 4, 8, seed=4, zero=True, dtype=dtype)]
    grams = []
    for i in range(len(paths)):
        write_random_grams(root / f"g{i}.safetensors", seed=20 + i)
        grams.append(root / f"g{i}.safetensors")
    return paths, grams


def first_module(paths) -> str:
    return sorted(read_updates(paths[0]))[0]


# ---------------------------------------------------------------------------------- CPU


def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 3, generator=gen), torch.randn(5, 9, generator=gen).to(torch.bfloat16),
               torch.randn(6, 4, generator=gen).T, torch.empty(4, 0), torch.randn(1, generator=gen).half(),
               torch.randn(3, 3, generator=gen, dtype=torch.float64)]
    buffer, layout = device.pack(tensors, pin=False)
    assert buffer.dtype == torch.uint8 and buffer.numel() == layout.nbytes
    views = device.unpack(buffer, layout)
    for t, v in zip(tensors, views):
        assert v.dtype == t.dtype and v.shape == t.shape and v.is_contiguous() and torch.equal(v, t)
    ends = [off + t.numel() * t.element_size() for (off, _, _), t in zip(layout.entries, tensors)]
    starts = [off for off, _, _ in layout.entries]
    assert all(s % device.PACK_ALIGN == 0 for s in starts)
    assert all(end <= nxt for end, nxt in zip(ends, starts[1:])) and ends[-1] <= layout.nbytes
    buffer.zero_()  # the views are the buffer, not copies
    assert all(not bool(v.any()) for v in views)
    assert device.to_device(tensors, torch.device("cpu"))[0] is tensors[0]


def test_placement_on_the_cpu_moves_nothing():
    B, A = torch.randn(6, 2), torch.randn(2, 5)
    m = ModuleTasks("mod", [0], [(B, A)], [1.0], (6, 5))
    placement = device.Placement(torch.device("cpu"), METHODS["knots-ties"])
    assert placement.load(m) is m
    with placement.results(print) as deliver:
        assert deliver is print


def test_working_set_estimate_covers_what_the_module_must_hold():
    """Lower bounds written from the algorithms: the float32 factors plus the merged update (dense
    space), the float64 B_cat and its Q (KnOTS), a d_in x d_in float64 Gram (RegMean)."""
    shape, ranks = (4096, 1024), [16] * 8
    k, factors = sum(ranks), 4 * (4096 + 1024) * sum(ranks)
    assert device.working_set_bytes(METHODS["ties"], shape, ranks) >= factors + 4 * 4096 * 1024
    assert device.working_set_bytes(METHODS["knots-ties"], shape, ranks) >= factors + 2 * 8 * 4096 * k
    assert device.working_set_bytes(METHODS["regmean"], shape, ranks) >= factors + 2 * 8 * 1024 * 1024
    small = device.working_set_bytes(METHODS["knots-ties"], shape, [16] * 2)
    assert small < device.working_set_bytes(METHODS["knots-ties"], shape, ranks)  # grows with n


def test_module_that_does_not_fit_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    paths, _ = write_set(tmp_path)
    name = first_module(paths)
    monkeypatch.setattr(device, "free_bytes", lambda dev: 1 << 20)
    with pytest.raises(device.DeviceMemoryError) as e:
        knots_ext.merge(paths, method="knots-ties", top_k=0.5)
    msg = str(e.value)
    assert f"module {name}:" in msg and "1.0 MiB free" in msg and "MiB" in msg.split("takes about")[1]
    assert "\n" not in msg and isinstance(e.value, ValueError)
    out = tmp_path / "out"
    code = cli.main([*map(str, paths), "-o", str(out), "--method", "ties", "--top-k", "0.3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"module {name}:" in err[0] and "free" in err[0], err
    assert not out.exists()
    # the comparison itself: a module fits with exactly its estimate free, not with a byte less
    ranks = {"self_attn.q_proj": [4, 2, 8], "self_attn.v_proj": [4, 6, 8], "mlp.down_proj": [4, 3, 8]}  # a3 is absent
    need = {mod: device.working_set_bytes(METHODS["ties"], SHAPES[mod], r) for mod, r in ranks.items()}
    largest = max(need, key=need.get)
    monkeypatch.setattr(device, "free_bytes", lambda dev: need[largest])
    knots_ext.merge(paths, method="ties", top_k=0.3)
    monkeypatch.setattr(device, "free_bytes", lambda dev: need[largest] - 1)
    with pytest.raises(device.DeviceMemoryError, match=f"{largest}: "):
        knots_ext.merge(paths, method="ties", top_k=0.3)


def test_device_cuda_without_the_cuda_build_is_one_line(tmp_path, monkeypatch, capsys):
    """A machine with a GPU but a CPU-only build of the kernels (simulated): exit 2, one line."""
    paths, _ = write_set(tmp_path)
    info = dict(knots_ext._C.build_info(), cuda_compiled=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(knots_ext._C, "build_info", lambda: info)
    out = tmp_path / "out"
    code = cli.main([*map(str, paths), "-o", str(out), "--method", "knots-ties", "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "without its CUDA kernels" in err[0] and "KNOTS_EXT_CUDA=1" in err[0]
    assert not out.exists()


# ---------------------------------------------------------------------------------- CUDA


def cuda_dev() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("knots_ext sees a CUDA device but this torch build has no CUDA support")
    return torch.device("cuda", 0)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, what
    differ = int((got.contiguous().view(torch.int32) != want.contiguous().view(torch.int32)).sum())
    assert differ == 0, f"{what}: {differ} positions differ in their bits between CUDA and the CPU"


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str):
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    scale = float(want.double().abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def on_host(result) -> bool:
    return all(t.device.type == "cpu" and not t.is_pinned() for u in result.modules.values()
               for t in ((u.B, u.A) if isinstance(u, FactoredUpdate) else (u.W,)))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_cuda_equals_the_cpu_merge(tmp_path, method, dtype):
    cuda_dev()
    paths, grams = write_set(tmp_path, dtype)
    params = method_params(method, grams)
    cpu = knots_ext.merge(paths, method=method, device="cpu", **params)
    gpu = knots_ext.merge(paths, method=method, device="cuda", **params)
    assert sorted(gpu.modules) == sorted(cpu.modules) and on_host(gpu)
    for name in cpu.modules:
        if method in DENSE_METHODS:  # the same factored kernels on the same rows: the same bits
            assert_same_bits(gpu.delta(name), cpu.delta(name), f"{method} {name}")
        else:
            assert_close_rel(gpu.delta(name), cpu.delta(name), 1e-6, f"{method} {name}")


@pytest.mark.cuda
def test_cuda_merges_match_the_float64_references(tmp_path):
    cuda_dev()
    paths, _ = write_set(tmp_path)
    updates = [read_updates(p) for p in paths[:3]]  # the zero adapter is absent
    names = sorted(updates[0])
    shapes = {n: tuple(updates[0][n].shape) for n in names}
    ta = knots_ext.merge(paths, method="ta", lam=0.7, device="cuda")
    ties = knots_ext.merge(paths, method="ties", top_k=0.3, device="cuda")
    knots = knots_ext.merge(paths, method="knots-ties", top_k=0.3, device="cuda")
    want_ties = ref_global_ties(updates, names, shapes, 0.3, 1.0)
    U, reps = ref_knots(updates, names)
    want_knots = ref_global_ties(reps, names, {n: tuple(reps[0][n].shape) for n in names}, 0.3, 1.0)
    for name in names:
        close(ta.delta(name), 0.7 * sum(u[name] for u in updates), 1e-5, f"ta {name}")
        close(ties.delta(name), want_ties[name], 1e-5, f"ties {name}")
        close(knots.delta(name), U[name] @ want_knots[name], 1e-4, f"knots-ties {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("space", [DenseSpace, KnotsSpace], ids=["dense", "knots"])
def test_cuda_thresholds_and_dare_masks_are_the_cpu_bits(tmp_path, space):
    dev = cuda_dev()
    adapters = [io.load_adapter(write_adapter(tmp_path / f"a{i}", 6, 12, seed=i, layers=1)) for i in range(3)]
    name = sorted(adapters[0].modules)[0]
    m = ModuleTasks(name, [0, 1, 2], [a.factors(name) for a in adapters], [a.scale(name) for a in adapters],
                    adapters[0].shape(name))
    sp = space({"tol": 1e-5})
    rows_cpu = sp.row_factors(m, sp.prepare(m))  # the same rows on both devices
    rows_gpu = [(P.to(dev), Q.to(dev), s) for P, Q, s in rows_cpu]
    tasks = [0, 5, 2]
    for p in (0.0, 0.4):
        thresholds = []
        for rows in (rows_cpu, rows_gpu):
            sel = ops.MagnitudeThreshold(3, 0.3)
            while not sel.done:
                factor_ops.histogram(sel, rows, p, 11, name, tasks, slots=[0, 1, 2])
                sel.finish_round()
            thresholds.append(sel.thresholds())
        assert thresholds[0] == thresholds[1], f"p={p}: CPU {thresholds[0]} != CUDA {thresholds[1]}"
    for j, t in enumerate(tasks):  # DARE: one task's row, kept entries rescaled, dropped ones 0
        dared = [factor_ops.weighted_sum([rows[j]], [1.0], 0.4, 11, name, [t]).cpu()
                 for rows in (rows_cpu, rows_gpu)]
        assert_same_bits(dared[1], dared[0], f"DARE row of task {t}")
        plain = factor_ops.weighted_sum([rows_cpu[j]], [1.0], 0.0, 0, name, [t]).reshape(-1)
        keep = torch.from_numpy(dare_keep_mask(plain.numel(), 0.4, 11, t, name))
        assert torch.equal(dared[1].reshape(-1) != 0, keep & (plain != 0))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ties", "knots-dare-ties", "core-ties", "tsv-m"])
def test_cuda_merge_on_a_side_stream(tmp_path, method):
    dev = cuda_dev()
    paths, grams = write_set(tmp_path)
    params = method_params(method, grams)
    default = knots_ext.merge(paths, method=method, device="cuda", **params)
    stream = torch.cuda.Stream(device=dev)
    assert stream.cuda_stream != torch.cuda.default_stream(dev).cuda_stream
    with torch.cuda.stream(stream):
        side = knots_ext.merge(paths, method=method, device="cuda", **params)
    assert on_host(side)  # handed on only once its copies had run: nothing left to wait for
    for name in default.modules:
        assert_same_bits(side.delta(name), default.delta(name), f"{method} {name} on a side stream")


@pytest.mark.cuda
def test_cuda_host_results_are_handed_on_one_module_late_in_order():
    dev = cuda_dev()
    got = []
    host = device.HostResults(lambda ref, u: got.append((ref, u)), dev)
    B, A, W = torch.randn(8, 3), torch.randn(3, 5), torch.randn(4, 6)
    host("m0", FactoredUpdate(B.to(dev), A.to(dev)))
    assert got == []
    host("m1", DenseUpdate(W.to(dev)))
    host("m2", zero_update(type("Ref", (), {"shape": (4, 6)})()))
    assert [r for r, _ in got] == ["m0", "m1"]
    host.flush()
    assert [r for r, _ in got] == ["m0", "m1", "m2"]
    assert torch.equal(got[0][1].B, B) and torch.equal(got[0][1].A, A) and torch.equal(got[1][1].W, W)
    assert all(t.device.type == "cpu" and not t.is_pinned() for _, u in got[:2] for t in vars(u).values())


@pytest.mark.cuda
def test_cuda_factor_ops_take_cupy_factors():
    cupy = pytest.importorskip("cupy")
    cuda_dev()
    gen = torch.Generator().manual_seed(3)
    factors = [(torch.randn(48, r, generator=gen), torch.randn(r, 40, generator=gen), s)
               for r, s in ((3, 0.5), (5, 2.0), (2, -1.0))]
    as_cupy = [(cupy.asarray(P.numpy()), cupy.asarray(Q.numpy()), s) for P, Q, s in factors]
    cupy.cuda.Device(0).synchronize()
    thresholds = [0.3, 0.5, 0.2]
    for p in (0.0, 0.3):
        want = factor_ops.ties_apply(factors, thresholds, 0.8, p, 9, "cupy.m", [0, 1, 2])
        got = factor_ops.ties_apply(as_cupy, thresholds, 0.8, p, 9, "cupy.m", [0, 1, 2])
        assert got[0].device.type == "cuda"
        assert_same_bits(got[0].cpu(), want[0], f"ties_apply p={p}")
        assert got[1] == want[1] and list(got[2]) == list(want[2])
        ws = factor_ops.weighted_sum(as_cupy, [1.0, 0.5, -2.0], p, 9, "cupy.m", [0, 1, 2])
        assert_same_bits(ws.cpu(), factor_ops.weighted_sum(factors, [1.0, 0.5, -2.0], p, 9, "cupy.m", [0, 1, 2]),
                         f"weighted_sum p={p}")


@pytest.mark.cuda
def test_cli_device_cuda_writes_the_cpu_result(tmp_path, capsys):
    cuda_dev()
    paths, _ = write_set(tmp_path)
    outs = {}
    for method in ("ties", "knots-ties"):
        for dev in ("cpu", "cuda"):
            out = tmp_path / f"{method}-{dev}"
            assert cli.main([*map(str, paths), "-o", str(out), "--method", method, "--top-k", "0.3",
                             "--device", dev, "--quiet"]) == 0, capsys.readouterr().err
            outs[method, dev] = load_file(str(out / "adapter_model.safetensors"))
    assert outs["ties", "cpu"].keys() == outs["ties", "cuda"].keys()
    for key, t in outs["ties", "cpu"].items():
        assert torch.equal(outs["ties", "cuda"][key], t), key
    cpu, gpu = outs["knots-ties", "cpu"], outs["knots-ties", "cuda"]
    for key in (k for k in cpu if k.endswith(".lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        assert_close_rel(gpu[b_key].double() @ gpu[key].double(), cpu[b_key].double() @ cpu[key].double(), 1e-6, key)


@pytest.mark.cuda
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_working_set_estimate_bounds_the_measured_peak(tmp_path, method):
    """One large module merged on the GPU: the peak of torch's allocations during the merge stays
    within device.working_set_bytes of that module."""
    cuda_dev()
    shape, n, r = ((1024, 1024), 4, 8) if method == "regmean" else ((2048, 1536), 24, 16)
    modules = {"self_attn.q_proj": shape}
    paths = [write_adapter(tmp_path / f"a{i}", r, 2 * r, seed=i, layers=1, modules=modules) for i in range(n)]
    grams = []
    if method == "regmean":
        for i in range(n):
            write_random_grams(tmp_path / f"g{i}.safetensors", layers=1, modules=modules, seed=i)
            grams.append(tmp_path / f"g{i}.safetensors")
    params = method_params(method, grams)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    knots_ext.merge(paths, method=method, device="cuda", **params)
    peak = torch.cuda.max_memory_allocated() - before
    estimate = device.working_set_bytes(METHODS[method], shape, [r] * n)
    assert 0 < peak <= estimate, f"{method}: measured {peak} bytes, estimated {estimate}"


@pytest.mark.cuda
def test_cuda_module_that_does_not_fit_by_the_device_query(tmp_path, monkeypatch):
    cuda_dev()
    paths, _ = write_set(tmp_path)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 1 << 36))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    with pytest.raises(device.DeviceMemoryError) as e:
        knots_ext.merge(paths, method="knots-ties", device="cuda")
    assert f"module {first_module(paths)}:" in str(e.value) and "on cuda:0" in str(e.value)
    assert "1.0 MiB free" in str(e.value)


@pytest.mark.cuda
def test_cuda_out_of_memory_names_the_module(tmp_path, monkeypatch):
    cuda_dev()
    paths, _ = write_set(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(factor_ops, "ties_apply", out_of_memory)
    with pytest.raises(device.DeviceMemoryError) as e:
        knots_ext.merge(paths, method="ties", top_k=0.3, device="cuda")
    assert f"module {first_module(paths)}:" in str(e.value) and "\n" not in str(e.value)

