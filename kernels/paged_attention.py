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
values are read through `order` too (`chunk_attention_paged_triton`, kernels/prefill_triton.py: the PAGED layout
of the kernels in kernels/prefill_kernels.py; one query goes to the split-K decode kernels of
kernels/decode_attention.py). For long chunks, where every (query block, head) program would rotate the same key
tiles again, `materialise_triton` instead gathers and rotates once per chunk in one pass for the unpaged kernels
(PREROTATE_MIN_QUERIES). Elsewhere the gather, cat and RoPE are done in torch and the `chunk_attention`
dispatcher runs on the result: the CPU path is the engine's old one, step for step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .chunk_attention import chunk_attention, chunk_attention_ref
from .prefill_triton import (  # noqa: F401 - PAGED_*, materialise_triton: re-exported (bench/, tests)
    PAGED_FWD_CONFIG,
    PAGED_SCORES_CONFIG,
    PREROTATE_MIN_QUERIES,
    chunk_attention_paged_triton,
    materialise_triton,
)
from .rope import apply_rope


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


def paged_supported(q: Tensor, k_cache: Tensor) -> bool:
    """Whether `chunk_attention_paged` runs its fused kernels here (otherwise it materialises, as the engine
    did before); False under CASCADECTL_KERNELS=ref."""
    return dispatch.attention_path(q, k_cache) == "triton"


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
