"""What differs between the decoder families our attention forward runs (engine/attention.py), read from each
layer's attention module and the model's config, not from the family's name.

    projections  q_proj, k_proj, v_proj; or one fused qkv_proj, split as [Hq·D | Hkv·D | Hkv·D] (phi3)
    q/k norms    q_norm, k_norm over each head (qwen3, gemma3) or over the whole projection before the view into
                 heads (olmo2), told apart by the size of the norm's weight
    scaling      `attn.scaling`: D^-0.5, query_pre_attn_scalar^-0.5 (gemma2/3), attention_multiplier (granite)
    softcap      `attn.attn_logit_softcapping`: tanh capping of the logits (gemma2)
    window       `attn.sliding_window` per layer (qwen2/3, gemma2/3, smollm3, qwen3_moe), else the config's
                 `sliding_window` on every layer (mistral, mixtral, phi3), as the models' own masks do
    RoPE         none on layers whose `attn.use_rope` is false (smollm3's NoPE layers); one table per layer type
                 where the rotary module keeps several (gemma3: local and global bases); partial rotary
                 (partial_rotary_factor < 1) through a fixed permutation of q's and k's head dims, so that the
                 rotated dims pair up as halves of the whole head and every kernel rotates full-width tables
Everything else is the model's own code: embedding and residual multipliers, MoE blocks, extra norms; on the
output side the final logit soft-capping and `logits_scaling` are applied by `output_logits`.

A sliding-window layer attends over the same age-ordered past as every other layer, at the same slot positions
(docs/ALGORITHM.md §4), and sees only the keys fewer than `window` slots older than each query: the model's own
rule while nothing has been evicted (slot = absolute position), and the last `window` cached tokens, sinks not
kept visible, once the cache is full. While sinks + cache + chunk fit in the window nothing changes.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from .errors import UnsupportedModelError

SUPPORTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2", "smollm3",
    "mixtral", "qwen3_moe",
)
# Gemma 3 keeps the config's attn_logit_softcapping on its attention module but never applies it
_SOFTCAP_UNUSED = ("gemma3_text",)


class Rope:
    """The model's rotary tables, full head width: cos, sin [T, D] for positions 0 .. T-1 of one layer type."""

    def __init__(self, model: nn.Module):
        self.model = model
        rotary = model.model.rotary_emb
        self.typed = "layer_type" in inspect.signature(rotary.forward).parameters
        kinds = sorted(set(getattr(model.config, "layer_types", None) or ())) if self.typed else []
        self.default = "full_attention" if "full_attention" in kinds else (kinds[0] if kinds else None)
        self.head_dim = model.model.layers[0].self_attn.head_dim
        self.perm = None  # partial rotary: head dims of q and k in the order that makes the rotated ones halves
        d, r = self.head_dim, self._raw(torch.zeros(1, dtype=torch.long), torch.zeros(1), self.default)[0].shape[-1]
        if r < d:
            h, rh = d // 2, r // 2
            self.perm = torch.cat([torch.arange(0, rh), torch.arange(r, r + h - rh), torch.arange(rh, r),
                                   torch.arange(r + h - rh, d)])
        self._cached: dict[tuple, tuple[Tensor, Tensor]] = {}  # (kind, device, dtype) -> cos, sin

    def _raw(self, pos: Tensor, x: Tensor, kind: str | None) -> tuple[Tensor, Tensor]:
        rotary = self.model.model.rotary_emb
        buf = next(rotary.buffers(), None)
        dev = buf.device if buf is not None else x.device
        pos, x = pos.to(dev).unsqueeze(0), x.to(dev)
        cos, sin = rotary(x, pos, kind) if self.typed else rotary(x, pos)
        return cos[0].to(x.dtype), sin[0].to(x.dtype)  # olmo2's module keeps float32: the kernels want x's dtype

    def tables(self, pos: Tensor, x: Tensor, kind: str | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [T, D] at positions `pos` [T], in x's dtype on the rotary module's device (any RoPE scaling)."""
        cos, sin = self._raw(pos, x, self.default if kind is None else kind)
        if self.perm is None:
            return cos, sin
        d, r = self.head_dim, cos.shape[-1]
        h, rh = d // 2, r // 2
        wide_cos, wide_sin = cos.new_ones(cos.shape[0], d), sin.new_zeros(sin.shape[0], d)
        for wide, t in ((wide_cos, cos), (wide_sin, sin)):  # pass-through dims: cos 1, sin 0, exact
            wide[:, :rh], wide[:, h : h + rh] = t[:, :rh], t[:, rh:]
        return wide_cos, wide_sin

    def like(self, cos: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        """Tables of layer type `kind` with the shape, dtype and device of the default ones `cos` [K, D]."""
        n, key = cos.shape[0], (kind, cos.device, cos.dtype)
        hit = self._cached.get(key)
        if hit is None or hit[0].shape[0] < n:
            size = max(n, 2 * hit[0].shape[0] if hit is not None else 1024)  # grown geometrically while decoding
            c, s = self.tables(torch.arange(size), cos.new_zeros(1), kind)
            hit = self._cached[key] = (c.to(cos.device), s.to(cos.device))
        return hit[0][:n], hit[1][:n]


def rotary_tables(model: nn.Module, pos: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The tables every layer of the default type rotates with: cos, sin [T, D] at positions `pos` [T]."""
    return Rope(model).tables(pos, x)


class LayerAttention:
    """One decoder layer's attention as our forward needs it: projections, scaling, softcap, window, tables."""

    def __init__(self, attn: nn.Module, model: nn.Module, rope: Rope):
        cfg = model.config
        family = getattr(cfg, "model_type", None)
        if getattr(attn, "is_causal", True) is False:
            raise UnsupportedModelError(f"model type {family!r} with bidirectional attention is not supported")
        self.attn, self.rope = attn, rope
        self.head_dim = attn.head_dim
        self.scaling = float(attn.scaling)
        softcap = None if family in _SOFTCAP_UNUSED else getattr(attn, "attn_logit_softcapping", None)
        self.softcap = None if softcap is None else float(softcap)
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
        self.window = int(window) if window else None
        self.use_rope = bool(getattr(attn, "use_rope", True))
        kind = getattr(attn, "layer_type", None)
        if kind is None and rope.typed:
            kind = cfg.layer_types[attn.layer_idx]
        self.rope_kind = kind if rope.typed and kind != rope.default else None
        self.fused = hasattr(attn, "qkv_proj")
        if self.fused:
            n_q = cfg.num_attention_heads * self.head_dim
            n_kv = (attn.qkv_proj.out_features - n_q) // 2
            self.split = (n_q, n_kv, n_kv)
        # norms over the whole projection (olmo2) come before the view into heads, per-head ones after it
        self.q_norm, self.q_whole = self._norm("q_norm")
        self.k_norm, self.k_whole = self._norm("k_norm")
        self.perm = None if rope.perm is None else rope.perm.to(attn.o_proj.weight.device)

    def _norm(self, name: str) -> tuple[nn.Module | None, bool]:
        norm = getattr(self.attn, name, None)
        weight = getattr(norm, "weight", None)
        return norm, weight is not None and weight.numel() != self.head_dim

    def project(self, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, Hq, L, D], k, v [B, Hkv, L, D] of hidden states [B, L, hidden], before RoPE."""
        b, n, _ = hidden.shape
        attn, d = self.attn, self.head_dim
        if self.fused:
            q, k, v = attn.qkv_proj(hidden).split(self.split, dim=-1)
        else:
            q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
        if self.q_whole:
            q = self.q_norm(q)
        if self.k_whole:
            k = self.k_norm(k)
        q, k, v = q.view(b, n, -1, d), k.view(b, n, -1, d), v.view(b, n, -1, d)  # [B, L, H, D]
        if self.q_norm is not None and not self.q_whole:
            q = self.q_norm(q)
        if self.k_norm is not None and not self.k_whole:
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        if self.perm is not None:
            q, k = q.index_select(-1, self.perm), k.index_select(-1, self.perm)
        return q, k, v

    def tables(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's cos, sin [K, D] given the default type's: the same, its own type's, or the identity."""
        if not self.use_rope:
            n, d = cos.shape
            return cos.new_ones(1, d).expand(n, d), sin.new_zeros(1, d).expand(n, d)  # rotation by 0: exact
        if self.rope_kind is not None:
            return self.rope.like(cos, self.rope_kind)
        return cos, sin

    def plain(self, n_keys: int) -> bool:
        """Whether attention over `n_keys` keys is the plain causal softmax (no softcap, no window in reach)."""
        return self.softcap is None and (self.window is None or n_keys <= self.window)


def layer_attentions(model: nn.Module) -> list[LayerAttention]:
    """A `LayerAttention` per decoder layer, sharing one `Rope`."""
    rope = Rope(model)
    return [LayerAttention(layer.self_attn, model, rope) for layer in model.model.layers]


def kv_geometry(model: nn.Module) -> tuple[int, int]:
    """(KV heads, head dim) of the cache, the same for every layer."""
    cfg = model.config
    geometry = {(cfg.num_key_value_heads or cfg.num_attention_heads, layer.self_attn.head_dim)
                for layer in model.model.layers}
    if len(geometry) != 1:
        raise UnsupportedModelError(f"layers with different head shapes {sorted(geometry)} are not supported")
    return geometry.pop()


def output_logits(config, logits: Tensor) -> Tensor:
    """What the model's LM wrapper does to the head's output: divide by `logits_scaling` (granite), then cap with
    `final_logit_softcapping` (gemma2/3)."""
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
