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
