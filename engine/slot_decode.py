"""A CPU decode step that reads the cache in place: no gather of the past, no re-rotation of every cached key.

The plain path (engine/attention.py) gathers every cached key and value into age order, rotates all keys at their
ranks and attends over the copy: per token and layer that is three copies of the cache and a RoPE pass over it,
about 40% of a CPU decode step at cache 4096 (docs/BENCHMARKS.md, "Where a CPU decode step goes"). Here the keys
come from the cache's slot-rotated copy (engine/cache/slot_keys.py): for each run of consecutive slots the query is
rotated once to P - c (c = rank - slot along the run) and multiplied with the run's keys as they lie; short runs
between them (an evidence store's spans, dead slots) are gathered and rotated at their ranks as before. The
softmax is taken over every piece at once in age order (so the scores come out in the order the cache expects),
and P·V reads the value buffer in place with the probabilities scattered to the physical slots.

Same contract and numerics as `cascade_kernels.chunk_attention.chunk_attention_few` for one query: logits and
softmax in float32, P·V in the values' dtype; only where each key is rotated differs (at its slot instead of its
rank), which moves results within rounding (tests/engine/test_slot_decode.py holds it to the plain path).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cascade_kernels.rope import apply_rope

from .cache.base import KVCache


def decode_in_place(
    cache: KVCache,
    layer: int,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cos: Tensor,
    sin: Tensor,
    tables_key: tuple,
    scale: float,
    ema: Tensor | None,
    head_reduce: str,
    memo: dict,
) -> tuple[Tensor, Tensor | None]:
    """One query over the cache's visible tokens and its own key: (out [B, Hq, 1, D], scores or None).

    q: the query before RoPE [B, Hq, 1, D] at position P = n_past; k_new, v_new [B, Hkv, 1, D] before RoPE; cos,
    sin this layer's tables for positions 0 .. at least P + capacity, named by `tables_key`; `memo` is shared by
    the step's layers (what depends only on the pieces and the tables is built once). Scores as `chunk_attention`
    gives them (EMA-weighted, reduced over the KV group, the unscored leading tokens dropped), in age order."""
    b, hq, _, d = q.shape
    k_buf, v_buf, order = cache.past_slots(layer)
    hkv = k_buf.shape[1]
    g = hq // hkv
    p_pos = cache.n_past
    tables = memo.get(tables_key)
    if tables is None:  # per run, the query's rotation P - c, then P itself; a run it would take past the tables
        n_table = min(cos.shape[0], k_buf.shape[2])  # (the model's positions) is gathered instead
        parts = [(kind if kind == "gather" or (p_pos - rank + slot < cos.shape[0] and slot + n <= n_table)
                  else "gather", slot, rank, n) for kind, slot, rank, n in cache.pieces()]
        runs = [(slot, rank) for kind, slot, rank, _ in parts if kind == "run"]
        at = torch.tensor([p_pos - rank + slot for slot, rank in runs] + [p_pos], dtype=torch.long)
        tables = memo[tables_key] = (cos[at].float(), sin[at].float(), len(runs), parts, n_table)
    q_cos, q_sin, n_runs, parts, n_table = tables
    qf = q.float()
    q_all = apply_rope(qf.expand(b, hq, n_runs + 1, d), q_cos, q_sin).view(b, hkv, g, n_runs + 1, d)
    q_rot = q_all[:, :, :, n_runs]  # [B, Hkv, G, D] at P: the gathered keys' and its own key's query
    slot_k = cache.slot_keys(layer, cos[:n_table], sin[:n_table], tables_key) if n_runs else None
    logits = []
    r = 0
    for kind, slot, rank, n in parts:
        if kind == "run":
            logits.append(q_all[:, :, :, r] @ slot_k[:, :, slot : slot + n].transpose(-1, -2))
            r += 1
        else:
            keys = k_buf.index_select(2, order[rank : rank + n]).float()
            keys = apply_rope(keys, cos[rank : rank + n].float(), sin[rank : rank + n].float())
            logits.append(q_rot @ keys.transpose(-1, -2))
    own = apply_rope(k_new.float(), q_cos[n_runs:], q_sin[n_runs:])
    logits.append(q_rot @ own.transpose(-1, -2))
    p = torch.cat(logits, dim=-1).mul_(scale).softmax(dim=-1)  # [B, Hkv, G, n_past + 1], age order
    n_past = p.shape[-1] - 1
    p16 = p.to(v_buf.dtype)
    if n_past:
        top = memo.get("top")
        if top is None:
            top = memo["top"] = int(order.max()) + 1  # P·V over the used prefix of the buffer
        spread = p16.new_zeros(b, hkv, g, top).index_copy_(3, order, p16[..., :n_past])
        out = values_product(spread, v_buf[:, :, :top]).add_((p16[..., n_past:] * v_new)).view(b * hkv, g, d)
    else:
        out = p16 @ v_new
    out = out.view(b, hq, 1, d).to(q.dtype)
    if ema is None:
        return out, None
    col = p * ema.to(p.device, torch.float32)
    scores = col.amax(dim=2) if head_reduce == "max" else col.mean(dim=2)
    return out, scores[:, :, cache.n_unscored :]


PV_SPLIT = 8  # pieces a long P·V is cut into along the slots (the batch of a 3-head product is too small to share)


def values_product(p: Tensor, v: Tensor) -> Tensor:
    """p [B, Hkv, G, N] @ v [B, Hkv, N, D] -> [B, Hkv, G, D]. With a few KV heads and G rows each, torch's CPU bmm
    reads the values at about a third of this VM's bandwidth (2 threads over 3 heads); cutting N into `PV_SPLIT`
    pieces as more batch entries and summing them reads them about 1.2x faster (by hand: 17.6 against 14.5 ms for
    30 layers of 3 x 4,160 x 64 float32). Only for float32: the sum order differs from one product's, which
    moves the result within fp32 rounding."""
    b, hkv, g, n = p.shape
    d = v.shape[-1]
    if n < 1024 or n % PV_SPLIT or v.dtype != torch.float32 or not v.is_contiguous():
        # (a slice of a longer buffer would be copied; 16-bit pieces would each be rounded before the sum)
        return (p.reshape(b * hkv, g, n) @ v.reshape(b * hkv, n, d)).view(b, hkv, g, d)
    c, m = PV_SPLIT, n // PV_SPLIT
    pieces = p.view(b * hkv, g, c, m).transpose(1, 2).reshape(b * hkv * c, g, m)
    return torch.bmm(pieces, v.reshape(b * hkv * c, m, d)).view(b, hkv, c, g, d).sum(2)
