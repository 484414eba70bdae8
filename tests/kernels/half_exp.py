"""`kernels._blocks._exp2_half` elementwise over a float32 tensor (CUDA only): the tests' and bench's probe."""
from __future__ import annotations

import torch

from kernels._blocks import _exp2_half
from kernels._triton import tl, triton


@triton.jit
def _apply(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, _exp2_half(x).to(tl.float32), mask=offs < n)


def exp2_half(x: torch.Tensor) -> torch.Tensor:
    """2^x through the fp16 special-function instruction, returned as float32."""
    x = x.contiguous().float()
    y = torch.empty_like(x)
    _apply[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    return y
