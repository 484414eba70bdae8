"""Keys rotated at their *slot*: what lets a CPU decode step read the cache in place.

A cached key is stored before RoPE and rotated at its rank in the age order (docs/ALGORITHM.md §2), and ranks move
on every step (each push shifts a whole ring by one), so the plain path gathers every cached key into age order and
rotates all of them again on every token. But a ring's visible tokens lie in at most two runs of consecutive
physical slots, and inside a run rank = slot + c for one constant c. RoPE scores depend only on the difference of
positions, so for a query at position P

    (R(P) q) · (R(slot + c) k)  =  (R(P - c) q) · (R(slot) k)

and `R(slot) k` never changes while the slot holds the same token. `SlotKeys` keeps that copy of each layer's key
buffer (one extra key buffer, in the keys' dtype) and re-rotates only the slots written since it was last read,
which a policy names when it plans a chunk (`KVCache._written`; unknown means all). A decode step then rotates
its query once per run instead of every key (engine/slot_decode.py).

The copy is kept in float32, the dtype the decode step's logits are computed in: converting a bf16 run to float32
on every step cost more than the matrix product itself on a 2-core CPU (about 175 us a layer for 1,000 keys of
3 heads, bench/cpu_decode.py --profile); a float32 copy is converted once, when its slot is written. It costs
4 bytes per key element beside the cache (`engine/sizing.py` counts it on the CPU).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cascade_kernels.rope import apply_rope


class SlotKeys:
    """Per layer: the key buffer rotated at each slot's own index (float32), brought up to date lazily."""

    def __init__(self, n_layers: int):
        self.k: list[Tensor | None] = [None] * n_layers
        self.stale: list[list[np.ndarray] | None] = [None] * n_layers  # None: every slot
        self.tables: list[tuple | None] = [None] * n_layers  # which rotary tables the copy was built with

    def invalidate(self, slots: np.ndarray | None) -> None:
        """Slots whose key changed (None: any); a copy that would need most of its slots again is rebuilt whole."""
        for layer, pending in enumerate(self.stale):
            if pending is None:
                continue
            if slots is None or sum(map(len, pending)) + len(slots) > 256:
                self.stale[layer] = None
            else:
                pending.append(slots)

    def keys(self, layer: int, k_buf: Tensor, cos: Tensor, sin: Tensor, key: tuple) -> Tensor:
        """The layer's keys [B, Hkv, capacity, D] rotated at their slot index, float32, for the slots `cos`/`sin`
        cover; `key` names the tables they come from (a different key rebuilds the copy)."""
        mirror, pending = self.k[layer], self.stale[layer]
        n = min(k_buf.shape[2], cos.shape[0])  # slots past the tables (a dense cache's headroom) are never read
        if mirror is None or mirror.shape != k_buf.shape or pending is None or self.tables[layer] != key:
            mirror = self.k[layer] = torch.zeros(k_buf.shape, dtype=torch.float32, device=k_buf.device)
            mirror[:, :, :n] = apply_rope(k_buf[:, :, :n].float(), cos[:n].float(), sin[:n].float())
            self.tables[layer] = key
        elif pending:
            slots = np.unique(np.concatenate(pending))
            slots = torch.from_numpy(slots[slots < n]).to(k_buf.device)
            rotated = apply_rope(k_buf.index_select(2, slots).float(), cos[slots].float(), sin[slots].float())
            mirror.index_copy_(2, slots, rotated)
        self.stale[layer] = []
        return mirror


MIN_RUN = 32  # shorter runs of consecutive slots are gathered and rotated at their ranks, as the plain path does


def pieces(order: np.ndarray, min_run: int = MIN_RUN) -> list[tuple[str, int, int, int]]:
    """The age order [n] of physical slots as pieces, in age order: ("run", first slot, first rank, length) for a
    run of at least `min_run` consecutive slots, ("gather", 0, first rank, length) for what lies between them."""
    n = len(order)
    if n == 0:
        return []
    cuts = np.flatnonzero(np.diff(order) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [n]])
    out: list[tuple[str, int, int, int]] = []
    gather_from = None
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a >= min_run:
            if gather_from is not None:
                out.append(("gather", 0, gather_from, a - gather_from))
                gather_from = None
            out.append(("run", int(order[a]), a, b - a))
        elif gather_from is None:
            gather_from = a
    if gather_from is not None:
        out.append(("gather", 0, gather_from, n - gather_from))
    return out
