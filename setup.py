"""Build script: the package plus the optional C++ extension ``nested_learning._C``.

``NL_BUILD_EXT=0`` skips the extension, ``NL_BUILD_EXT=1`` makes a failed build an error,
the default builds it when torch's C++ toolchain is importable. ``NL_BUILD_CUDA=1`` adds
``csrc/cuda/*.cu`` (needs a CUDA build of torch). ``kernels/`` installs as
``nested_learning.kernels``.
"""

import glob
import os

from setuptools import setup

PACKAGES = ["nested_learning", "nested_learning.kernels"] + [
    "nested_learning." + d for d in ("ops", "reference", "benchmark", "memory", "training", "optimizers", "meta", "models", "data")
]
PACKAGE_DIR = {"nested_learning": "nested_learning", "nested_learning.kernels": "kernels"}


def _extension():
    mode = os.environ.get("NL_BUILD_EXT", "auto").lower()
    if mode in ("0", "false", "no"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "true", "yes"):
            raise
        return [], {}
    cxx = ["-O3", "-fopenmp", "-march=x86-64-v3"] if os.uname().machine == "x86_64" else ["-O3", "-fopenmp"]
    sources = ["csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if os.environ.get("NL_BUILD_CUDA") == "1":
        ext = CUDAExtension(
            "nested_learning._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("nested_learning._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"nested_learning.data": ["corpus/*.txt.gz"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
