"""Builds memcore._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Install with `pip install --no-build-isolation .` so the build sees the torch already installed
(build isolation would fetch a fresh, multi-GB torch). Environment:
  MEMCORE_NO_CUDA=1       build the CPU kernels only, even where CUDA is available
  MEMCORE_FORCE_CUDA=1    fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0;10.0" (torch's own variable)
  MAX_JOBS                parallel compile jobs (default: the number of usable cores)
"""

import glob
import os
import sys
import time

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
        include_paths,
    )
except ImportError:  # pragma: no cover - build-time message
    sys.exit(
        "memcore needs PyTorch installed before it is built: "
        "pip install torch && pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))

# CPU seconds to compile one file, measured (gcc 12 -O3 -g0: 186 s for the 7 C++ files; nvcc 13
# for sm_90 only: 64 and 84 s for curvature.cu and cross_entropy.cu), for the estimate printed
# before the build. Each extra architecture in TORCH_CUDA_ARCH_LIST adds device time.
CPP_SECONDS = 27
CU_SECONDS = 74


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# torch.utils.cpp_extension hands MAX_JOBS to ninja as -j; without it ninja runs cores + 2 jobs,
# which on small machines only adds memory pressure (an nvcc job takes 1-2 GB).
os.environ.setdefault("MAX_JOBS", str(_cores()))


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
    sources = (
        rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp") + rel("csrc/autograd/*.cpp") + rel("csrc/composite/*.cpp")
    )
    # setuptools rebuilds only when a listed file is newer than the .so (ninja then picks the objects)
    depends = rel("csrc/*.h") + rel("csrc/*/*.h") + rel("csrc/*/*.inc")
    # torch's headers as system headers: their warnings are not ours (gcc drops the -I torch adds)
    system = [f for d in include_paths() for f in ("-isystem", d)]
    # no -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 or C++20).
    # -g0 overrides the -g in Python's CFLAGS: debug info for torch's inline templates cost compile
    # time and made the .so 40 MB (0.9 MB without), and nobody steps through a wheel's kernels.
    # -Wno-psabi: cross_entropy_block.cpp passes 64-byte vectors only between inlined helpers, and gcc's
    # diagnostic pragma there does not reach the ABI note.
    cxx = ["-O3", "-g0", "-fvisibility=hidden", "-Wno-psabi"] + system
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP: compiled without -fopenmp it runs on one thread. The
        # libgomp.so.1 torch already loaded is the one used at run time (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _want_cuda():
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + system
        # ATen/cuda/CUDAContext.h pulls in cusparse.h etc.; pip's CUDA torch ships them here.
        include_dirs = [os.path.join(p, "nvidia", "cu13", "include") for p in sys.path if p]
        include_dirs += [os.path.join(p, "nvidia", "cuda_runtime", "include") for p in sys.path if p]
        include_dirs = [d for d in include_dirs if os.path.isdir(d)]
        return CUDAExtension(
            "memcore._C",
            sources + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            depends=depends,
            define_macros=[("MEMCORE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "memcore._C", sources, depends=depends, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


class _BuildExtension(BuildExtension):
    """torch's BuildExtension (ninja), saying what it compiles and about how long it takes."""

    def build_extensions(self) -> None:
        files = [s for ext in self.extensions for s in ext.sources]
        n_cu = sum(s.endswith(".cu") for s in files)
        n_cpp = len(files) - n_cu
        jobs, cores = int(os.environ["MAX_JOBS"]), _cores()
        minutes = (n_cpp * CPP_SECONDS + n_cu * CU_SECONDS) / max(1, min(jobs, cores)) / 60
        cuda = f" (+{n_cu} CUDA)" if n_cu else ""
        print(
            f"[memcore] compiling {n_cpp} C++ files{cuda} with {jobs} jobs: about {max(1, round(minutes))} "
            f"min on {cores} cores, less for files unchanged since the last build",
            flush=True,
        )
        start = time.monotonic()
        super().build_extensions()
        print(f"[memcore] built memcore._C in {time.monotonic() - start:.0f} s", flush=True)


setup(
    packages=find_packages(include=["memcore", "memcore.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
