"""Triton device functions shared by the attention kernels of kernels/prefill_kernels.py and decode_attention.py:
the online-softmax step, the forward pass's epilogue and the addressing of key columns that live either in the
cache (through its slot order) or in the chunk.

They are `@jit` functions, inlined where a kernel calls them, and each does its operations in the order the
kernels did when they wrote them out in place, so the compiled kernels are unchanged (the ordering matters:
a value loaded a few lines earlier already changes the schedule ptxas is handed). Logits are base-2, as in the
kernels: s2 = q·k · scale · log2(e).
"""
from __future__ import annotations

from ._triton import jit as _jit
from ._triton import tl


@_jit
def online_softmax(s, m_i, l_i):
    """The statistics of one block of the online softmax, s [M, N] base-2 logits (masked ones -inf): the new
    running max and sum, the block's probabilities p and the factor alpha that rescales what came before.
    The caller finishes with acc = dot(p, v, acc · alpha) (see `softmax_step`)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, p, alpha


@_jit
def softmax_step(s, v, m_i, l_i, acc):
    """One block of the online softmax: s [M, N] base-2 logits (masked ones -inf), v [N, D]."""
    m_new, l_i, p, alpha = online_softmax(s, m_i, l_i)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@_jit
def store_forward(OUT, BIAS, EMA, b, h, pid_bh, offs_m, offs_d, n_q, stride_ob, stride_oh, stride_om, m_i, l_i, acc,
                   WITH_SCORES: tl.constexpr):
    """The forward pass's epilogue for query rows offs_m of head (b, h), those < n_q: out = acc / l and, for the
    scores, BIAS[b, h, m] = log2(w_m) - lse2_m with lse2 = m_i + log2(l_i) (pid_bh = b·Hq + h)."""
    acc = acc / l_i[:, None]
    row_ok = offs_m < n_q
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    if WITH_SCORES:
        w = tl.load(EMA + offs_m, mask=row_ok, other=1.0)
        tl.store(BIAS + pid_bh.to(tl.int64) * n_q + offs_m, tl.log2(w) - (m_i + tl.log2(l_i)), mask=row_ok)


@_jit
def key_sources(ORDER, cols, n_past, end, ONE_NEW: tl.constexpr):
    """Where key columns `cols` of [cache in age order | chunk] live: c_ok (cols < end), in_c (the cache's
    column j < n_past, at slot ORDER[j]) and is_new (the chunk's row j - n_past); the slot is 0 off the cache.
    ONE_NEW: the chunk is decode's one key, column n_past (the test `==` is what the decode kernel was tuned
    with; `>=` selects the same keys there but compiles to other code)."""
    c_ok = cols < end
    in_c = cols < n_past
    if ONE_NEW:
        is_new = c_ok & (cols == n_past)
    else:
        is_new = c_ok & (cols >= n_past)
    slot = tl.load(ORDER + cols, mask=in_c, other=0).to(tl.int64)
    return c_ok, in_c, is_new, slot
