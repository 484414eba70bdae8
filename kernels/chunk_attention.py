"""Attention of one prefill chunk over `[sinks | cache | chunk]`, with the exact EMA scores of the cascade.

Shapes: q [B, Hq, L, D] (rotated), k, v [B, Hkv, K, D] (rotated keys), K >= L. The first K - L keys (sinks and
cache) are visible to every query; the last L are the chunk's own keys, causal. GQA: query head h reads KV head
h // G with G = Hq / Hkv, never materialising repeated K/V.

Scores (docs/ALGORITHM.md §3): with ema weights w_m = (1 - β) β^(L-1-m), key j of the chunk's attention gets
    score_j = Σ_m w_m softmax(q_m · k / sqrt-ish scale)_j
summed over the chunk's queries per query head, then reduced over the G heads of its KV group (max or mean),
the first `n_sinks` columns dropped: [B, Hkv, K - n_sinks] float32. The softmax denominator is exact.
Optional `softcap` (Gemma 2's tanh capping of the logits) and `window` (a sliding-window layer's band) run on
the torch paths only (`chunk_attention_capped`); without them every path is unchanged.

Cost: 4·B·Hq·L·K·D FLOPs for the output plus 2·B·Hq·L·K·D for the scores; memory traffic is dominated by the
[L, K] probability blocks, so the reference walks the queries in blocks.

On CUDA (bf16/fp16, D 64/128) the Triton kernels below run instead: a flash forward that also writes each
query's log-sum-exp, then a pass per block of keys that recomputes q·k and sums exp(q·k·scale - lse + log w)
over the queries (§3 (a): compute-bound, about 1.5 flash forwards). One query (decode) is split over the keys
so that batch 1 fills the GPU (kernels/decode_attention.py). Without triton, or with CASCADECTL_KERNELS=ref, the torch paths run.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from ._blocks import _online_softmax, _store_forward
from ._triton import LOG2E, tl, triton
from ._triton import jit as _jit
from .cpu_attention import chunk_attention_blocks
from .decode_attention import _decode_triton


def ema_weights(n_queries: int, beta: float, device: torch.device | str = "cpu", last: int | None = None) -> Tensor:
    """(1 - β) β^(L-1-m) for m = 0 .. L-1, float32: query m's share of the EMA after the whole chunk.

    `last` = R (`--scores last:R`, docs/ALGORITHM.md §3): only the last R queries weigh, scaled by
    (1 - β^L) / (1 - β^R) so that the chunk adds the score mass of all L queries; the others weigh 0, which every
    kernel accepts (log 0 = -inf bias on CUDA) and the CPU pass skips."""
    exponent = torch.arange(n_queries - 1, -1, -1, device=device, dtype=torch.float64)
    w = (1 - beta) * torch.pow(torch.tensor(beta, dtype=torch.float64), exponent)
    if last is not None and last < n_queries:
        w[: n_queries - last] = 0.0
        w *= (1 - beta**n_queries) / (1 - beta**last)
    return w.float()


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str = "cpu") -> Tensor:
    """[L, K] bool, True where query m may see key j: every cached key, and chunk keys up to its own."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


# ---- Triton kernels (CUDA, bf16/fp16, D 64/128). Logits live in the log2 domain: s2 = q·k · scale · log2(e).


@_jit
def _chunk_attn_fwd_kernel(
    Q, K, V, OUT, BIAS, EMA,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    n_q, n_k, n_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    """Pass 1: flash forward of BLOCK_M queries of one query head over its KV head's keys.
    Writes out and, for the scores, BIAS[b, h, m] = log2(w_m) - lse2_m (lse2: base-2 log-sum-exp)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)  # int64 offsets: h·stride overflows int32 past 2^31 elements
    h = (pid_bh % n_heads).to(tl.int64)
    kvh = h // group
    n_c = n_k - n_q  # sinks + cache: visible to every query
    m_start = pid_m * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=offs_m[:, None] < n_q, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # keys j <= n_c + m_start are seen by every row of the block: no mask
    hi_free = ((n_c + m_start + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(0, hi_free, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None])  # [D, BLOCK_N]
        s = tl.dot(q, kt) * qk_scale
        m_i, l_i, p, alpha = _online_softmax(s, m_i, l_i)
        # v after the statistics, not before as `_softmax_step` takes it: loading it earlier changes the schedule
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    # the diagonal: chunk key j is seen by query m iff j <= n_c + m
    hi = tl.minimum(n_k, n_c + m_start + BLOCK_M)
    for start_n in range(hi_free, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None], mask=cols[None, :] < n_k, other=0.0)
        s = tl.dot(q, kt) * qk_scale
        visible = (cols[None, :] <= offs_m[:, None] + n_c) & (cols[None, :] < n_k)
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, p, alpha = _online_softmax(s, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < n_k, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    _store_forward(OUT, BIAS, EMA, b, h, pid_bh, offs_m, offs_d, n_q, stride_ob, stride_oh, stride_om, m_i, l_i, acc,
                   WITH_SCORES)


@_jit
def _chunk_attn_scores_kernel(
    Q, K, BIAS, SCORES,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    n_q, n_k, n_kv_heads, n_sinks, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):
    """Pass 2: one program owns BLOCK_N keys of one KV head and walks the queries of each of its GROUP query
    heads, summing w_m p(m, j) = exp2(s2 + BIAS_m) per key (no atomics); then max or mean over the heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    kvh = (pid_bh % n_kv_heads).to(tl.int64)
    n_c = n_k - n_q
    start_n = n_sinks + pid_n * BLOCK_N  # sink columns get no score: skip them
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=cols[:, None] < n_k, other=0.0)  # [BLOCK_N, D], reused for every query block
    # query blocks that straddle the diagonal need the causal mask; earlier ones see none of these keys
    m_begin = (tl.maximum(start_n - n_c, 0) // BLOCK_M) * BLOCK_M
    m_diag = tl.cdiv(tl.minimum(tl.maximum(start_n + BLOCK_N - n_c, 0), n_q), BLOCK_M) * BLOCK_M
    result = tl.zeros([BLOCK_N], tl.float32)  # column sums are >= 0, so 0 is the identity of max too
    for g in range(GROUP):
        h = kvh * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        bias_base = BIAS + (b * n_kv_heads * GROUP + h) * n_q
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for m0 in range(m_begin, m_diag, BLOCK_M):
            rows = m0 + offs_m
            qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None], mask=rows[None, :] < n_q, other=0.0)
            bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))
            s = tl.dot(k, qt) * qk_scale + bias[None, :]  # [BLOCK_N, BLOCK_M]
            acc += tl.where(cols[:, None] <= rows[None, :] + n_c, tl.exp2(s), 0.0)
        for m0 in range(m_diag, n_q, BLOCK_M):
            rows = m0 + offs_m
            qt = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None], mask=rows[None, :] < n_q, other=0.0)
            bias = tl.load(bias_base + rows, mask=rows < n_q, other=float("-inf"))  # padding rows: exp2 -> 0
            acc += tl.exp2(tl.dot(k, qt) * qk_scale + bias[None, :])
        col = tl.sum(acc, 1)
        if REDUCE_MAX:
            result = tl.maximum(result, col)
        else:
            result += col
    if not REDUCE_MAX:
        result = result / GROUP
    n_out = n_k - n_sinks
    tl.store(SCORES + pid_bh.to(tl.int64) * n_out + (cols - n_sinks), result, mask=cols < n_k)


def _reduce_heads(col: Tensor, head_reduce: str, n_sinks: int) -> Tensor:
    """EMA column sums per query head [B, Hkv, G, K] -> scores [B, Hkv, K - sinks]: max or mean over each KV
    group's G heads, the sink columns dropped."""
    scores = col.amax(dim=2) if head_reduce == "max" else col.mean(dim=2)
    return scores[:, :, n_sinks:]


def chunk_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    block: int = 256,
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Plain torch, float32 softmax; returns (out [B, Hq, L, D] in q's dtype, scores or None).

    `softcap` caps the logits as Gemma 2 does, s -> tanh(s / softcap) · softcap after the scale; `window` is a
    sliding window: key j is hidden from query m when it is `window` or more positions older (its index
    j <= K - L + m - window), the rule of transformers' sliding-window masks."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    assert hq == g * hkv and n_k >= n_q, (q.shape, k.shape)
    kt = k.float().transpose(-1, -2)  # [B, Hkv, D, K]
    vf = v.float()
    out = torch.empty_like(q)
    col = torch.zeros(b, hkv, g, n_k, dtype=torch.float32, device=q.device) if ema is not None else None
    qg = q.view(b, hkv, g, n_q, d)  # query heads of one KV group side by side
    keys = torch.arange(n_k, device=q.device)
    for m0 in range(0, n_q, block):
        m1 = min(n_q, m0 + block)
        rows = m1 - m0
        qb = qg[:, :, :, m0:m1].float().reshape(b, hkv, g * rows, d)  # [B, Hkv, G·rows, D]
        s = (qb @ kt).view(b, hkv, g, rows, n_k) * scale  # read G·rows·D + D·K, write G·rows·K
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        own = (n_k - n_q + torch.arange(m0, m1, device=q.device)).unsqueeze(1)  # each query's own key index
        hidden = keys > own  # [rows, K]
        if window is not None:
            hidden |= keys <= own - window
        p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
        o = p.view(b, hkv, g * rows, n_k) @ vf  # [B, Hkv, G·rows, D]
        out[:, :, m0:m1] = o.view(b, hkv, g, rows, d).reshape(b, hq, rows, d).to(q.dtype)
        if col is not None:
            col += torch.einsum("m,bhgmk->bhgk", ema[m0:m1], p)
    if col is None:
        return out, None
    return out, _reduce_heads(col, head_reduce, n_sinks)


_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _groups(x: Tensor, g: int) -> Tensor:
    """[B, Hkv, T, D] -> [B, Hkv·G, T, D] as a stride-0 view (no copy of K/V)."""
    b, h, t, d = x.shape
    return x.unsqueeze(2).expand(b, h, g, t, d).reshape(b, h * g, t, d) if g > 1 else x


def _merge(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial softmax attentions over disjoint key sets from their outputs and log-sum-exps."""
    lse = torch.logaddexp(l1, l2)
    out = o1.float() * torch.exp(l1 - lse).unsqueeze(-1) + o2.float() * torch.exp(l2 - lse).unsqueeze(-1)
    return out, lse


FEW_QUERIES = 16  # up to this many queries, one plain block (`chunk_attention_few`) beats the fused CPU kernel


def chunk_attention_few(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_ref`, for a few queries (decode steps) on the CPU: one block, logits and
    softmax in float32 as the reference, but P·V in the values' dtype (P rounded to bf16/fp16 before the product,
    as the fused prefill kernels do) instead of converting every cached value to float32 first. The scores come
    from the float32 probabilities, as the reference's."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * n_q, d).float()  # query heads of one KV group side by side, rows (g, m)
    s = (qg @ k.float().transpose(-1, -2)).mul_(scale).view(b, hkv, g, n_q, n_k)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if window is not None and n_k > window:
        s.masked_fill_(~causal_mask(n_q, n_k, q.device).triu(n_k - n_q - window + 1), float("-inf"))
    elif n_q > 1:
        s.masked_fill_(~causal_mask(n_q, n_k, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = p.view(b, hkv, g * n_q, n_k).to(v.dtype) @ v  # [B, Hkv, G·L, D]
    out = o.view(b, hkv, g, n_q, d).reshape(b, hq, n_q, d).to(q.dtype)
    if ema is None:
        return out, None
    col = torch.einsum("m,bhgmk->bhgk", ema.to(p.device, torch.float32), p)
    return out, _reduce_heads(col, head_reduce, n_sinks)


def chunk_attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_ref`. A few queries (decode): `chunk_attention_few`. A chunk: one pass
    block by block that yields the output and the exact EMA column sums from the same float32 probabilities
    (`chunk_attention_blocks`, kernels/cpu_attention.py); at layer shape in bf16 it is 3x faster than the flash
    pass plus the flash-run-backwards score pass it replaced, and faster than the flash output alone. Only float32
    and float16 without scores keep torch's fused flash kernel (cache keys unmasked and chunk keys square causal,
    merged by LSE), which is faster there (bench/cpu_scores.py, docs/BENCHMARKS.md)."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g, n_c = hq // hkv, n_k - n_q
    if n_q <= FEW_QUERIES:  # decode steps: the fused kernel's per-call overhead dwarfs a [G, K] softmax
        return chunk_attention_few(q, k, v, scale, ema, n_sinks, head_reduce)
    if ema is not None or q.dtype == torch.bfloat16:
        out, col = chunk_attention_blocks(q, k, v, scale, ema)
        return out, None if col is None else _reduce_heads(col, head_reduce, n_sinks)
    kq, vq = _groups(k, g), _groups(v, g)
    out, lse = _flash_cpu(q, kq[:, :, n_c:], vq[:, :, n_c:], 0.0, True, scale=scale)
    if n_c:
        o1, l1 = _flash_cpu(q, kq[:, :, :n_c], vq[:, :, :n_c], 0.0, False, scale=scale)
        out = _merge(o1, l1, out, lse)[0].to(q.dtype)
    return out, None


# Block shapes per head dim, the fastest of bench/prefill_latency.py --tune on an H100 (docs/BENCHMARKS_GPU.md);
# D 64 is untuned. The forward's 128 x 128 tiles at 3 stages: bench/chunk_kernels.py on an H200, three runs,
# 9.10-9.19 ms per chunk of 4,096 over 65,600 keys against 9.25-9.35 for 128 x 64 at 4 (docs/BENCHMARKS.md,
# session 6). Decode's DECODE_CONFIG lives in kernels/decode_attention.py.
FWD_CONFIG = {128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
              64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)}
SCORES_CONFIG = {128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
                 64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)}


def _fit_rows(block: int, n_q: int) -> int:
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
    One query (decode) goes to the split-K kernels. No host sync."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    assert hq == g * hkv and n_k >= n_q and k.shape == v.shape and d in (16, 32, 64, 128, 256), (q.shape, k.shape)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head dim must be contiguous"
    qk_scale = scale * LOG2E
    if n_q == 1:
        return _decode_triton(q, k, v, qk_scale, ema, n_sinks, head_reduce, decode_config)
    fc = dict(fwd_config or FWD_CONFIG.get(d, FWD_CONFIG[128]))
    fc["BLOCK_M"] = _fit_rows(fc["BLOCK_M"], n_q)
    out = torch.empty_like(q)
    with_scores = ema is not None
    bias = torch.empty(b, hq, n_q, dtype=torch.float32, device=q.device) if with_scores else out
    ema_f = ema.to(device=q.device, dtype=torch.float32).contiguous() if with_scores else bias
    grid = (triton.cdiv(n_q, fc["BLOCK_M"]), b * hq)
    _chunk_attn_fwd_kernel[grid](
        q, k, v, out, bias, ema_f,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n_q, n_k, hq, g, qk_scale,
        HEAD_DIM=d, WITH_SCORES=with_scores, **fc,
    )
    if not with_scores:
        return out, None
    sc = dict(scores_config or SCORES_CONFIG.get(d, SCORES_CONFIG[128]))
    sc["BLOCK_M"] = _fit_rows(sc["BLOCK_M"], n_q)
    scores = torch.empty(b, hkv, n_k - n_sinks, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n_k - n_sinks, sc["BLOCK_N"]), b * hkv)
    _chunk_attn_scores_kernel[grid](
        q, k, bias, scores,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        n_q, n_k, hkv, n_sinks, qk_scale,
        GROUP=g, HEAD_DIM=d, REDUCE_MAX=head_reduce == "max", **sc,
    )
    return out, scores


def triton_supports(q: Tensor, k: Tensor) -> bool:
    """Triton path: CUDA, 16-bit floats, head dim 64 or 128, and triton importable."""
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.dtype == q.dtype
        and q.shape[-1] in (64, 128)
    )


def attention_no_scores(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The same attention without scores (sink and full policies): one fused SDPA call."""
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def chunk_attention_capped(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_ref` with its `softcap` and `window` (Gemma's local layers and logit
    capping). Keys older than every query's window are cut off first (they get score 0), which leaves a decode
    step with a plain attention over its last `window` keys for the fast paths; what still needs the capped
    logits or the banded mask runs on the torch paths: the few-queries block on the CPU, else the reference."""
    n_q, n_k = q.shape[2], k.shape[2]
    lo = max(0, n_k - n_q - window + 1) if window is not None else 0
    if lo:  # keys 0 .. lo-1 are hidden from every query
        out, scores = chunk_attention_capped(q, k[:, :, lo:], v[:, :, lo:], scale, ema, max(n_sinks - lo, 0),
                                             head_reduce, softcap, window)
        return out, None if scores is None else F.pad(scores, (max(lo - n_sinks, 0), 0))
    if softcap is None and (window is None or n_k <= window):
        return chunk_attention(q, k, v, scale, ema, n_sinks, head_reduce)
    if q.device.type == "cpu" and n_q <= FEW_QUERIES and os.environ.get("CASCADECTL_KERNELS") != "ref":
        return chunk_attention_few(q, k, v, scale, ema, n_sinks, head_reduce, softcap, window)
    return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce, softcap=softcap, window=window)


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    softcap: float | None = None,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Dispatcher: the engine calls only this. CASCADECTL_KERNELS=ref forces the reference. A `softcap` or a
    `window` shorter than the keys goes to `chunk_attention_capped`; without them nothing changes."""
    if softcap is not None or (window is not None and k.shape[2] > window):
        return chunk_attention_capped(q, k, v, scale, ema, n_sinks, head_reduce, softcap, window)
    if os.environ.get("CASCADECTL_KERNELS") == "ref":
        return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
    if q.device.type == "cpu":
        return chunk_attention_cpu(q, k, v, scale, ema, n_sinks, head_reduce)
    if triton_supports(q, k):
        return chunk_attention_triton(q, k, v, scale, ema, n_sinks, head_reduce)
    if ema is None:
        return attention_no_scores(q, k, v, scale), None
    return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
