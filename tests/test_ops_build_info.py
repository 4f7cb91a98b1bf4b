"""knots_ext.build_info(): the documented keys with the right types."""
import knots_ext


def test_build_info_keys_and_types():
    info = knots_ext.build_info()
    assert isinstance(info, dict)
    assert set(info) >= {"cpu", "openmp_threads", "cuda_compiled", "cuda_devices"}
    assert info["cpu"] is True
    assert type(info["openmp_threads"]) is int and info["openmp_threads"] >= 1
    assert type(info["cuda_compiled"]) is bool
    assert type(info["cuda_devices"]) is int and info["cuda_devices"] >= 0
    if not info["cuda_compiled"]:
        assert info["cuda_devices"] == 0
    # a copy: changing it does not change the next answer
    info["cpu"] = False
    assert knots_ext.build_info()["cpu"] is True


def test_set_num_threads_is_reported(restore_threads):
    knots_ext.set_num_threads(1)
    assert knots_ext.build_info()["openmp_threads"] == 1
    knots_ext.set_num_threads(2)
    assert knots_ext.build_info()["openmp_threads"] == 2
    knots_ext.set_num_threads(0)  # clamped to one thread
    assert knots_ext.build_info()["openmp_threads"] == 1


def test_version():
    assert isinstance(knots_ext.__version__, str) and knots_ext.__version__.count(".") >= 1


def test_cuda_inputs_need_a_scratch_allocator():
    """The CUDA kernels allocate no device memory themselves: a CUDA input without the caller's
    scratch allocator is refused when it is built, before any CUDA call."""
    import pytest

    from knots_ext import _C

    args = dict(ptrs=[1], P=4, stride=1, dtype=0, stream=0, dare_p=0.0, seed=0, tasks=[0], module_id=0,
                elem_offset=0)
    with pytest.raises(ValueError, match="scratch allocator"):
        _C.Input(device=0, **args)
    with pytest.raises(ValueError, match="scratch allocator"):
        _C.FactorInput(P=[1], Q=[1], ranks=[1], scales=[1.0], m=1, c=1, device=0, stream=0, dare_p=0.0, seed=0,
                       tasks=[0], module_id=0, elem_offset=0)
    _C.Input(device=-1, **args)  # host rows need none
