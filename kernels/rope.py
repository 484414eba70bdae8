"""Rotary position embedding in the HF convention (rotate_half: the two halves of the head dim, not interleaved
pairs), applied with the model's own cos/sin tables so that any RoPE scaling is honoured.

`apply_rope` is the torch form. `rotate_queries` is what the engine calls for a chunk's queries: on CUDA one Triton
kernel (`_rope_kernel`: one read and one write of x, against three elementwise passes and launches in torch), the
torch form elsewhere. The Triton device functions below also rotate key tiles inside the attention kernels
(kernels/prefill_kernels.py, kernels/decode_attention.py): a key is loaded as its two halves k1 = k[:D/2] and
k2 = k[D/2:], rotated in fp32 as (k1·c1 − k2·s1, k2·c2 + k1·s2) and rounded back to the input dtype, so that
q·k = q1·k1' + q2·k2' is two dots over D/2 and the rotated key is never written to memory.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import dispatch
from ._triton import jit as _jit
from ._triton import tl, triton


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos/sin [T, D] (the HF convention: halves, not interleaved pairs):
    x·cos + rotate_half(x)·sin, as x·cos and then one fused multiply-add into each half. That is three passes over
    x instead of five (rotate_half alone negates and concatenates a copy), and one rounding fewer per element."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


@_jit
def _rotate(k1, k2, c1, c2, s1, s2):
    """Both halves of rotated keys, computed in fp32 and rounded once to the keys' dtype."""
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    r1 = k1f * c1.to(tl.float32) - k2f * s1.to(tl.float32)
    r2 = k2f * c2.to(tl.float32) + k1f * s2.to(tl.float32)
    return r1.to(k1.dtype), r2.to(k1.dtype)


@_jit
def load_either(p_cache, p_new, in_cache, in_new):
    """A tile whose rows (or columns) come from the cache where `in_cache` and from the chunk where `in_new`;
    zero elsewhere. The masks are disjoint, so each element is read from memory at most once."""
    return tl.where(in_cache, tl.load(p_cache, mask=in_cache, other=0.0), tl.load(p_new, mask=in_new, other=0.0))


@_jit
def _rope_tables(p_cos, p_sin, ok, HALF: tl.constexpr):
    """cos/sin halves at the pointers' rows (the keys' positions): c1, c2, s1, s2."""
    c1 = tl.load(p_cos, mask=ok, other=0.0)
    c2 = tl.load(p_cos + HALF, mask=ok, other=0.0)
    s1 = tl.load(p_sin, mask=ok, other=0.0)
    s2 = tl.load(p_sin + HALF, mask=ok, other=0.0)
    return c1, c2, s1, s2


@_jit
def load_rotated(p_key, p_cos, p_sin, ok, HALF: tl.constexpr):
    """Rotated key halves from one source: p_key points at each key's first half, p_cos/p_sin at its position's
    table row (any tile layout: [N, D/2] or transposed [D/2, N])."""
    k1 = tl.load(p_key, mask=ok, other=0.0)
    k2 = tl.load(p_key + HALF, mask=ok, other=0.0)
    c1, c2, s1, s2 = _rope_tables(p_cos, p_sin, ok, HALF)
    return _rotate(k1, k2, c1, c2, s1, s2)


@_jit
def load_rotated_either(p_cache, p_new, p_cos, p_sin, in_cache, in_new, HALF: tl.constexpr):
    """Rotated key halves whose keys come from the cache (through its slots) or from the chunk, per row."""
    k1 = load_either(p_cache, p_new, in_cache, in_new)
    k2 = load_either(p_cache + HALF, p_new + HALF, in_cache, in_new)
    c1, c2, s1, s2 = _rope_tables(p_cos, p_sin, in_cache | in_new, HALF)
    return _rotate(k1, k2, c1, c2, s1, s2)


@_jit
def _rope_kernel(
    X, COS, SIN, OUT,
    stride_xb, stride_xh, stride_xt,
    stride_ob, stride_oh, stride_ot,
    stride_cs, n_t, n_heads,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BLOCK_T rows of one (batch, head) of x [B, H, T, D], row t rotated with table row t (`_rotate`)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < n_t)[:, None]
    offs_h = tl.arange(0, HALF)[None, :]
    r1, r2 = load_rotated(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + offs_h,
                           COS + rows[:, None] * stride_cs + offs_h, SIN + rows[:, None] * stride_cs + offs_h,
                           ok, HALF)
    p_out = OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_h
    tl.store(p_out, r1, mask=ok)
    tl.store(p_out + HALF, r2, mask=ok)


def rope_triton(x: Tensor, cos: Tensor, sin: Tensor, block_t: int = 64) -> Tensor:
    """`apply_rope` as one Triton kernel, rotating in fp32 and rounding once: a contiguous [B, H, T, D]."""
    b, h, n_t, d = x.shape
    assert cos.shape == sin.shape == (n_t, d) and cos.stride() == sin.stride(), (x.shape, cos.shape, sin.shape)
    assert x.stride(-1) == 1 and cos.stride(-1) == 1, "head dim must be contiguous"
    out = torch.empty(b, h, n_t, d, dtype=x.dtype, device=x.device)
    # Triton launches on the current CUDA device: make it x's (layers may be spread over several cards)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _rope_kernel[(triton.cdiv(n_t, block_t), b * h)](
            x, cos, sin, out,
            x.stride(0), x.stride(1), x.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0), n_t, h,
            HALF=d // 2, BLOCK_T=block_t, num_warps=4,
        )
    return out


def rotate_queries(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Dispatcher for a chunk's queries, x [B, H, T, D] with cos/sin [T, D]: the Triton kernel on CUDA for 16-bit
    inputs and head dims 32-256 (powers of two); `apply_rope` otherwise and under CASCADECTL_KERNELS=ref."""
    if dispatch.rope_path(x, cos) == "triton":
        return rope_triton(x, cos, sin)
    return apply_rope(x, cos, sin)
