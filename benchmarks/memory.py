"""Peak memory of one call, measured the same way on both devices: bytes torch allocated during
the call above what was allocated before it (tensors freed before the call returns included).

CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch has no allocator statistics, so the call runs
under ``torch.profiler`` with ``profile_memory=True`` and the allocation events of the CPU
allocator (sizes, frees negative) are summed in time order; the peak of that running sum is the
figure. That reads torch's own event tree (``kineto_results.experimental_event_tree``, what
``torch.profiler``'s memory timeline is built on); where a torch release lacks it the figure is
None, shown as not measured, never guessed.
"""

import gc
from typing import Callable, Optional

import torch


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def peak_cpu_mib(fn: Callable[[], object]) -> Optional[float]:
    """Peak MiB the CPU allocator handed out during ``fn()`` above its level before; None if unreadable."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
        sizes = sorted(
            (e.start_time_ns, e.extra_fields.alloc_size)
            for e in _walk(tree)
            if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"
        )
    except (AttributeError, RuntimeError):
        return None
    cur = peak = 0
    for _, size in sizes:
        cur += size
        peak = max(peak, cur)
    return peak / 2**20


def peak_cuda_mib(fn: Callable[[], object]) -> float:
    """Peak MiB allocated on the current CUDA device during ``fn()`` above what was allocated before."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_mib(device: str, fn: Callable[[], object]) -> Optional[float]:
    return peak_cuda_mib(fn) if device == "cuda" else peak_cpu_mib(fn)
