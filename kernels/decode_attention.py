"""Decode attention (one query per head) with the exact EMA scores, split over the keys.

Same contract as `chunk_attention_triton` (kernels/prefill_triton.py, which calls these) for L == 1:
q [B, Hq, 1, D] (rotated), k, v [B, Hkv, K, D]; or, paged (`decode_paged_triton`), the cache's buffers read
through its slot order with keys rotated on load. Batch 1 decode has only B·Hkv (query head group, key) pairs,
far too few programs to fill a GPU, so the keys are split (split-K): one kernel writes each split's partial
softmax statistics, unnormalised output and (for the scores) the raw base-2 logits; a second kernel merges the
splits into out and, per key, the exact probability w_0 · reduce_g p_g(j). CUDA only (bf16/fp16, D 64/128); the
torch references live in `cascade_kernels.chunk_attention`.
"""
from __future__ import annotations

import torch

from ._triton import jit as _jit
from ._triton import tl, triton
from .blocks import key_sources, online_softmax
from .rope import load_either, load_rotated_either

# PROGRAMS_PER_SM sets the key splits (split-K) so that batch 1 fills the GPU.
DECODE_CONFIG = dict(BLOCK_N=128, num_warps=4, num_stages=3, PROGRAMS_PER_SM=4)
# The paged split kernel also holds fp32 key halves and cos/sin tiles: at BLOCK_N 128 ptxas (sm_90) reports
# 1244 bytes of spills, at 32 none. The fastest of the candidates `bench/prefill_latency.py --tune` timed on an
# H200 (one query over 65,601 keys, 32 heads / 8 KV heads, D 128, with scores, as a CUDA graph): 183.1 µs, against
# 214.3 µs for the earlier untimed choice (num_stages 4, 4 programs per SM); docs/BENCHMARKS.md, session 4.
PAGED_DECODE_CONFIG = dict(BLOCK_N=32, num_warps=4, num_stages=3, PROGRAMS_PER_SM=2)
# Keys per merge program, beside the split kernel's config. On an H200 (bench/decode_kernels.py, the paged decode
# over 65,601 keys as a CUDA graph) 1024 took split + merge from 182 to 171 µs against 256; numbering the split
# programs head-first instead (so that one key range's cos/sin rows are shared in L2) changed nothing measurable
# (171.1 vs 171.2 µs) and was dropped. docs/BENCHMARKS.md, session 5.
LAUNCH_DEFAULTS = dict(MERGE_BLOCK_N=1024)


@_jit
def _split_step(s, cols, c_ok, row, g_ok, LOGITS, n_k, m_i, l_i, WITH_SCORES: tl.constexpr):
    """The online-softmax statistics of one key block of a split (`online_softmax`), keys past the split
    masked off; for the scores, first the raw logits of the GROUP heads at LOGITS[row, cols]. The caller then
    loads v and accumulates: loading v here, before the statistics, changes the compiled schedule."""
    s = tl.where(c_ok[None, :], s, float("-inf"))
    if WITH_SCORES:
        tl.store(LOGITS + row[:, None] * n_k + cols[None, :], s, mask=g_ok[:, None] & c_ok[None, :])
    m_new, l_i, p, alpha = online_softmax(s, m_i, l_i)
    return m_new, l_i, p, alpha


@_jit
def _store_partials(PART_M, PART_L, PART_O, part, g_ok, offs_d, m_i, l_i, acc, HEAD_DIM: tl.constexpr):
    """A split's partial softmax of the GROUP heads (rows `part` = (b·Hq + h)·n_splits + split): its max, sum
    and unnormalised output, merged by `_decode_merge_kernel`."""
    tl.store(PART_M + part, m_i, mask=g_ok)
    tl.store(PART_L + part, l_i, mask=g_ok)
    tl.store(PART_O + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])


@_jit
def _split_kernel(
    Q, K, V, ORDER, KN, VN, COS, SIN, LOGITS, PART_M, PART_L, PART_O,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_knb, stride_knh, stride_knn,
    stride_vnb, stride_vnh, stride_vnn,
    stride_cs,
    n_past, n_k, n_kv_heads, n_splits, split_len, qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_SCORES: tl.constexpr, PAGED: tl.constexpr,
):
    """Decode (one query), split-K: program (split, b·Hkv) takes the GROUP query heads of a KV head over
    `split_len` keys; writes a partial (max, sum, unnormalised out) and, for the scores, the raw logits.

    PAGED: straight from the cache (kernels/paged_attention.py): key j < n_past is the cache's slot ORDER[j] of
    K, V, key n_past the step's own (KN, VN), and every key is rotated at its position j on load (n_k is then
    n_past + 1; the argument is not read). Otherwise K, V hold the n_k keys in order, already rotated, and
    ORDER, KN, VN, COS, SIN are not read."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < GROUP
    heads = kvh * GROUP + offs_g  # [BLOCK_G]; rows past GROUP are padding for the matrix unit
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    if PAGED:
        p_q = Q + b * stride_qb + heads[:, None] * stride_qh + offs_h[None, :]
        q1 = tl.load(p_q, mask=g_ok[:, None], other=0.0)
        q2 = tl.load(p_q + HALF, mask=g_ok[:, None], other=0.0)
    else:
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    if PAGED:
        kn_base = KN + b * stride_knb + kvh * stride_knh
        vn_base = VN + b * stride_vnb + kvh * stride_vnh
        n_k = n_past + 1
    row = b * n_kv_heads * GROUP + heads  # flat (b, h) index
    start = pid_s * split_len
    end = tl.minimum(start + split_len, n_k)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if PAGED:
            c_ok, in_c, is_new, slot = key_sources(ORDER, cols, n_past, end, True)
            new_row = cols - n_past  # 0 for the step's key; the other lanes are masked off
            k1t, k2t = load_rotated_either(  # [D/2, BLOCK_N]
                k_base + slot[None, :] * stride_kn + offs_h[:, None], kn_base + new_row[None, :] * stride_knn
                + offs_h[:, None], COS + cols[None, :] * stride_cs + offs_h[:, None],
                SIN + cols[None, :] * stride_cs + offs_h[:, None], in_c[None, :], is_new[None, :], HALF)
            s = tl.dot(q2, k2t, tl.dot(q1, k1t)) * qk_scale
        else:
            c_ok = cols < end
            kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=c_ok[None, :], other=0.0)
            s = tl.dot(q, kt) * qk_scale
        m_i, l_i, p, alpha = _split_step(s, cols, c_ok, row, g_ok, LOGITS, n_k, m_i, l_i, WITH_SCORES)
        if PAGED:
            v = load_either(v_base + slot[:, None] * stride_vn + offs_d[None, :],
                            vn_base + new_row[:, None] * stride_vnn + offs_d[None, :], in_c[:, None], is_new[:, None])
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=c_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    _store_partials(PART_M, PART_L, PART_O, row * n_splits + pid_s, g_ok, offs_d, m_i, l_i, acc, HEAD_DIM)


@_jit
def _decode_merge_kernel(
    PART_M, PART_L, PART_O, LOGITS, EMA, OUT, SCORES,
    stride_ob, stride_oh, n_k, n_kv_heads, n_sinks, n_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
    WITH_SCORES: tl.constexpr, REDUCE_MAX: tl.constexpr,
):
    """Merge the splits of the GROUP heads of one KV head: each program recomputes their log2 denominators
    lse = m + log2 Σ_s l_s 2^(m_s - m) from the partials; programs (0, ·) also write out = Σ_s o_s 2^(m_s - m) / Σ;
    with scores, program (n, ·) writes w_0 · reduce_g 2^(logit - lse_g) for its BLOCK_N keys."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_kv_heads
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_splits
    offs_d = tl.arange(0, HEAD_DIM)
    cols = n_sinks + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < n_k
    result = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        row = pid_bh * GROUP + g  # (b·Hkv + kvh)·G + g == b·Hq + h
        m = tl.load(PART_M + row * n_splits + offs_s, mask=s_ok, other=float("-inf"))
        l = tl.load(PART_L + row * n_splits + offs_s, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(s_ok, tl.exp2(m - m_max), 0.0)
        denom = tl.sum(l * w, 0)
        if pid_n == 0:
            o = tl.load(PART_O + (row * n_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                        mask=s_ok[:, None], other=0.0)
            out = tl.sum(o * w[:, None], 0) / denom
            h = row - b * n_kv_heads * GROUP
            tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
        if WITH_SCORES:
            lse = m_max + tl.log2(denom)
            p = tl.exp2(tl.load(LOGITS + row * n_k + cols, mask=c_ok, other=float("-inf")) - lse)
            if REDUCE_MAX:
                result = tl.maximum(result, p)
            else:
                result += p
    if WITH_SCORES:
        if not REDUCE_MAX:
            result = result / GROUP
        w0 = tl.load(EMA)
        tl.store(SCORES + pid_bh * (n_k - n_sinks) + (cols - n_sinks), result * w0, mask=c_ok)


def _n_programs_wanted(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 8  # Triton's interpreter on the CPU (tests)
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _split(q: torch.Tensor, n_kv_heads: int, n_k: int, decode_config: dict) -> tuple[int, int, dict]:
    """(n_splits, split_len, kernel config): enough splits that batch 1 fills the GPU, none of them empty. The
    config keeps the launch options (LAUNCH_DEFAULTS) for the caller to pop."""
    cfg = {**LAUNCH_DEFAULTS, **decode_config}
    per_sm = cfg.pop("PROGRAMS_PER_SM")
    block_n = cfg["BLOCK_N"]
    n_bh = q.shape[0] * n_kv_heads
    n_splits = max(1, min(triton.cdiv(_n_programs_wanted(q.device, per_sm), n_bh), triton.cdiv(n_k, block_n)))
    split_len = triton.cdiv(triton.cdiv(n_k, n_splits), block_n) * block_n
    return triton.cdiv(n_k, split_len), split_len, cfg


def _partials(q: torch.Tensor, n_splits: int, n_k: int, with_scores: bool) -> tuple[torch.Tensor, ...]:
    """Per (b, h, split): max, sum and unnormalised out; plus the raw logits [B·Hq·K] when scores are wanted."""
    b, hq, _, d = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    part_m = torch.empty(b * hq * n_splits, **f32)
    part_l = torch.empty(b * hq * n_splits, **f32)
    part_o = torch.empty(b * hq * n_splits * d, **f32)
    logits = torch.empty(b * hq * n_k, **f32) if with_scores else part_m
    return part_m, part_l, part_o, logits


def _merge(q, parts, n_kv_heads, n_k, n_splits, ema, n_sinks, head_reduce, block_n=256):
    """Second kernel: out [B, Hq, 1, D] and, with `ema`, the scores [B, Hkv, K - n_sinks]."""
    b, hq, _, d = q.shape
    part_m, part_l, part_o, logits = parts
    out = torch.empty_like(q)
    if ema is not None:
        scores = torch.empty(b, n_kv_heads, n_k - n_sinks, dtype=torch.float32, device=q.device)
        ema_f = ema.to(device=q.device, dtype=torch.float32)
        grid = (max(1, triton.cdiv(n_k - n_sinks, block_n)), b * n_kv_heads)  # program 0 also writes out
    else:
        scores = ema_f = part_m
        grid = (1, b * n_kv_heads)
    _decode_merge_kernel[grid](
        part_m, part_l, part_o, logits, ema_f, out, scores,
        out.stride(0), out.stride(1), n_k, n_kv_heads, n_sinks, n_splits,
        GROUP=hq // n_kv_heads, HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_N=block_n,
        WITH_SCORES=ema is not None, REDUCE_MAX=head_reduce == "max",
    )
    return out, (scores if ema is not None else None)


def decode_triton(q, k, v, qk_scale, ema, n_sinks, head_reduce, decode_config=None):
    """One query per head: split the keys so that batch 1 still fills the GPU, then merge the splits."""
    strides = (*k.stride()[:3], *v.stride()[:3]) + (0,) * 7  # ORDER, KN, VN, COS, SIN are not read
    return _split_and_merge(q, (k, v, k, k, v, k, k), strides, 0, k.shape[2], qk_scale, ema, n_sinks, head_reduce,
                            decode_config or DECODE_CONFIG, paged=False)


def decode_paged_triton(q, k_cache, v_cache, order, n_past, k_new, v_new, cos, sin, qk_scale, ema, n_sinks,
                        head_reduce, decode_config=None):
    """`decode_triton` over [cache slots order[:n_past] | the step's own key], rotating keys on load
    (the contract of cascade_kernels.paged_attention.chunk_attention_paged for L == 1)."""
    strides = (*k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3],
               cos.stride(0))
    return _split_and_merge(q, (k_cache, v_cache, order, k_new, v_new, cos, sin), strides, n_past, n_past + 1,
                            qk_scale, ema, n_sinks, head_reduce, decode_config or PAGED_DECODE_CONFIG, paged=True)


def _split_and_merge(q, sources, strides, n_past, n_k, qk_scale, ema, n_sinks, head_reduce, decode_config, paged):
    """Both kernels: `sources` = (K, V, ORDER, KN, VN, COS, SIN) and their strides, as `_split_kernel` takes them."""
    b, hq, _, d = q.shape
    hkv = sources[0].shape[1]
    g = hq // hkv
    n_splits, split_len, cfg = _split(q, hkv, n_k, decode_config)
    merge_block = cfg.pop("MERGE_BLOCK_N")
    parts = _partials(q, n_splits, n_k, ema is not None)
    _split_kernel[(n_splits, b * hkv)](
        q, *sources, parts[3], *parts[:3],
        q.stride(0), q.stride(1), *strides,
        n_past, n_k, hkv, n_splits, split_len, qk_scale,
        GROUP=g, BLOCK_G=max(16, triton.next_power_of_2(g)), HEAD_DIM=d, WITH_SCORES=ema is not None,
        PAGED=paged, **cfg,
    )
    return _merge(q, parts, hkv, n_k, n_splits, ema, n_sinks, head_reduce, merge_block)
