"""Builds the optional C++ extension hetero._native (metadata lives in pyproject.toml).

No native-architecture flag and no global AVX-512 flag: the AVX2 and AVX-512 kernels are separate translation units
that enable their ISA with `#pragma GCC target`, and the module picks one at run time from CPU flags.
If the build fails, hetero still installs and the host backend falls back to numba (with a warning).
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext = Pybind11Extension(
    "hetero._native",
    sources=sorted(glob("csrc/*.cpp") + glob("csrc/*/*.cpp")),
    include_dirs=["csrc"],
    # headers and the per-ISA kernel bodies (.inc): an in-place rebuild after editing only these must recompile
    depends=sorted(glob("csrc/*/*.h") + glob("csrc/*/*.inc")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno"],
    extra_link_args=["-pthread"],
)
ext.optional = True  # a failed compile must not fail the install

setup(ext_modules=[ext])
