"""Builds knots_ext._C with CMake + Ninja. KNOTS_EXT_CUDA=0/1/auto turns the CUDA kernels off,
forces them on, or builds them when nvcc is found (the default). KNOTS_EXT_CPU_ARCH sets -march
for the CPU kernels (default: portable, x86-64-v2 plus an AVX2 path chosen at run time).
CMAKE_ARGS (split like a shell) is passed to the configure step last, so it can override any
of these, e.g. CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=89-real"."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def configure_command(out_dir, environ=os.environ) -> list:
    """The cmake configure command line for an extension written to out_dir."""
    import pybind11

    cuda = {"0": "OFF", "off": "OFF", "1": "ON", "on": "ON"}.get(
        environ.get("KNOTS_EXT_CUDA", "auto").lower(), "AUTO")
    return [
        "cmake", str(ROOT), "-G", "Ninja",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DKNOTS_EXT_CUDA={cuda}",
        # always passed, so a reused build folder forgets an earlier value
        f"-DKNOTS_EXT_CPU_ARCH={environ.get('KNOTS_EXT_CPU_ARCH', '')}",
        "-DCMAKE_BUILD_TYPE=Release",
        *shlex.split(environ.get("CMAKE_ARGS", "")),
    ]


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(configure_command(out_dir), cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("knots_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
