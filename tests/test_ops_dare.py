"""DARE: Philox4x32-10 known-answer vectors, and ops.dare against the mask written in Python from
the contract (DESIGN.md §1): key = dare_key(seed, task, module_id(module)), counter =
(idx / 4 low 32 bits, idx / 4 high 32 bits, 0, 0), word = philox(...)[idx % 4], keep iff
word >= floor(p * 2^32), kept values times float32(1 / (1 - p))."""
import math

import numpy as np
import pytest
import torch

import knots_ext
from knots_ext import ops

from conftest import bits32, dare_keep_mask, dare_ref32, fnv1a64, philox4x32_10_np

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answers(ctr, key, expected):
    assert tuple(knots_ext._C.philox4x32_10(list(ctr), list(key))) == expected
    # the tests' own numpy Philox (used for the masks below) passes the same vectors
    assert tuple(int(v) for v in philox4x32_10_np(*ctr, *key)) == expected


def test_philox_numpy_matches_extension_on_random_counters():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 2 ** 32, size=(4, 64), dtype=np.uint64)
    k = rng.integers(0, 2 ** 32, size=2).tolist()
    mine = philox4x32_10_np(c[0], c[1], c[2], c[3], k[0], k[1])
    for i in range(64):
        got = knots_ext._C.philox4x32_10([int(v) for v in c[:, i]], k)
        assert tuple(got) == tuple(int(w[i]) for w in mine)


def test_module_id_is_fnv1a64():
    # published FNV-1a 64-bit test vectors
    assert ops.module_id("") == 0xCBF29CE484222325
    assert ops.module_id("a") == 0xAF63DC4C8601EC8C
    assert ops.module_id("foobar") == 0x85944171F73967E8
    for name in ("model.layers.0.self_attn.q_proj", "lm_head", "ü"):
        assert ops.module_id(name) == fnv1a64(name)
    assert ops.module_id(12345) == 12345
    with pytest.raises(TypeError):
        ops.module_id(-1)
    with pytest.raises(TypeError):
        ops.module_id(2 ** 64)


def check_dare(x, p, seed, task=0, module="", elem_offset=0):
    out = ops.dare(x, p, seed, task=task, module=module, elem_offset=elem_offset)
    assert out.shape == x.shape and out.dtype == x.dtype
    expected = dare_ref32(x, p, seed, task, module, elem_offset)
    if x.dtype == torch.float32:
        np.testing.assert_array_equal(bits32(out.reshape(-1)), bits32(expected))
    else:  # stored in the input's dtype: the float32 result rounded to nearest even
        assert torch.equal(out.reshape(-1), expected.to(x.dtype))
    return out


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.3333])
@pytest.mark.parametrize("elem_offset", [0, 1, 4095, 2 ** 34 + 3, 2 ** 40 + 2])
def test_dare_equals_independent_mask(p, elem_offset):
    g = torch.Generator().manual_seed(int(p * 100) + elem_offset % 1000)
    x = torch.randn(5003, generator=g)
    out = check_dare(x, p, seed=42, task=3, module="layers.1.v_proj", elem_offset=elem_offset)
    kept = int((out != 0).sum())
    assert 0 < kept < x.numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dare_half_dtypes(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 77, generator=g).to(dtype)
    check_dare(x, 0.3, seed=9, task=1, module="k_proj", elem_offset=13)


def test_dare_shapes_layouts_numpy():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 41, generator=g)
    check_dare(x, 0.6, seed=1, task=2, module="m")
    # a transposed view: element i is element i of the array in row-major (logical) order
    xt = torch.randn(41, 30, generator=g).T
    out = ops.dare(xt, 0.6, 1, task=2, module="m")
    np.testing.assert_array_equal(bits32(out.reshape(-1)), bits32(dare_ref32(xt.contiguous(), 0.6, 1, 2, "m")))
    xn = np.random.default_rng(5).standard_normal((17, 19)).astype(np.float32)
    outn = ops.dare(xn, 0.25, 8, task=0, module="np")
    assert isinstance(outn, np.ndarray) and outn.shape == (17, 19) and outn.dtype == np.float32
    np.testing.assert_array_equal(outn.reshape(-1).view(np.uint32), bits32(dare_ref32(xn, 0.25, 8, 0, "np")))


def test_dare_same_mask_for_any_chunking():
    g = torch.Generator().manual_seed(6)
    P = 100_003
    x = torch.randn(P, generator=g)
    p, seed, task, module, base = 0.45, 2024, 5, "mlp.up_proj", 10
    whole = ops.dare(x, p, seed, task=task, module=module, elem_offset=base)
    np.testing.assert_array_equal(bits32(whole), bits32(dare_ref32(x, p, seed, task, module, base)))
    for cuts in ([0, 1, 2, 3, 7, 4097, 50_001, P], [0, 33_333, 66_667, P], [0, 9, P - 5, P]):
        parts = [ops.dare(x[a:b], p, seed, task=task, module=module, elem_offset=base + a)
                 for a, b in zip(cuts[:-1], cuts[1:])]
        np.testing.assert_array_equal(bits32(torch.cat(parts)), bits32(whole))


def test_dare_same_mask_for_thread_counts(restore_threads):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200_001, generator=g)
    expected = bits32(dare_ref32(x, 0.5, 11, 1, "o", 3))
    for threads in (1, 2):
        knots_ext.set_num_threads(threads)
        assert knots_ext.build_info()["openmp_threads"] == threads
        out = ops.dare(x, 0.5, 11, task=1, module="o", elem_offset=3)
        np.testing.assert_array_equal(bits32(out), expected)


def test_dare_different_streams_differ():
    x = torch.ones(4096)
    base = dict(seed=1, task=0, module="a")
    masks = {}
    for name, kw in {"base": base, "seed": dict(base, seed=2), "task": dict(base, task=1),
                     "module": dict(base, module="b"), "module_id": dict(base, module=7)}.items():
        out = ops.dare(x, 0.5, kw["seed"], task=kw["task"], module=kw["module"])
        keep = (out != 0).numpy()
        np.testing.assert_array_equal(keep, dare_keep_mask(4096, 0.5, kw["seed"], kw["task"], kw["module"]))
        masks[name] = keep
    for name, keep in masks.items():
        if name != "base":
            # independent masks agree on about half the elements; identical masks on all of them
            assert 0.4 < float((keep == masks["base"]).mean()) < 0.6, name


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_keep_rate(p):
    N = 1 << 20
    out = ops.dare(torch.ones(N), p, seed=123, task=4, module="rate")
    kept = int((out != 0).sum())
    sigma = math.sqrt(N * p * (1 - p))
    assert abs(kept - N * (1 - p)) <= 4 * sigma, (kept, N * (1 - p), sigma)
    # kept values are exactly float32(1 / (1 - p))
    scale = float(np.float32(1.0 / (1.0 - p)))
    assert set(torch.unique(out).tolist()) == {0.0, scale}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dare_p0_is_identity(dtype):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5000, generator=g).to(dtype)
    out = ops.dare(x, 0.0, seed=5, task=2, module="id")
    assert out.dtype == dtype and torch.equal(out, x)


def test_dare_p_just_below_one_and_tiny():
    x = torch.randn(8192, generator=torch.Generator().manual_seed(9))
    check_dare(x, 1e-9, seed=3)  # drop_below = 4: almost everything kept
    check_dare(x, 0.999, seed=3)


def test_dare_bad_arguments():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="dare_p"):
        ops.dare(x, 1.0)
    with pytest.raises(ValueError, match="dare_p"):
        ops.dare(x, -0.1)
    with pytest.raises(ValueError, match="seed"):
        ops.dare(x, 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        ops.dare(x, 0.5, seed=2 ** 64)
    with pytest.raises(ValueError, match="task"):
        ops.dare(x, 0.5, task=-1)
    with pytest.raises(TypeError, match="dtype"):
        ops.dare(x.double(), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        ops.dare(torch.arange(10), 0.5)
    y = x.clone()
    y[3] = math.nan
    with pytest.raises(ValueError, match="NaN|Inf"):
        ops.dare(y, 0.5)
