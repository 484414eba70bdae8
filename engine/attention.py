"""Our attention forward for Llama-like decoders (SUPPORTED_FAMILIES; what differs per family: engine/families.py).

Inside `patched_attention(model)`, every decoder layer's `self_attn.forward` is replaced by one that projects
q, k, v, keeps the chunk's keys *before* RoPE, rotates the cache's keys at their slot positions (their rank in
`cache.past`, sinks first) and the chunk's queries/keys right after them, attends over `[past | chunk]` and hands
the new keys/values and scores to the cache. The original forwards are restored on exit, also after an exception.

Where the fused Triton kernels run (CUDA, bf16/fp16, D 64/128) and no score hook needs the rotated keys, the
attention reads the cache's buffers in place (`cache.past_slots`) and rotates keys inside the kernels
(`cascade_kernels.paged_attention`). Elsewhere (CPU, other dtypes, question-guided retention) it gathers `cache.past`,
rotates all keys in torch and calls the `cascade_kernels.chunk_attention` dispatcher.

The per-chunk state (cache, rotary tables, EMA weights) lives in one `StepContext` owned by the caller, so the
patched modules hold no mutable state of their own. For a model spread over several devices the context also
carries the tables on each device, and each layer picks those of its own device.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from cascade_kernels.chunk_attention import chunk_attention
from cascade_kernels.paged_attention import chunk_attention_paged, paged_supported
from cascade_kernels.rope import apply_rope, rotate_half, rotate_queries  # noqa: F401 - re-exported (retention, bench)

from .cache.base import KVCache
from .errors import UnsupportedModelError
from .families import SUPPORTED_FAMILIES, LayerAttention, layer_attentions
from .slot_decode import decode_in_place


@dataclass
class StepContext:
    """Everything a chunk's attention needs besides the layer weights."""

    cache: KVCache
    cos: Tensor  # [K, D] rotary tables for positions 0 .. K-1 (K = past + chunk)
    sin: Tensor
    ema: Tensor | None  # [L] EMA weights when the cache wants scores
    head_reduce: str = "max"
    # called as hook(layer, k_all, scores) -> scores with the rotated keys [B, Hkv, K, D] and the chunk's scores
    # [B, Hkv, K - sinks]; used by question-guided retention (engine/retention.py)
    score_hook: Callable[..., Tensor] | None = None
    # called as hook(layer, q) with the chunk's queries before RoPE [B, Hq, L, D]; retention captures the question's
    query_hook: Callable[..., None] | None = None
    # called as hook(layer, k) with the chunk's keys before RoPE [B, Hkv, L, D]; the evidence store scores them
    key_hook: Callable[..., None] | None = None
    # (cos, sin, ema) on every other device that holds layers, when the model is spread over several (device_map)
    per_device: dict[torch.device, tuple[Tensor, Tensor, Tensor | None]] | None = None
    # a CPU decode step: cos, sin covering every slot's own index too, for the in-place path (engine/slot_decode.py)
    slot_tables: tuple[Tensor, Tensor] | None = None
    memo: dict = field(default_factory=dict)  # what the step's layers share (engine/slot_decode.py)

    def tables(self, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """cos, sin and EMA weights on `layer`'s device."""
        if self.per_device is not None:
            found = self.per_device.get(self.cache.shape.device_of(layer))
            if found is not None:
                return found
        return self.cos, self.sin, self.ema


def check_family(model: nn.Module) -> None:
    family = getattr(model.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model type {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )


class ContextSlot:
    """Where the caller puts the step in flight's context for the patched layers to read (None between steps)."""

    ctx: StepContext | None = None


def _forward(attn: nn.Module, slot: ContextSlot, fam: LayerAttention) -> Callable:
    def forward(hidden_states: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        ctx = slot.ctx
        assert ctx is not None, "patched attention called outside a cascadectl step"
        b, n_new, _ = hidden_states.shape
        q, k, v = fam.project(hidden_states)  # [B, Hq, L, D], [B, Hkv, L, D] x2, before RoPE

        layer = attn.layer_idx
        if not isinstance(ctx, StepContext):  # a context that attends itself (engine/batch_answer.py)
            out = ctx.attend(layer, fam, q, k, v)
            return attn.o_proj(out.transpose(1, 2).reshape(b, n_new, -1)), None
        if ctx.query_hook is not None:
            ctx.query_hook(layer, q)
        if ctx.key_hook is not None:
            ctx.key_hook(layer, k)
        cos, sin, ema = ctx.tables(layer)
        cos, sin = fam.tables(cos, sin)  # this layer's RoPE: the default tables, its layer type's, or none
        n_sinks = ctx.cache.n_unscored  # sinks (and evidence spans): attended, never scored
        # Triton launches on the current CUDA device, not the tensors': make it this layer's when layers are spread
        on_layer = torch.cuda.device(q.device) if ctx.per_device is not None and q.is_cuda else nullcontext()
        # soft-capped layers, and local-window ones with keys beyond their window, take the torch paths
        if ctx.slot_tables is not None and ctx.score_hook is None and fam.plain(cos.shape[0]):  # CPU decode
            long_cos, long_sin = fam.tables(*ctx.slot_tables)
            out, scores = decode_in_place(ctx.cache, layer, q, k, v, long_cos, long_sin,
                                          (ctx.slot_tables[0].data_ptr(), fam.rope_kind, fam.use_rope),
                                          fam.scaling, ema, ctx.head_reduce, ctx.memo)
        elif ctx.score_hook is None and fam.plain(cos.shape[0]) and paged_supported(q, k):  # rotated in the kernels
            q_rot = rotate_queries(q, cos[-n_new:], sin[-n_new:])
            k_buf, v_buf, order = ctx.cache.past_slots(layer)  # pre-RoPE buffers, slot of each age rank
            with on_layer:
                out, scores = chunk_attention_paged(q_rot, k_buf, v_buf, order, k, v, cos, sin, fam.scaling, ema,
                                                    n_sinks, ctx.head_reduce)
        else:
            q_rot = rotate_queries(q, cos[-n_new:], sin[-n_new:])
            k_past, v_past = ctx.cache.past(layer)  # pre-RoPE [B, Hkv, P, D], slot order
            k_all = apply_rope(torch.cat([k_past, k], dim=2), cos, sin)
            v_all = torch.cat([v_past, v], dim=2)
            with on_layer:
                out, scores = chunk_attention(q_rot, k_all, v_all, fam.scaling, ema, n_sinks, ctx.head_reduce,
                                              softcap=fam.softcap, window=fam.window)
            if ctx.score_hook is not None and scores is not None:
                scores = ctx.score_hook(layer, k_all, scores)
        ctx.cache.update(layer, k, v, scores)
        out = out.transpose(1, 2).reshape(b, n_new, -1)  # [B, Hq, L, D] -> [B, L, Hq·D]
        return attn.o_proj(out), None

    return forward


@contextmanager
def patched_attention(model: nn.Module) -> Iterator[ContextSlot]:
    """Swap in our attention for every decoder layer; yields the slot the caller sets each step's context in."""
    check_family(model)
    slot = ContextSlot()
    patched = []
    try:
        for layer, fam in zip(model.model.layers, layer_attentions(model)):
            attn = layer.self_attn
            had_own = "forward" in attn.__dict__
            patched.append((attn, had_own, attn.__dict__.get("forward")))
            attn.forward = _forward(attn, slot, fam)  # instance attribute shadows the class's forward
        yield slot
    finally:
        for attn, had_own, original in patched:
            if had_own:
                attn.forward = original
            else:
                del attn.forward
