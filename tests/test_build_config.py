"""The build's configure step (setup.py and CMakeLists.txt), without compiling: CMAKE_ARGS is
passed through split like a shell, a user's CMAKE_CUDA_ARCHITECTURES is kept, and machines
other than x86-64 get no x86 flags."""
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
HAVE_CMAKE = shutil.which("cmake") is not None and shutil.which("ninja") is not None


@pytest.fixture(scope="module")
def configure_command():
    """setup.py's configure_command, loaded without running setup()."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(setuptools, "setup", lambda **kw: None)
        return runpy.run_path(str(ROOT / "setup.py"))["configure_command"]


def configure(command, build_dir):
    done = subprocess.run(command, cwd=build_dir, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, (build_dir / "build.ninja").read_text()


def test_cmake_args_passed_last_split_like_a_shell(configure_command):
    env = {"CMAKE_ARGS": '-DCMAKE_CUDA_ARCHITECTURES="86-real;89-real"  -DSOME_PATH="/a b/c"',
           "KNOTS_EXT_CPU_ARCH": "native", "KNOTS_EXT_CUDA": "0"}
    command = configure_command("/out", env)
    assert command[-2:] == ["-DCMAKE_CUDA_ARCHITECTURES=86-real;89-real", "-DSOME_PATH=/a b/c"]
    assert "-DKNOTS_EXT_CPU_ARCH=native" in command and "-DKNOTS_EXT_CUDA=OFF" in command
    default = configure_command("/out", {})
    assert "-DKNOTS_EXT_CPU_ARCH=" in default and "-DKNOTS_EXT_CUDA=AUTO" in default  # portable, CUDA if found
    assert default[-1] == "-DCMAKE_BUILD_TYPE=Release"


@pytest.mark.skipif(not HAVE_CMAKE or shutil.which("nvcc") is None, reason="needs cmake, ninja and nvcc")
def test_user_cuda_architectures_kept(configure_command, tmp_path):
    env = {"KNOTS_EXT_CUDA": "1", "CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=86-real"}
    log, ninja = configure(configure_command(tmp_path / "out", env), tmp_path)
    assert "knots_ext: CUDA architectures 86-real" in log
    assert "sm_86" in ninja and "sm_80" not in ninja and "sm_90" not in ninja


@pytest.mark.skipif(not HAVE_CMAKE, reason="needs cmake and ninja")
def test_non_x86_build_has_no_x86_flags(configure_command, tmp_path):
    """Configured as for an aarch64 machine: the compiler's default target, one CPU path."""
    env = {"KNOTS_EXT_CUDA": "0", "CMAKE_ARGS": "-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64"}
    log, ninja = configure(configure_command(tmp_path / "out", env), tmp_path)
    assert "knots_ext: CPU kernels for default; AVX2 and AVX-512 paths chosen at run time: OFF" in log
    assert "-march" not in ninja and "avx2" not in ninja and "avx512" not in ninja


@pytest.mark.skipif(not HAVE_CMAKE, reason="needs cmake and ninja")
def test_portable_x86_build_flags(configure_command, tmp_path):
    env = {"KNOTS_EXT_CUDA": "0", "CMAKE_ARGS": "-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=x86_64"}
    log, ninja = configure(configure_command(tmp_path / "out", env), tmp_path)
    assert "-march=x86-64-v2" in ninja and "-ffp-contract=off" in ninja and "-march=native" not in ninja
    assert "knots_ext: CPU kernels for x86-64-v2;" in log  # plus the AVX2 and AVX-512 paths with GCC
