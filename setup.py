"""Builds memcore._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Install with `pip install --no-build-isolation .` so the build sees the torch already installed
(build isolation would fetch a fresh, multi-GB torch). Environment:
  MEMCORE_NO_CUDA=1       build the CPU kernels only, even where CUDA is available
  MEMCORE_FORCE_CUDA=1    fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0;10.0" (torch's own variable)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - build-time message
    sys.exit(
        "memcore needs PyTorch installed before it is built: "
        "pip install torch && pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("MEMCORE_NO_CUDA"):
        return False
    ok = torch.version.cuda is not None and CUDA_HOME is not None
    if not ok and _flag("MEMCORE_FORCE_CUDA"):
        sys.exit(
            f"MEMCORE_FORCE_CUDA=1 but CUDA cannot be built: torch.version.cuda={torch.version.cuda}, "
            f"CUDA_HOME={CUDA_HOME}"
        )
    return ok


def _extension():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/autograd/*.cpp")
    # no -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20)
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP: compiled without -fopenmp it runs on one thread. The
        # libgomp.so.1 torch already loaded is the one used at run time (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _want_cuda():
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        # ATen/cuda/CUDAContext.h pulls in cusparse.h etc.; pip's CUDA torch ships them here.
        include_dirs = [os.path.join(p, "nvidia", "cu13", "include") for p in sys.path if p]
        include_dirs += [os.path.join(p, "nvidia", "cuda_runtime", "include") for p in sys.path if p]
        include_dirs = [d for d in include_dirs if os.path.isdir(d)]
        return CUDAExtension(
            "memcore._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("MEMCORE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("memcore._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    packages=find_packages(include=["memcore", "memcore.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
