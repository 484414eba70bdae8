"""Attention of one prefill chunk over `[sinks | cache | chunk]`, with the exact EMA scores of the cascade.

Shapes: q [B, Hq, L, D] (rotated), k, v [B, Hkv, K, D] (rotated keys), K >= L. The first K - L keys (sinks and
cache) are visible to every query; the last L are the chunk's own keys, causal. GQA: query head h reads KV head
h // G with G = Hq / Hkv, never materialising repeated K/V.

Scores (docs/ALGORITHM.md §3): with ema weights w_m = (1 - β) β^(L-1-m), key j of the chunk's attention gets
    score_j = Σ_m w_m softmax(q_m · k / sqrt-ish scale)_j
summed over the chunk's queries per query head, then reduced over the G heads of its KV group (max or mean),
the first `n_sinks` columns dropped: [B, Hkv, K - n_sinks] float32. The softmax denominator is exact.

Cost: 4·B·Hq·L·K·D FLOPs for the output plus 2·B·Hq·L·K·D for the scores; memory traffic is dominated by the
[L, K] probability blocks, so the reference walks the queries in blocks.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor


def ema_weights(n_queries: int, beta: float, device: torch.device | str = "cpu") -> Tensor:
    """(1 - β) β^(L-1-m) for m = 0 .. L-1, float32: query m's share of the EMA after the whole chunk."""
    exponent = torch.arange(n_queries - 1, -1, -1, device=device, dtype=torch.float64)
    return ((1 - beta) * torch.pow(torch.tensor(beta, dtype=torch.float64), exponent)).float()


def causal_mask(n_queries: int, n_keys: int, device: torch.device | str = "cpu") -> Tensor:
    """[L, K] bool, True where query m may see key j: every cached key, and chunk keys up to its own."""
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)


def chunk_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
    block: int = 256,
) -> tuple[Tensor, Tensor | None]:
    """Plain torch, float32 softmax; returns (out [B, Hq, L, D] in q's dtype, scores or None)."""
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
        hidden = keys > (n_k - n_q + torch.arange(m0, m1, device=q.device)).unsqueeze(1)  # [rows, K]
        p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
        o = p.view(b, hkv, g * rows, n_k) @ vf  # [B, Hkv, G·rows, D]
        out[:, :, m0:m1] = o.view(b, hkv, g, rows, d).reshape(b, hq, rows, d).to(q.dtype)
        if col is not None:
            col += torch.einsum("m,bhgmk->bhgk", ema[m0:m1], p)
    if col is None:
        return out, None
    scores = col.amax(dim=2) if head_reduce == "max" else col.mean(dim=2)
    return out, scores[:, :, n_sinks:]


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


def chunk_attention_cpu(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `chunk_attention_ref`, built from torch's fused CPU flash-attention kernel.

    Pass 1: output and per-query LSE, cache keys (unmasked) and chunk keys (square causal) merged by LSE.
    Pass 2, the exact scores, is flash attention run backwards: the keys act as queries over the chunk's queries,
    with the per-query bias log w_m - lse_m folded into two extra dimensions (split hi/lo so that bf16 inputs
    keep the bias to ~1e-5). Its log-sum-exp is log Σ_m w_m p(m, j), exactly the EMA column sum; no [L, K]
    probability matrix is ever materialised. Costs about two flash passes."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g, n_c = hq // hkv, n_k - n_q
    kq, vq = _groups(k, g), _groups(v, g)
    o2, l2 = _flash_cpu(q, kq[:, :, n_c:], vq[:, :, n_c:], 0.0, True, scale=scale)
    if n_c:
        o1, l1 = _flash_cpu(q, kq[:, :, :n_c], vq[:, :, :n_c], 0.0, False, scale=scale)
        out, lse = _merge(o1, l1, o2, l2)
        out = out.to(q.dtype)
    else:
        out, lse = o2, l2
    if ema is None:
        return out, None
    bias = (torch.log(ema) - lse) / scale  # [B, Hq, L]; the kernel multiplies every dimension by `scale`
    hi = bias.to(q.dtype)
    lo = (bias - hi.float()).to(q.dtype)
    q_aug = torch.cat([q, hi.unsqueeze(-1), lo.unsqueeze(-1)], dim=-1)  # [B, Hq, L, D+2]
    ones = k.new_ones(b, hkv, n_k, 2)
    k_aug = _groups(torch.cat([k, ones], dim=-1), g)  # [B, Hq, K, D+2]
    zeros = q.new_zeros(b, hq, n_q, d + 2)  # values are irrelevant, only the LSE is used (stride-0 views are 10x slower)
    col = torch.empty(b, hq, n_k, dtype=torch.float32, device=q.device)
    if n_c:
        col[:, :, :n_c] = _flash_cpu(k_aug[:, :, :n_c], q_aug, zeros, 0.0, False, scale=scale)[1]
    # chunk key j is seen by queries m >= j: reversing both orders makes that a square top-left causal mask
    rev = _flash_cpu(k_aug[:, :, n_c:].flip(2), q_aug.flip(2), zeros, 0.0, True, scale=scale)[1]
    col[:, :, n_c:] = rev.flip(2)
    col = torch.exp(col).view(b, hkv, g, n_k)
    scores = col.amax(dim=2) if head_reduce == "max" else col.mean(dim=2)
    return out, scores[:, :, n_sinks:]


def attention_no_scores(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The same attention without scores (sink and full policies): one fused SDPA call."""
    mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    ema: Tensor | None = None,
    n_sinks: int = 0,
    head_reduce: str = "max",
) -> tuple[Tensor, Tensor | None]:
    """Dispatcher: the engine calls only this. CASCADECTL_KERNELS=ref forces the reference."""
    if os.environ.get("CASCADECTL_KERNELS") == "ref":
        return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
    if q.device.type == "cpu":
        return chunk_attention_cpu(q, k, v, scale, ema, n_sinks, head_reduce)
    if ema is None:
        return attention_no_scores(q, k, v, scale), None
    return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
