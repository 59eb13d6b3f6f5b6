"""Builds fastad._C: C++/OpenMP CPU kernels always, CUDA kernels when torch is a
CUDA build and nvcc is found (FASTAD_NO_CUDA=1 skips them)."""
import glob
import os


def _find_cuda_home():
    # torch guesses CUDA_HOME from `which nvcc`, which is wrong for wrapper scripts
    # such as /usr/local/bin/nvcc; prefer the toolkit folder that holds the headers.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for candidate in ("/usr/local/cuda", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = candidate
            return


_find_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTAD_NO_CUDA") != "1"

cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch >= 2.14)
if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: Ampere (PTX for anything newer), Hopper and Blackwell SASS.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0+PTX;9.0;10.0;12.0"
    ext = CUDAExtension(
        "fastad._C",
        cpu_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("FASTAD_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "fastad._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
