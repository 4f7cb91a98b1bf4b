"""Builds knots_ext._C with CMake + Ninja. KNOTS_EXT_CUDA=0/1/auto turns the CUDA kernels off,
forces them on, or builds them when nvcc is found (the default). KNOTS_EXT_CPU_ARCH sets
-march for the CPU kernels (default: native)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = {"0": "OFF", "off": "OFF", "1": "ON", "on": "ON"}.get(
            os.environ.get("KNOTS_EXT_CUDA", "auto").lower(), "AUTO")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DKNOTS_EXT_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("KNOTS_EXT_CPU_ARCH"):
            configure.append(f"-DKNOTS_EXT_CPU_ARCH={os.environ['KNOTS_EXT_CPU_ARCH']}")
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("knots_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
