"""The C allocator's settings for CPU inference: keep freed memory for the next step instead of returning it.

glibc serves each allocation above its mmap threshold (128 KiB at first, raised as it goes) with a fresh mapping
and unmaps it on free, so every activation of that size, allocated and freed once per layer and step, pays page
faults again: a CPU decode step of the embedded model allocates about 900 tensors, many of them logits rows of
150 KiB or key runs of 700 KiB. Raising the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the trim
threshold to 1 GiB keeps those pages in the heap for reuse; larger tensors (weights) are still mapped. Measured
on the 2-core EPYC with bench/cpu_decode.py and `ppl` (docs/BENCHMARKS.md). Elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Apply the settings once per process; True when glibc took both."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) & bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
