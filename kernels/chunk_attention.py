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

This module holds the torch paths and the `chunk_attention` dispatcher (which path runs: kernels/dispatch.py).
On CUDA (bf16/fp16, D 64/128) the Triton kernels run instead (`chunk_attention_triton`, kernels/prefill_triton.py):
a flash forward that also writes each query's log-sum-exp, then a pass per block of keys that recomputes q·k and
sums exp(q·k·scale - lse + log w) over the queries (§3 (a): compute-bound, about 1.5 flash forwards). One query
(decode) is split over the keys so that batch 1 fills the GPU (kernels/decode_attention.py). Without triton, or
with CASCADECTL_KERNELS=ref, the torch paths run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .cpu_attention import chunk_attention_blocks
from .prefill_triton import FWD_CONFIG, SCORES_CONFIG, chunk_attention_triton  # noqa: F401 - *_CONFIG: re-exported


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
    if n_q <= FEW_QUERIES and dispatch.attention_path(q, k) == "cpu":
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
    path = dispatch.attention_path(q, k)
    if path == "ref":
        return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
    if path == "cpu":
        return chunk_attention_cpu(q, k, v, scale, ema, n_sinks, head_reduce)
    if path == "triton":
        return chunk_attention_triton(q, k, v, scale, ema, n_sinks, head_reduce)
    if ema is None:
        return attention_no_scores(q, k, v, scale), None
    return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
