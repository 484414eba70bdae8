"""Chunk attention straight from the cache's buffers, rotating the keys inside the kernels (ALGORITHM.md §4–§5).

    chunk_attention_paged(q, k_cache, v_cache, order, k_new, v_new, cos, sin, scale, ema, n_sinks, head_reduce)

returns what `chunk_attention(q, apply_rope(cat(k_cache[order], k_new)), cat(v_cache[order], v_new), ...)` returns
(out, scores; see kernels/chunk_attention.py for the attention and the EMA scores), without writing the gathered,
rotated copy of the whole cache that the engine otherwise builds for every layer, chunk and decode step. Up to
rounding: the kernels rotate in fp32 and round once, torch's bf16/fp16 RoPE rounds each product.

    q                 [B, Hq, L, D]  the chunk's queries, already rotated at positions P .. P+L-1
    k_cache, v_cache  [B, Hkv, C, D] the cache's physical buffers; keys stored before RoPE
    order             [P] int64/int32, the physical slot of the key at age rank j (sinks first, then oldest first)
    k_new, v_new      [B, Hkv, L, D] the chunk's own keys (before RoPE) and values
    cos, sin          [>= P+L, D]    the model's rotary tables (row j = position j, so any RoPE scaling is right):
                                     key j < P is rotated with row j, the chunk's key m with row P+m

On CUDA (bf16/fp16, D 64/128) Triton kernels load each key tile through `order` (or from the chunk's pointers),
rotate it in fp32 and round it back to the input dtype (kernels/rope.py), and compute q·k as two dots over D/2;
values are read through `order` too. Pass 1 is the flash forward with a loop over the cache's keys (all visible)
and one over the chunk's (causal); pass 2 is the per-key-block EMA scores; one query goes to the split-K decode
kernels (kernels/decode_attention.py). For long chunks, where every (query block, head) program would rotate
the same key tiles again, `materialise_triton` can instead gather and rotate once per chunk in one pass for the
unpaged kernels (PREROTATE_MIN_QUERIES). Elsewhere the gather, cat and RoPE are done in torch and the
`chunk_attention` dispatcher runs on the result: the CPU path is the engine's old one, step for step.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ._blocks import _key_sources, _softmax_step, _store_forward
from ._triton import LOG2E, tl, triton
from ._triton import jit as _jit
from .chunk_attention import (
    _fit_rows,
    chunk_attention,
    chunk_attention_ref,
    chunk_attention_triton,
    triton_supports,
)
from .decode_attention import _decode_paged_triton
from .rope import _load_either, _load_rotated, _load_rotated_either, apply_rope


def materialise(k_cache: Tensor, v_cache: Tensor, order: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor,
                sin: Tensor) -> tuple[Tensor, Tensor]:
    """The rotated keys and the values in attention order: [B, Hkv, P+L, D] each (what the kernels avoid)."""
    n_k = order.shape[0] + k_new.shape[2]
    k_all = apply_rope(torch.cat([k_cache.index_select(2, order), k_new], dim=2), cos[:n_k], sin[:n_k])
    return k_all, torch.cat([v_cache.index_select(2, order), v_new], dim=2)


def chunk_attention_paged_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, order: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor,
    sin: Tensor, scale: float, ema: Tensor | None = None, n_sinks: int = 0, head_reduce: str = "max",
) -> tuple[Tensor, Tensor | None]:
    """The torch reference: gather, cat and rotate, then `chunk_attention_ref`."""
    k_all, v_all = materialise(k_cache, v_cache, order, k_new, v_new, cos, sin)
    return chunk_attention_ref(q, k_all, v_all, scale, ema, n_sinks, head_reduce)


# ---- Triton kernels (logits in the log2 domain, as in kernels/chunk_attention.py)


@_jit
def _attend_cached(q1, q2, kc_base, vc_base, ORDER, COS, SIN, cols, offs_m, offs_h, offs_d, n_past,
                   stride_kcn, stride_vcn, stride_cs, qk_scale, m_i, l_i, acc,
                   HALF: tl.constexpr, MASKED: tl.constexpr):
    """A block of cached keys (columns `cols` < n_past: slot ORDER[j], position j) for every query row."""
    ok = cols < n_past
    slot = tl.load(ORDER + cols, mask=ok, other=0).to(tl.int64)
    k1t, k2t = _load_rotated(  # [D/2, BLOCK_N]
        kc_base + slot[None, :] * stride_kcn + offs_h[:, None],
        COS + cols[None, :] * stride_cs + offs_h[:, None], SIN + cols[None, :] * stride_cs + offs_h[:, None],
        ok[None, :], HALF)
    s = tl.dot(q2, k2t, tl.dot(q1, k1t)) * qk_scale
    if MASKED:
        s = tl.where(ok[None, :], s, float("-inf"))
    v = tl.load(vc_base + slot[:, None] * stride_vcn + offs_d[None, :], mask=ok[:, None], other=0.0)
    return _softmax_step(s, v, m_i, l_i, acc)


@_jit
def _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, cols, offs_m, offs_h, offs_d, n_q, n_past,
                  stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i, acc,
                  HALF: tl.constexpr, MASKED: tl.constexpr):
    """A block of the chunk's own keys (columns `cols` < n_q, position n_past + j); MASKED applies j <= m."""
    ok = cols < n_q
    pos = n_past + cols
    k1t, k2t = _load_rotated(
        kn_base + cols[None, :] * stride_knn + offs_h[:, None],
        COS + pos[None, :] * stride_cs + offs_h[:, None], SIN + pos[None, :] * stride_cs + offs_h[:, None],
        ok[None, :], HALF)
    s = tl.dot(q2, k2t, tl.dot(q1, k1t)) * qk_scale
    if MASKED:
        s = tl.where((cols[None, :] <= offs_m[:, None]) & ok[None, :], s, float("-inf"))
    v = tl.load(vn_base + cols[:, None] * stride_vnn + offs_d[None, :], mask=ok[:, None], other=0.0)
    return _softmax_step(s, v, m_i, l_i, acc)


@_jit
def _paged_fwd_kernel(
    Q, KC, VC, ORDER, KN, VN, COS, SIN, OUT, BIAS, EMA,
    stride_qb, stride_qh, stride_qm,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    stride_ob, stride_oh, stride_om,
    n_q, n_past, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    """Pass 1: flash forward of BLOCK_M queries of one query head, first over the P cached keys (slots ORDER[j],
    position j, all visible), then over the chunk's keys (position P + m, causal). Writes out and, for the
    scores, BIAS[b, h, m] = log2(w_m) - lse2_m."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    kvh = h // group
    HALF: tl.constexpr = HEAD_DIM // 2
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    p_q = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_h[None, :]
    q1 = tl.load(p_q, mask=offs_m[:, None] < n_q, other=0.0)
    q2 = tl.load(p_q + HALF, mask=offs_m[:, None] < n_q, other=0.0)
    kc_base = KC + b * stride_kcb + kvh * stride_kch
    vc_base = VC + b * stride_vcb + kvh * stride_vch
    kn_base = KN + b * stride_knb + kvh * stride_knh
    vn_base = VN + b * stride_vnb + kvh * stride_vnh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # sinks and cache: seen by every query; whole blocks need no mask on the logits, the ragged last one does
    n_full = (n_past // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i, acc = _attend_cached(q1, q2, kc_base, vc_base, ORDER, COS, SIN, start_n + offs_n, offs_m, offs_h,
                                       offs_d, n_past, stride_kcn, stride_vcn, stride_cs, qk_scale, m_i, l_i, acc,
                                       HALF, False)
    for start_n in range(n_full, n_past, BLOCK_N):
        m_i, l_i, acc = _attend_cached(q1, q2, kc_base, vc_base, ORDER, COS, SIN, start_n + offs_n, offs_m, offs_h,
                                       offs_d, n_past, stride_kcn, stride_vcn, stride_cs, qk_scale, m_i, l_i, acc,
                                       HALF, True)
    # the chunk's keys: key j is seen by query m iff j <= m; keys below the block's first query by all its rows
    hi_free = ((m_start + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, hi_free, BLOCK_N):
        m_i, l_i, acc = _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, start_n + offs_n, offs_m, offs_h, offs_d,
                                      n_q, n_past, stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i, acc,
                                      HALF, False)
    for start_n in range(hi_free, tl.minimum(n_q, m_start + BLOCK_M), BLOCK_N):
        m_i, l_i, acc = _attend_chunk(q1, q2, kn_base, vn_base, COS, SIN, start_n + offs_n, offs_m, offs_h, offs_d,
                                      n_q, n_past, stride_knn, stride_vnn, stride_cs, qk_scale, m_i, l_i, acc,
                                      HALF, True)
    _store_forward(OUT, BIAS, EMA, b, h, pid_bh, offs_m, offs_d, n_q, stride_ob, stride_oh, stride_om, m_i, l_i, acc,
                   WITH_SCORES)


@_jit
def _column_block(k1, k2, q_base, bias_base, cols, rows, offs_h, n_q, n_past, stride_qm, qk_scale,
                  HALF: tl.constexpr, CAUSAL: tl.constexpr):
    """w_m p(m, j) = exp2(s2 + BIAS_m) for key columns `cols` and query rows `rows`: [BLOCK_N, BLOCK_M]."""
    p_qt = q_base + rows[None, :] * stride_qm + offs_h[:, None]  # [D/2, BLOCK_M]
    q1t = tl.load(p_qt, mask=rows[None, :] < n_q, other=0.0)
    q2t = tl.load(p_qt + HALF, mask=rows[None, :] < n_q, other=0.0)
    bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))  # padding rows: exp2 -> 0
    p = tl.exp2(tl.dot(k2, q2t, tl.dot(k1, q1t)) * qk_scale + bias[None, :])
    if CAUSAL:
        p = tl.where(cols[:, None] <= rows[None, :] + n_past, p, 0.0)
    return p


@_jit
def _paged_scores_kernel(
    Q, KC, ORDER, KN, COS, SIN, BIAS, SCORES,
    stride_qb, stride_qh, stride_qm,
    stride_kcb, stride_kch, stride_kcn,
    stride_knb, stride_knh, stride_knn,
    stride_cs,
    n_q, n_past, n_kv_heads, n_sinks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):
    """Pass 2, as `_chunk_attn_scores_kernel`: one program owns BLOCK_N key columns of one KV head (column j < P is
    the cache's slot ORDER[j], column P + m the chunk's key m; position = column), loads and rotates them once and
    sums w_m p(m, j) = exp2(s2 + BIAS_m) over the queries of its GROUP heads; then max or mean over the heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    n_k = n_past + n_q
    start_n = n_sinks + pid_n * BLOCK_N  # sink columns get no score: skip them
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    c_ok, in_c, is_new, slot = _key_sources(ORDER, cols, n_past, n_k, False)
    k1, k2 = _load_rotated_either(  # [BLOCK_N, D/2], reused for every query block
        KC + b * stride_kcb + kvh * stride_kch + slot[:, None] * stride_kcn + offs_h[None, :],
        KN + b * stride_knb + kvh * stride_knh + (cols - n_past)[:, None] * stride_knn + offs_h[None, :],
        COS + cols[:, None] * stride_cs + offs_h[None, :], SIN + cols[:, None] * stride_cs + offs_h[None, :],
        in_c[:, None], is_new[:, None], HALF)
    # query blocks that straddle the diagonal need the causal mask; earlier ones see none of these keys
    m_begin = (tl.maximum(start_n - n_past, 0) // BLOCK_M) * BLOCK_M
    m_diag = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - n_past, 0), n_q), BLOCK_M) * BLOCK_M
    result = tl.zeros([BLOCK_N], tl.float32)  # column sums are >= 0, so 0 is the identity of max too
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        bias_base = BIAS + (b * n_kv_heads * GROUP + h) * n_q
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for m0 in range(m_begin, m_diag, BLOCK_M):
            acc += _column_block(k1, k2, q_base, bias_base, cols, m0 + offs_m, offs_h, n_q, n_past, stride_qm,
                                 qk_scale, HALF, True)
        for m0 in range(m_diag, n_q, BLOCK_M):
            acc += _column_block(k1, k2, q_base, bias_base, cols, m0 + offs_m, offs_h, n_q, n_past, stride_qm,
                                 qk_scale, HALF, False)
        col = tl.sum(acc, 1)
        if REDUCE_MAX:
            result = tl.maximum(result, col)
        else:
            result += col
    if not REDUCE_MAX:
        result = result / GROUP
    tl.store(SCORES + pid_bh.to(tl.int64) * (n_k - n_sinks) + (cols - n_sinks), result, mask=c_ok)


@_jit
def _gather_rotate_kernel(
    KC, VC, ORDER, KN, VN, COS, SIN, K_OUT, V_OUT,
    stride_kcb, stride_kch, stride_kcn,
    stride_vcb, stride_vch, stride_vcn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    n_past, n_k, n_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`materialise` in one pass: BLOCK_N rows of [cache slots in ORDER | chunk] of one KV head, keys rotated at
    their row's position, written to contiguous K_OUT, V_OUT [B, Hkv, n_k, D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    c_ok, in_c, is_new, slot = _key_sources(ORDER, cols, n_past, n_k, False)
    k1, k2 = _load_rotated_either(
        KC + b * stride_kcb + kvh * stride_kch + slot[:, None] * stride_kcn + offs_h[None, :],
        KN + b * stride_knb + kvh * stride_knh + (cols - n_past)[:, None] * stride_knn + offs_h[None, :],
        COS + cols[:, None] * stride_cs + offs_h[None, :], SIN + cols[:, None] * stride_cs + offs_h[None, :],
        in_c[:, None], is_new[:, None], HALF)
    row = pid_bh * n_k + cols
    tl.store(K_OUT + row[:, None] * HEAD_DIM + offs_h[None, :], k1, mask=c_ok[:, None])
    tl.store(K_OUT + row[:, None] * HEAD_DIM + HALF + offs_h[None, :], k2, mask=c_ok[:, None])
    v = _load_either(VC + b * stride_vcb + kvh * stride_vch + slot[:, None] * stride_vcn + offs_d[None, :],
                     VN + b * stride_vnb + kvh * stride_vnh + (cols - n_past)[:, None] * stride_vnn + offs_d[None, :],
                     in_c[:, None], is_new[:, None])
    tl.store(V_OUT + row[:, None] * HEAD_DIM + offs_d[None, :], v, mask=c_ok[:, None])


# Block shapes of the paged kernels, per head dim. Rotating on load needs registers for the fp32 halves and the
# cos/sin tiles, so they are tuned apart from the unpaged ones (bench/prefill_latency.py --tune). Untimed so far:
# the unpaged tiles; the scores pass with 8 warps, where ptxas (sm_90, triton 3.7) reports no spills (4 warps:
# 896 bytes); the forward at 128/64 with 8 warps spills 56 bytes at any stage count, at 128/32 none.
PAGED_FWD_CONFIG = {128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                    64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)}
PAGED_SCORES_CONFIG = {128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
                       64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)}

# From this many queries on, chunk_attention_paged_triton rotates the keys once into a scratch copy
# (`materialise_triton`, one pass) and runs the unpaged kernels, instead of rotating every key tile in every
# (query block, head) program: (L / BLOCK_M)·G rotations per key, CUDA-core work beside the softmax. Set from
# bench/prefill_latency.py (sequence rows cascade vs cascade_prerot). Measured on an H200 (docs/BENCHMARKS.md), 1M
# tokens at stride 4096 over a 65,600-key cache: rotating in the kernels took 6.54 s of GPU time (the paged forward
# ran at 263 TFLOP/s), one rotation pass then the unpaged kernels 3.99 s (461 TFLOP/s), the old torch gather 4.40 s.
# Decode (one query) stays paged: 185 us per layer against 2,140 us for the torch gather + RoPE. From one full
# query block (128 rows) on, each key tile would be rotated by several programs per head, so prerotate there.
PREROTATE_MIN_QUERIES = 128


def _check_paged(q, k_cache, v_cache, order, k_new, v_new, cos, sin) -> None:
    b, hq, n_q, d = q.shape
    hkv, n_k = k_cache.shape[1], order.shape[0] + n_q
    assert hq % hkv == 0 and d in (16, 32, 64, 128, 256), (q.shape, k_cache.shape)
    assert k_cache.shape == v_cache.shape and k_cache.shape[0] == b and k_cache.shape[3] == d, (k_cache.shape, q.shape)
    assert k_new.shape == v_new.shape == (b, hkv, n_q, d), (k_new.shape, v_new.shape, q.shape)
    assert order.dim() == 1 and cos.shape == sin.shape and cos.shape[0] >= n_k and cos.shape[1] == d, (order.shape,
                                                                                                        cos.shape)
    assert cos.stride() == sin.stride(), "cos and sin must share one layout"
    for t in (q, k_cache, v_cache, k_new, v_new, cos):
        assert t.stride(-1) == 1, "head dim must be contiguous"


def _kv_strides(k_cache, v_cache, k_new, v_new) -> tuple[int, ...]:
    return (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            k_new.stride(0), k_new.stride(1), k_new.stride(2),
            v_new.stride(0), v_new.stride(1), v_new.stride(2))


def _valid_order(order: Tensor) -> Tensor:
    """A pointer to an empty tensor may be null: hand the kernels a valid one (never read) when P = 0."""
    return order if order.shape[0] else torch.zeros(1, dtype=torch.long, device=order.device)


def materialise_triton(k_cache: Tensor, v_cache: Tensor, order: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor,
                       sin: Tensor, block_n: int = 64) -> tuple[Tensor, Tensor]:
    """`materialise` as one Triton pass (keys rotated in fp32, rounded once): contiguous [B, Hkv, P+L, D]."""
    b, hkv, n_q, d = k_new.shape
    n_past = order.shape[0]
    n_k = n_past + n_q
    k_all = k_new.new_empty(b, hkv, n_k, d)
    v_all = v_new.new_empty(b, hkv, n_k, d)
    _gather_rotate_kernel[(triton.cdiv(n_k, block_n), b * hkv)](
        k_cache, v_cache, _valid_order(order), k_new, v_new, cos, sin, k_all, v_all,
        *_kv_strides(k_cache, v_cache, k_new, v_new), cos.stride(0),
        n_past, n_k, hkv,
        HEAD_DIM=d, BLOCK_N=block_n, num_warps=4,
    )
    return k_all, v_all


def chunk_attention_paged_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, order: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor,
    sin: Tensor, scale: float, ema: Tensor | None = None, n_sinks: int = 0, head_reduce: str = "max",
    fwd_config: dict | None = None, scores_config: dict | None = None, decode_config: dict | None = None,
    prerotate: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_paged_ref`, on the Triton kernels. No host sync. `prerotate` (default:
    L >= PREROTATE_MIN_QUERIES) rotates the keys once into a scratch copy and runs the unpaged kernels instead."""
    _check_paged(q, k_cache, v_cache, order, k_new, v_new, cos, sin)
    b, hq, n_q, d = q.shape
    hkv, n_past = k_cache.shape[1], order.shape[0]
    g, n_k = hq // hkv, n_past + n_q
    qk_scale = scale * LOG2E
    if n_q == 1:
        return _decode_paged_triton(q, k_cache, v_cache, _valid_order(order), n_past, k_new, v_new, cos, sin,
                                    qk_scale, ema, n_sinks, head_reduce, decode_config)
    if prerotate is None:
        prerotate = n_q >= PREROTATE_MIN_QUERIES
    if prerotate:
        k_all, v_all = materialise_triton(k_cache, v_cache, order, k_new, v_new, cos, sin)
        return chunk_attention_triton(q, k_all, v_all, scale, ema, n_sinks, head_reduce, fwd_config, scores_config)
    order = _valid_order(order)
    fc = dict(fwd_config or PAGED_FWD_CONFIG.get(d, PAGED_FWD_CONFIG[128]))
    fc["BLOCK_M"] = _fit_rows(fc["BLOCK_M"], n_q)
    out = torch.empty_like(q)
    with_scores = ema is not None
    bias = torch.empty(b, hq, n_q, dtype=torch.float32, device=q.device) if with_scores else out
    ema_f = ema.to(device=q.device, dtype=torch.float32).contiguous() if with_scores else bias
    _paged_fwd_kernel[(triton.cdiv(n_q, fc["BLOCK_M"]), b * hq)](
        q, k_cache, v_cache, order, k_new, v_new, cos, sin, out, bias, ema_f,
        q.stride(0), q.stride(1), q.stride(2),
        *_kv_strides(k_cache, v_cache, k_new, v_new),
        cos.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        n_q, n_past, hq, g, qk_scale,
        HEAD_DIM=d, WITH_SCORES=with_scores, **fc,
    )
    if not with_scores:
        return out, None
    sc = dict(scores_config or PAGED_SCORES_CONFIG.get(d, PAGED_SCORES_CONFIG[128]))
    sc["BLOCK_M"] = _fit_rows(sc["BLOCK_M"], n_q)
    scores = torch.empty(b, hkv, n_k - n_sinks, dtype=torch.float32, device=q.device)
    _paged_scores_kernel[(triton.cdiv(n_k - n_sinks, sc["BLOCK_N"]), b * hkv)](
        q, k_cache, order, k_new, cos, sin, bias, scores,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_new.stride(0), k_new.stride(1), k_new.stride(2),
        cos.stride(0),
        n_q, n_past, hkv, n_sinks, qk_scale,
        GROUP=g, HEAD_DIM=d, REDUCE_MAX=head_reduce == "max", **sc,
    )
    return out, scores


def paged_supported(q: Tensor, k_cache: Tensor) -> bool:
    """Whether `chunk_attention_paged` runs its fused kernels here (otherwise it materialises, as the engine
    did before); False under CASCADECTL_KERNELS=ref."""
    return os.environ.get("CASCADECTL_KERNELS") != "ref" and triton_supports(q, k_cache)


def chunk_attention_paged(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, order: Tensor, k_new: Tensor, v_new: Tensor, cos: Tensor,
    sin: Tensor, scale: float, ema: Tensor | None = None, n_sinks: int = 0, head_reduce: str = "max",
) -> tuple[Tensor, Tensor | None]:
    """Dispatcher: the fused Triton kernels where supported; otherwise gather, cat, rotate and `chunk_attention`
    (which honours CASCADECTL_KERNELS=ref)."""
    if paged_supported(q, k_cache):
        return chunk_attention_paged_triton(q, k_cache, v_cache, order, k_new, v_new, cos, sin, scale, ema, n_sinks,
                                            head_reduce)
    k_all, v_all = materialise(k_cache, v_cache, order, k_new, v_new, cos, sin)
    return chunk_attention(q, k_all, v_all, scale, ema, n_sinks, head_reduce)
