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
    if ema is None and os.environ.get("CASCADECTL_KERNELS") != "ref":
        return attention_no_scores(q, k, v, scale), None
    return chunk_attention_ref(q, k, v, scale, ema, n_sinks, head_reduce)
