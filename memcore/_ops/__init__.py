"""Loads the compiled extension memcore._C (which registers torch.ops.memcore.*) and the Python
side of each op family, one module each: ``cross_entropy``, ``linear_cross_entropy``, ``curvature``
(fake kernels, and the autograd written in Python)."""

from .._extension import _C  # checks the build fits this torch, then loads it
from . import cross_entropy, curvature, linear_cross_entropy  # noqa: F401  (fake kernels / autograd registration)


def with_cuda() -> bool:
    """True when this build of memcore contains the CUDA kernels."""
    return bool(_C.with_cuda())


def cpu_isa() -> str:
    """The instruction set of the CPU kernels picked at load (e.g. ``"avx2"``, ``"baseline"``);
    ``MEMCORE_CPU_ISA=avx2|baseline`` overrides the choice before import."""
    return str(_C.cpu_isa())


__all__ = ["with_cuda", "cpu_isa"]
