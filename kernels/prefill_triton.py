"""Launching the Triton attention kernels (CUDA, bf16/fp16, D 64/128; kernels/prefill_kernels.py) and their block
shapes, for both key layouts:

    chunk_attention_triton(q, k, v, scale, ema, n_sinks, head_reduce)       keys rotated, in attention order
    chunk_attention_paged_triton(q, k_cache, v_cache, order, k_new, v_new, cos, sin, scale, ema, n_sinks,
                                 head_reduce)                               straight from the cache's buffers
    materialise_triton(k_cache, v_cache, order, k_new, v_new, cos, sin)    the paged keys rotated, in order

Their contracts are `chunk_attention_ref` (kernels/chunk_attention.py) and `chunk_attention_paged_ref`
(kernels/paged_attention.py). One query (decode) goes to the split-K kernels of kernels/decode_attention.py. No
host sync anywhere. Which of them runs is decided in kernels/dispatch.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._triton import LOG2E, triton
from .decode_attention import decode_paged_triton, decode_triton
from .prefill_kernels import (forward_kernel, gather_rotate_kernel, paged_forward_kernel, paged_scores_kernel,
                              scores_kernel)

# Block shapes per head dim, the fastest of bench/prefill_latency.py --tune on an H100 (docs/BENCHMARKS_GPU.md);
# D 64 is untuned. The forward's 128 x 128 tiles at 3 stages: bench/chunk_kernels.py on an H200, three runs,
# 9.10-9.19 ms per chunk of 4,096 over 65,600 keys against 9.25-9.35 for 128 x 64 at 4 (docs/BENCHMARKS.md,
# session 6). Decode's DECODE_CONFIG lives in kernels/decode_attention.py.
FWD_CONFIG = {128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)}
SCORES_CONFIG = {128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
                 64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)}

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


def fit_rows(block: int, n_q: int) -> int:
    """A query block no taller than the chunk (at least 16 rows for the matrix unit)."""
    return min(block, max(16, triton.next_power_of_2(n_q)))


def chunk_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    fwd_config: dict | None = None,
    scores_config: dict | None = None,
    decode_config: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_ref`. Two passes: flash forward writing out and per-query
    log2(w) - lse; then per key block, the EMA-weighted column sums recomputed from q·k (exact denominator).
    One query (decode) goes to the split-K kernels."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    assert hq == g * hkv and n_k >= n_q and k.shape == v.shape and d in (16, 32, 64, 128, 256), (q.shape, k.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head dim must be contiguous"
    qk_scale = scale * LOG2E
    if n_q == 1:
        return decode_triton(q, k, v, qk_scale, ema, n_sinks, head_reduce, decode_config)
    return _two_passes(q, (k, v), (*k.stride()[:3], *v.stride()[:3]), n_k - n_q, qk_scale, ema, n_sinks, head_reduce,
                       fwd_config or FWD_CONFIG.get(d, FWD_CONFIG[128]),
                       scores_config or SCORES_CONFIG.get(d, SCORES_CONFIG[128]), paged=False)


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


def _paged_strides(k_cache, v_cache, k_new, v_new, cos) -> tuple[int, ...]:
    """The strides the kernels take after their pointers: cache K, V and chunk K, V (batch, head, row), table row."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride()[:3], *v_new.stride()[:3], cos.stride(0))


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
    gather_rotate_kernel[(triton.cdiv(n_k, block_n), b * hkv)](
        k_cache, v_cache, _valid_order(order), k_new, v_new, cos, sin, k_all, v_all,
        *_paged_strides(k_cache, v_cache, k_new, v_new, cos),
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
    """Same contract as `chunk_attention_paged_ref`, on the Triton kernels. `prerotate` (default:
    L >= PREROTATE_MIN_QUERIES) rotates the keys once into a scratch copy and runs the unpaged kernels instead."""
    _check_paged(q, k_cache, v_cache, order, k_new, v_new, cos, sin)
    d, n_q, n_past = q.shape[3], q.shape[2], order.shape[0]
    qk_scale = scale * LOG2E
    if n_q == 1:
        return decode_paged_triton(q, k_cache, v_cache, _valid_order(order), n_past, k_new, v_new, cos, sin,
                                   qk_scale, ema, n_sinks, head_reduce, decode_config)
    if prerotate is None:
        prerotate = n_q >= PREROTATE_MIN_QUERIES
    if prerotate:
        k_all, v_all = materialise_triton(k_cache, v_cache, order, k_new, v_new, cos, sin)
        return chunk_attention_triton(q, k_all, v_all, scale, ema, n_sinks, head_reduce, fwd_config, scores_config)
    sources = (k_cache, v_cache, _valid_order(order), k_new, v_new, cos, sin)
    return _two_passes(q, sources, _paged_strides(k_cache, v_cache, k_new, v_new, cos), n_past, qk_scale, ema,
                       n_sinks, head_reduce, fwd_config or PAGED_FWD_CONFIG.get(d, PAGED_FWD_CONFIG[128]),
                       scores_config or PAGED_SCORES_CONFIG.get(d, PAGED_SCORES_CONFIG[128]), paged=True)


def _two_passes(q: Tensor, sources: tuple, strides: tuple, n_past: int, qk_scale: float, ema: Tensor | None,
                n_sinks: int, head_reduce: str, fwd_config: dict, scores_config: dict,
                paged: bool) -> tuple[Tensor, Tensor | None]:
    """Both passes for L > 1. `sources` are the key/value tensors the kernels take after Q, with `strides` theirs:
    (K, V) and 6 strides unpaged, (KC, VC, ORDER, KN, VN, COS, SIN) and 13 paged (`_paged_strides`)."""
    b, hq, n_q, d = q.shape
    hkv = sources[0].shape[1]
    g, n_k = hq // hkv, n_past + n_q
    fc = dict(fwd_config)
    fc["BLOCK_M"] = fit_rows(fc["BLOCK_M"], n_q)
    out = torch.empty_like(q)
    with_scores = ema is not None
    bias = torch.empty(b, hq, n_q, dtype=torch.float32, device=q.device) if with_scores else out
    ema_f = ema.to(device=q.device, dtype=torch.float32).contiguous() if with_scores else bias
    (paged_forward_kernel if paged else forward_kernel)[(triton.cdiv(n_q, fc["BLOCK_M"]), b * hq)](
        q, *sources, out, bias, ema_f,
        q.stride(0), q.stride(1), q.stride(2),
        *strides,
        out.stride(0), out.stride(1), out.stride(2),
        n_q, n_past if paged else n_k, hq, g, qk_scale,
        HEAD_DIM=d, WITH_SCORES=with_scores, **fc,
    )
    if not with_scores:
        return out, None
    sc = dict(scores_config)
    sc["BLOCK_M"] = fit_rows(sc["BLOCK_M"], n_q)
    scores = torch.empty(b, hkv, n_k - n_sinks, dtype=torch.float32, device=q.device)
    # the keys' tensors without the values: K, or KC, ORDER, KN, COS, SIN (strides: K's, KN's, the table's)
    keys, key_strides = (sources[:1], strides[:3]) if not paged else (
        (sources[0], *sources[2:4], *sources[5:]), (*strides[:3], *strides[6:9], strides[12]))
    (paged_scores_kernel if paged else scores_kernel)[(triton.cdiv(n_k - n_sinks, sc["BLOCK_N"]), b * hkv)](
        q, *keys, bias, scores,
        q.stride(0), q.stride(1), q.stride(2),
        *key_strides,
        n_q, n_past if paged else n_k, hkv, n_sinks, qk_scale,
        GROUP=g, HEAD_DIM=d, REDUCE_MAX=head_reduce == "max", **sc,
    )
    return out, scores
