"""`cascade`: the cascading KV cache (Willette et al., arXiv 2406.17808), chunked update.

Layout per layer: `[ S sinks | sub-cache 0 (W) | ... | sub-cache C-1 (W) ]`, keys/values [B, Hkv, S + C·W, D],
scores [B, Hkv, C·W] fp32, original token index [B, Hkv, S + C·W]. Sub-cache i accepts the arrival of token
t iff (t - S) mod 2^i == 0 (every sub-cache accepts while t <= N + S: eager fill). An accepted item pushes
the ring's oldest on to sub-cache i+1; a refused one competes with the ring's newest slot and the higher
score stays (ties go to the newcomer). See docs/ALGORITHM.md §2.

Because acceptance never depends on data, a whole chunk is planned on the host from integers (`_plan_ring`)
and applied to each layer with a few gathers, one segmented arg-max and one scatter per sub-cache. The result
equals pushing the chunk's tokens one by one with the chunk's scores frozen (tests/engine/test_cascade_rule.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .base import CacheShape, KVCache, empty_buffers


@dataclass
class RingPlan:
    """What one chunk does to sub-cache i; candidates are [open base slot?] + incoming items."""

    base_slot: int | None  # physical slot whose occupant competes with the first incoming items
    cand_seg: Tensor  # [n_cand] segment of every candidate (non-decreasing)
    n_seg: int
    write_seg: Tensor  # segments whose winner stays in this ring ...
    write_slot: Tensor  # ... and the physical slot it is written to
    out_old: Tensor  # physical slots whose old occupant is pushed on to the next ring, in order
    out_seg: Tensor  # then segments of this chunk whose winner is pushed on, in order
    # (the index fields are lists of ints while planning, then device tensors: see CascadeCache._plan)
    next_state: tuple[int, int]  # (start, count) after the chunk


def _plan_ring(
    i: int, times: list[int], start: int, count: int, width: int, n_sinks: int, eager_until: int
) -> tuple[RingPlan, list[int]]:
    """Simulate sub-cache `i` on references instead of data; returns its plan and the times pushed on.

    Work is O(len(times)), not O(width): the ring's old occupants are never listed, only counted. Old occupant
    of age rank k sits in slot (start + k) % width, and evictions always take the oldest."""
    first, n_old = start, count
    gone = 0  # old occupants pushed out so far
    fresh: deque = deque()  # (segment, slot) opened by this chunk and still in the ring, oldest first
    base_seg = base_slot = None  # segment competing for the newest old occupant's slot
    cand_seg: list[int] = []
    out_old: list[int] = []
    out_seg: list[int] = []
    out_times: list[int] = []
    n_seg = 0
    for t in times:
        accept = t <= eager_until or (t - n_sinks) % (1 << i) == 0
        if accept or count == 0:
            if accept and count == width:  # push the oldest on: old occupants first, then this chunk's
                if gone < n_old:
                    slot = (first + gone) % width
                    gone += 1
                    if gone == n_old and base_seg is not None:
                        out_seg.append(base_seg)
                    else:
                        out_old.append(slot)
                else:
                    seg, slot = fresh.popleft()
                    out_seg.append(seg)
                out_times.append(t)
                start = (start + 1) % width
            else:
                slot = (start + count) % width
                count += 1
            fresh.append((n_seg, slot))
            cand_seg.append(n_seg)
            n_seg += 1
        else:
            if not cand_seg:  # first item of the chunk is refused: it competes with the current newest slot
                base_seg, base_slot = n_seg, (first + n_old - 1) % width
                cand_seg.append(n_seg)
                n_seg += 1
            cand_seg.append(n_seg - 1)
    kept = list(fresh)
    if base_seg is not None and gone < n_old:
        kept.append((base_seg, base_slot))
    plan = RingPlan(
        base_slot=base_slot,
        cand_seg=cand_seg,
        n_seg=n_seg,
        write_seg=[seg for seg, _ in kept],
        write_slot=[slot for _, slot in kept],
        out_old=out_old,
        out_seg=out_seg,
        next_state=(start, count),
    )
    return plan, out_times


def segment_last_argmax(score: Tensor, seg: Tensor, n_seg: int) -> Tensor:
    """Per segment, the position of the last maximum of `score` [B, H, n] (ties go to the later item)."""
    seg = seg.expand_as(score)
    best = score.new_full((*score.shape[:2], n_seg), float("-inf")).scatter_reduce(2, seg, score, "amax")
    hit = score >= best.gather(2, seg)
    pos = torch.arange(score.shape[2], device=score.device).expand_as(score)
    pos = torch.where(hit, pos, -1)
    return pos.new_full(best.shape, -1).scatter_reduce(2, seg, pos, "amax").clamp_(min=0)


_INDEX_FIELDS = ("cand_seg", "write_seg", "write_slot", "out_old", "out_seg")


def _bind(plans: list[RingPlan], packed: Tensor) -> list[RingPlan]:
    """Copies of `plans` whose index lists are views into `packed`, their concatenation on one device."""
    bound, pos = [], 0
    for plan in plans:
        views = {}
        for name in _INDEX_FIELDS:
            n = len(getattr(plan, name))
            views[name] = packed[pos : pos + n]
            pos += n
        bound.append(replace(plan, **views))
    return bound


class CascadeCache(KVCache):
    needs_scores = True

    def __init__(self, shape: CacheShape, n_sinks: int, cache_size: int, cascades: int, beta: float):
        super().__init__(shape, n_sinks)
        assert cache_size % cascades == 0, (cache_size, cascades)
        self.cascades, self.width, self.beta = cascades, cache_size // cascades, beta
        self.cache_size = cache_size
        self.k, self.v, self.idx = empty_buffers(shape, n_sinks + cache_size)
        b, h = shape.batch, shape.n_kv_heads
        self.score = [torch.zeros(b, h, cache_size, dtype=torch.float32, device=k.device) for k in self.k]
        self.start = [0] * cascades
        self.count = [0] * cascades
        self._remote: dict | None = None  # device -> the chunk's index tensors there, when layers span devices

    @property
    def n_past(self) -> int:
        return self.n_sinks_filled + sum(self.count)

    def _age_order(self, dev: torch.device | None = None) -> Tensor:
        """Physical slots visible to the next chunk: sinks, then sub-cache C-1 (oldest) ... sub-cache 0 (newest)."""
        dev = dev or self.shape.device
        parts = [torch.arange(self.n_sinks_filled, device=dev)]
        for i in reversed(range(self.cascades)):
            if self.count[i]:
                ring = (self.start[i] + torch.arange(self.count[i], device=dev)) % self.width
                parts.append(ring + self.n_sinks + i * self.width)
        return torch.cat(parts)

    def _plan(self, n_new: int) -> None:
        dev = self.shape.device
        to_sinks = min(n_new, self.n_sinks - self.n_sinks_filled)
        self._to_sinks = to_sinks
        self._order, self._cached, self._new_index = self._chunk_indices(n_new, dev)
        times = list(range(self.seen + to_sinks, self.seen + n_new))
        eager_until = self.cache_size + self.n_sinks
        plans = []
        flat: list[int] = []  # every ring's index lists, sent to the device in one copy
        for i in range(self.cascades):
            if not times:
                break
            plan, times = _plan_ring(i, times, self.start[i], self.count[i], self.width, self.n_sinks, eager_until)
            offset = self.n_sinks + i * self.width  # ring-local slots -> physical slots
            plan.write_slot = [slot + offset for slot in plan.write_slot]
            plan.out_old = [slot + offset for slot in plan.out_old]
            if plan.base_slot is not None:
                plan.base_slot += offset
            plans.append(plan)
            for name in _INDEX_FIELDS:
                flat.extend(getattr(plan, name))
        packed = torch.tensor(flat, dtype=torch.long)
        if dev.type == "cuda":  # one pinned, asynchronous copy instead of a synchronising one per list
            packed = packed.pin_memory()
        self._rings = _bind(plans, packed.to(dev, non_blocking=True))
        if self.shape.layer_devices is not None:  # the same indices on every other device that holds layers
            self._remote = {d: (*self._chunk_indices(n_new, d), _bind(plans, packed.to(d, non_blocking=True)))
                            for d in self.shape.devices[1:]}

    def _chunk_indices(self, n_new: int, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """On `dev`: age order of the visible slots, score columns of the cached tokens, new tokens' indices."""
        order = self._age_order(dev)
        b, h = self.shape.batch, self.shape.n_kv_heads
        new_index = torch.arange(self.seen, self.seen + n_new, device=dev).expand(b, h, n_new)
        return order, order[self.n_sinks_filled :] - self.n_sinks, new_index

    def _indices(self, layer: int) -> tuple[Tensor, Tensor, Tensor, list[RingPlan]]:
        """The chunk's age order, cached score columns, new token indices and ring plans on `layer`'s device."""
        if self._remote is not None:
            dev = self.shape.device_of(layer)
            if dev != self.shape.device:
                return self._remote[dev]
        return self._order, self._cached, self._new_index, self._rings

    def past(self, layer: int) -> tuple[Tensor, Tensor]:
        order = self._indices(layer)[0]
        return self.k[layer].index_select(2, order), self.v[layer].index_select(2, order)

    def past_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.k[layer], self.v[layer], self._indices(layer)[0]

    def update(self, layer: int, k: Tensor, v: Tensor, score: Tensor | None) -> None:
        assert score is not None, "the cascade needs attention scores"
        kb, vb, sb, ib = self.k[layer], self.v[layer], self.score[layer], self.idx[layer]
        _, cached, new_index, rings = self._indices(layer)
        n_cached, n_new, s = cached.numel(), k.shape[2], self._to_sinks
        assert score.shape[2] == n_cached + n_new, (score.shape, n_cached, n_new)
        if n_cached:  # EMA over the chunk's queries: decay once per query, then add this chunk's share
            sb[:, :, cached] = sb[:, :, cached] * self.beta**n_new + score[:, :, :n_cached]
        if s:
            dst = slice(self.n_sinks_filled, self.n_sinks_filled + s)
            kb[:, :, dst], vb[:, :, dst], ib[:, :, dst] = k[:, :, :s], v[:, :, :s], new_index[:, :, :s]
        items = (k[:, :, s:], v[:, :, s:], score[:, :, n_cached + s :], new_index[:, :, s:])
        for plan in rings:
            items = self._apply_ring(plan, items, kb, vb, sb, ib)

    def _apply_ring(self, plan: RingPlan, items, kb: Tensor, vb: Tensor, sb: Tensor, ib: Tensor):
        """Candidates compete per segment; winners are written, evicted items are returned for the next ring."""
        if plan.base_slot is not None:
            p = plan.base_slot
            base = (kb[:, :, p : p + 1], vb[:, :, p : p + 1], sb[:, :, p - self.n_sinks].unsqueeze(2), ib[:, :, p : p + 1])
            items = tuple(torch.cat([a, c], dim=2) for a, c in zip(base, items))
        cand_k, cand_v, cand_s, cand_i = items
        win = segment_last_argmax(cand_s, plan.cand_seg, plan.n_seg)  # [B, Hkv, n_seg] candidate index

        def take(idx: Tensor):  # candidates at per-head positions idx [B, Hkv, n]
            d = cand_k.shape[-1]
            full = idx.unsqueeze(-1).expand(-1, -1, -1, d)
            return cand_k.gather(2, full), cand_v.gather(2, full), cand_s.gather(2, idx), cand_i.gather(2, idx)

        # read what leaves before this ring's slots are overwritten
        old = plan.out_old
        pushed_old = (kb[:, :, old], vb[:, :, old], sb[:, :, old - self.n_sinks], ib[:, :, old])
        pushed_new = take(win[:, :, plan.out_seg])
        if plan.write_seg.numel():
            k_w, v_w, s_w, i_w = take(win[:, :, plan.write_seg])
            slot = plan.write_slot
            kb[:, :, slot], vb[:, :, slot], sb[:, :, slot - self.n_sinks], ib[:, :, slot] = k_w, v_w, s_w, i_w
        return tuple(torch.cat([a, c], dim=2) for a, c in zip(pushed_old, pushed_new))

    def _commit(self) -> None:
        for i, plan in enumerate(self._rings):
            self.start[i], self.count[i] = plan.next_state

    def token_index(self, layer: int) -> Tensor:
        return self.idx[layer].index_select(2, self._age_order(self.shape.device_of(layer)))

    def cached_scores(self, layer: int) -> Tensor:
        """Scores of the cached (non-sink) tokens in `token_index` order: [B, Hkv, n_past - sinks]."""
        order = self._age_order(self.shape.device_of(layer))
        return self.score[layer].index_select(2, order[self.n_sinks_filled :] - self.n_sinks)

    def fill(self) -> list[tuple[int, int]]:
        return [(self.n_sinks_filled, self.n_sinks)] + [(c, self.width) for c in self.count]

    def _tensors(self) -> list[Tensor]:
        return self.k + self.v + self.score + self.idx
