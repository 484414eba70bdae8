"""The optional Triton import shared by the kernel modules: CPU-only installs never need triton.

`jit` is `triton.jit` where triton exists and the plain function otherwise (never called then). Triton reads
TRITON_INTERPRET when a kernel is decorated, so a module imported with it set runs its kernels in Triton's CPU
interpreter (the interpreter tests load a private copy of this package that way)."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = tl = None

LOG2E = 1.4426950408889634  # the kernels work with base-2 logits: s2 = q·k · scale · log2(e)


def jit(fn):
    return triton.jit(fn) if triton is not None else fn
