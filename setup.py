"""Builds memcore._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

memcore._C is compiled against the torch already installed and works only with that torch's minor
version (C++ ABI), so build without isolation: `pip install --no-build-isolation .`, or a wheel with
`python -m build --no-isolation`. An isolated build has no torch and stops at once saying so.
Environment:
  MEMCORE_NO_CUDA=1       build the CPU kernels only, even where CUDA is available
  MEMCORE_FORCE_CUDA=1    fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0;10.0" (torch's own variable)
  MAX_JOBS                parallel compile jobs (default: the number of usable cores)
"""

import glob
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from typing import Dict, List, Optional, Set, Tuple

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
        "memcore needs PyTorch installed before it is built, and builds against that torch: "
        "pip install torch, then pip install --no-build-isolation . (or python -m build --no-isolation; "
        "an isolated build environment has no torch)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"  # the torch memcore._C was built against, beside it

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


def _compiling(build_temp: str, sources: Set[str]) -> Optional[Tuple[Set[str], bool]]:
    """(which of `sources` a compiler works on now, whether the extension is being linked), read from
    the command lines in /proc of the processes that write into build_temp: ninja reports a file only
    once it is done. None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    running, linking = set(), False
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError):
            continue  # not a process, or it ended
        if "-o" in args[:-1] and args[args.index("-o") + 1].startswith(build_temp):
            # the arguments naming one of `sources` (not nvcc's intermediate files)
            running.update(
                s for s in (os.path.relpath(a, ROOT) for a in args if os.path.isabs(a)) if s in sources
            )
        elif "-shared" in args and any(a.startswith(build_temp) for a in args):
            linking = True
    return running, linking


def _stale(build_temp: str, sources: List[str]) -> List[str]:
    """The sources ninja will compile: those its dry run over the last build's build.ninja names, and
    those that build did not have (all of them before a first build; files it adds because the flags
    changed show up when they start)."""
    try:
        with open(os.path.join(build_temp, "build.ninja")) as f:
            last = f.read()
    except OSError:
        return list(sources)
    try:
        plan = subprocess.run(
            ["ninja", "-n", "-C", build_temp], capture_output=True, text=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return list(sources)
    named = {os.path.relpath(a, ROOT) for a in plan if os.path.isabs(a)}
    return [s for s in sources if s in named or os.path.join(ROOT, s) not in last]


class _Progress(threading.Thread):
    """Prints a line when a file's compile starts and when it ends, with the time left, and one at
    least every 20 s. Time left: each file's cost (CPP_SECONDS / CU_SECONDS of CPU) times the wall
    seconds a CPU second takes per job, from the machine's load until a file is done, then as
    measured on the files done so far."""

    def __init__(self, build_temp: str, sources: List[str], jobs: int) -> None:
        super().__init__(daemon=True)
        self.build_temp, self.jobs = os.path.abspath(build_temp), jobs
        self.cost = {s: CU_SECONDS if s.endswith(".cu") else CPP_SECONDS for s in sources}
        self.plan = set(_stale(self.build_temp, sources))
        # a job's share of a core beside the load already there (other processes: the load average)
        others = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        self.slowdown = max(1.0, (others + min(jobs, len(self.plan) or 1)) / _cores())
        self.halt = threading.Event()
        self.start_time = self.last = time.monotonic()
        self.started: Dict[str, float] = {}
        self.took: Dict[str, float] = {}

    def say(self, text: str) -> None:
        self.last = time.monotonic()
        print(f"[memcore] {text} ({self.last - self.start_time:.0f} s)", flush=True)

    def left(self) -> str:
        now = time.monotonic()
        per_cpu_s = (
            sum(self.took.values()) / sum(self.cost[s] for s in self.took) if self.took else self.slowdown
        )
        work = [self.cost[s] for s in self.plan if s not in self.started]
        work += [
            max(self.cost[s] - (now - t) / per_cpu_s, 0.1 * self.cost[s])
            for s, t in self.started.items()
            if s not in self.took
        ]
        if not work:
            return "then the link"
        return f"about {sum(work) * per_cpu_s / min(self.jobs, len(work)) / 60:.1f} min of compile left"

    def run(self) -> None:
        running: Set[str] = set()
        linked = False
        while not self.halt.wait(0.5):
            seen = _compiling(self.build_temp, set(self.cost))
            if seen is None:  # no /proc: a heartbeat only
                if time.monotonic() - self.last >= 20:
                    self.say("still compiling")
                continue
            now_running, linking = seen
            for src in sorted(running - now_running):
                self.took[src] = time.monotonic() - self.started[src]
                self.say(f"compiled {src} in {self.took[src]:.0f} s, {self.left()}")
            for src in sorted(now_running - running):
                self.started[src] = time.monotonic()
                self.plan.add(src)
                self.say(f"compiling {src} ({len(self.started)} of {len(self.plan)}), {self.left()}")
            running = now_running
            if linking and not linked:
                linked = True
                self.say("linking memcore._C")
            elif time.monotonic() - self.last >= 20:
                self.say(f"still compiling {', '.join(sorted(running)) or '...'}, {self.left()}")


class _BuildExtension(BuildExtension):
    """torch's BuildExtension (ninja), saying which file it compiles when it starts and about how long
    the rest takes; records the torch it builds against in _build_info.json beside the extension
    (memcore checks it at import: memcore/_extension.py)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            # pip install -e builds in a fresh temporary folder each time; the objects of this
            # folder's in-place and wheel builds are reused instead (ninja recompiles what changed)
            self.build_temp = os.path.join(
                ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
            )

    def build_extensions(self) -> None:
        files = [s for ext in self.extensions for s in ext.sources]
        n_cu = sum(s.endswith(".cu") for s in files)
        jobs = int(os.environ["MAX_JOBS"])
        progress = _Progress(self.build_temp, files, jobs)
        todo = [f for f in files if f in progress.plan]
        cuda = sum(f.endswith(".cu") for f in todo)
        minutes = sum(progress.cost[f] for f in todo) * progress.slowdown / max(1, min(jobs, len(todo))) / 60
        print(
            f"[memcore] building memcore._C: {len(todo)} of its {len(files)} files to compile"
            f"{f' ({cuda} CUDA)' if cuda else ''}, the others up to date in "
            f"{os.path.relpath(self.build_temp, ROOT)}; {jobs} jobs on {_cores()} cores: about "
            f"{minutes:.1f} min here",
            flush=True,
        )
        progress.start()
        try:
            super().build_extensions()
        finally:
            progress.halt.set()
            progress.join()
        info = {"torch": torch.__version__, "cuda": torch.version.cuda if n_cu else None}
        if n_cu:
            info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        with open(self._build_info(), "w") as f:
            json.dump(info, f)
        print(f"[memcore] built memcore._C in {time.monotonic() - progress.start_time:.0f} s", flush=True)

    def _build_info(self, inplace: bool = False) -> str:
        old, self.inplace = self.inplace, inplace
        try:
            return os.path.join(os.path.dirname(self.get_ext_fullpath("memcore._C")), BUILD_INFO)
        finally:
            self.inplace = old

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        self.copy_file(self._build_info(), self._build_info(inplace=True), level=self.verbose)


setup(
    packages=find_packages(include=["memcore", "memcore.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension.with_options(use_ninja=True)},
)
