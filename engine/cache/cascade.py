"""`cascade`: the cascading KV cache (Willette et al., arXiv 2406.17808), chunked update.

Layout per layer: `[ S sinks | sub-cache 0 (W) | ... | sub-cache C-1 (W) ]`, keys/values [B, Hkv, S + C·W, D],
scores [B, Hkv, C·W] fp32, original token index [B, Hkv, S + C·W]. Sub-cache i accepts the arrival of token
t iff (t - S) mod 2^i == 0 (every sub-cache accepts while t <= N + S: eager fill). An accepted item pushes
the ring's oldest on to sub-cache i+1; a refused one competes with the ring's newest slot and the higher
score stays (ties go to the newcomer). See docs/ALGORITHM.md §2.

Because acceptance never depends on data, a whole chunk is planned on the host from integers (`_plan_ring`).
Each layer then runs the sub-caches on scores and source ids only (a padded per-segment arg-max and a few
gathers each), and moves every written slot's key, value and token index once at the end. The result equals
pushing the chunk's tokens one by one with the chunk's scores frozen (tests/engine/test_cascade_rule.py).
A single token (a decode step) touches at most one slot per ring; its plan becomes a chain of slots that
`cascade_kernels.cache_push.push_token` walks in one kernel on CUDA (its torch reference elsewhere).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from cascade_kernels.cache_push import push_token

from .base import CacheShape, KVCache, copy_named, empty_buffers, gather_past, is_int
from .fixed_step import FixedStep


@dataclass
class RingPlan:
    """What one chunk does to sub-cache i; candidates are [open base slot?] + incoming items.

    The index fields are lists of ints while planning, numpy arrays after `_finish`, then views into one device
    tensor (see `_bind`)."""

    base_slot: int | None  # physical slot whose occupant competes with the first incoming items
    cand_seg: list[int]  # segment of every candidate (non-decreasing)
    n_seg: int
    write_seg: list[int]  # segments whose winner stays in this ring ...
    write_slot: list[int]  # ... and the physical slot it is written to
    out_old: list[int]  # physical slots whose old occupant is pushed on to the next ring, in order
    out_seg: list[int]  # then segments of this chunk whose winner is pushed on, in order
    next_state: tuple[int, int]  # (start, count) after the chunk
    # derived by `_finish` for the device: candidates of each segment latest first, padded to `depth` by
    # repeating the segment's first candidate (empty when every segment is a single candidate)
    seg_table: np.ndarray | Tensor = ()
    depth: int = 1
    pick: np.ndarray | Tensor = ()  # write_seg then out_seg: the segments whose winner is used
    write_col: np.ndarray | Tensor = ()  # score columns of write_slot / out_old (slot - sinks)
    out_old_col: np.ndarray | Tensor = ()
    # positions of the pushed items that go on to the next ring, when some are dropped on the way (an evidence
    # store took them: engine/cache/evidence.py); empty = all go on
    keep: np.ndarray | Tensor = ()


def _plan_ring(
    i: int, times: list[int], start: int, count: int, width: int, n_sinks: int, eager_until: int,
    fast: bool = True,
) -> tuple[RingPlan, list[int]]:
    """Simulate sub-cache `i` on references instead of data; returns its plan and the times pushed on.

    Work is O(len(times)), not O(width): the ring's old occupants are never listed, only counted. Old occupant
    of age rank k sits in slot (start + k) % width, and evictions always take the oldest."""
    t = np.asarray(times, dtype=np.int64)
    accept = (t <= eager_until) | ((t - n_sinks) % (1 << i) == 0)
    n_acc = int(accept.sum())
    if fast and 0 < count == width and n_acc <= count:  # the steady state, in numpy: the same plan as the loop below
        return _plan_full_ring(t, accept, n_acc, start, width)
    times = t.tolist()
    first, n_old = start, count
    gone = 0  # old occupants pushed out so far
    fresh: deque = deque()  # (segment, slot) opened by this chunk and still in the ring, oldest first
    base_seg = base_slot = None  # segment competing for the newest old occupant's slot
    cand_seg: list[int] = []
    out_old: list[int] = []
    out_seg: list[int] = []
    out_times: list[int] = []
    n_seg = 0
    for t, accept in zip(times, accept.tolist()):
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


def _plan_full_ring(t: np.ndarray, accept: np.ndarray, n_acc: int, start: int, width: int
                    ) -> tuple[RingPlan, np.ndarray]:
    """`_plan_ring` for a full ring that takes no more items than it holds (every chunk after the fill, unless
    the chunk is longer than a sub-cache): the j-th accepted item pushes old occupant j on and takes its slot;
    refused items join the segment before them; a refused first item competes for the newest old slot."""
    has_base = int(not accept[0])
    seg = np.cumsum(accept) - 1 + has_base  # each incoming item's segment (0 is the base's before any accept)
    slots = (start + np.arange(n_acc)) % width
    acc_seg = np.arange(has_base, has_base + n_acc)
    base_slot = (start + width - 1) % width if has_base else None
    if has_base and n_acc == width:  # the last push takes the base slot's occupant: its segment's winner leaves
        out_old, out_seg = slots[:-1], np.zeros(1, dtype=np.int64)
    else:
        out_old, out_seg = slots, np.zeros(0, dtype=np.int64)
    write_seg, write_slot = acc_seg, slots
    if has_base and n_acc < width:
        write_seg, write_slot = np.append(acc_seg, 0), np.append(slots, base_slot)
    plan = RingPlan(base_slot=base_slot, cand_seg=np.concatenate([np.zeros(has_base, dtype=np.int64), seg]),
                    n_seg=n_acc + has_base, write_seg=write_seg, write_slot=write_slot, out_old=out_old,
                    out_seg=out_seg, next_state=((start + n_acc) % width, width))
    return plan, t[accept]


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _finish(plan: RingPlan, offset: int, n_sinks: int) -> RingPlan:
    """Ring-local slots to physical slots, and the derived index arrays the device side uses (numpy: this runs
    on the host for every chunk, beside the GPU's work, so it must stay cheap)."""
    plan.write_slot = _ints(plan.write_slot) + offset
    plan.out_old = _ints(plan.out_old) + offset
    if plan.base_slot is not None:
        plan.base_slot += offset
    lens = np.bincount(_ints(plan.cand_seg), minlength=plan.n_seg)
    plan.depth = int(lens.max()) if lens.size else 1
    if plan.depth > 1:  # latest first, so that arg-max's first maximum is the segment's last one; pad with the first
        first = (np.cumsum(lens) - lens)[:, None]
        back = np.arange(plan.depth)[None, :]
        plan.seg_table = np.maximum(first + lens[:, None] - 1 - back, first).reshape(-1)
    else:
        plan.seg_table = _ints(())
    plan.pick = np.concatenate([_ints(plan.write_seg), _ints(plan.out_seg)])
    plan.write_col = plan.write_slot - n_sinks
    plan.out_old_col = plan.out_old - n_sinks
    plan.keep = _ints(plan.keep)
    return plan


def _chain(plans: list[RingPlan]) -> np.ndarray:
    """A single token's plans as `cascade_kernels.cache_push` codes: per ring reached, the slot it takes (its occupant
    moves on when the ring was full), or -slot-1 where a refusing ring's newest slot is competed for."""
    return _ints([-plan.base_slot - 1 if plan.base_slot is not None else int(plan.write_slot[0]) for plan in plans])


_INDEX_FIELDS = ("seg_table", "pick", "write_col", "out_old", "out_old_col", "keep")


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


@dataclass
class _Chunk:
    """The chunk's index tensors on one device."""

    order: Tensor  # physical slots visible to the chunk, age order
    cached: Tensor  # score columns of the cached (non-sink) visible tokens
    new_index: Tensor  # [B, Hkv, n_new] stream index of the chunk's tokens
    new_src: Tensor  # [B, Hkv, n_new - to_sinks] source ids of the chunk's non-sink tokens: capacity + j
    dest: Tensor  # every ring's written slots, in ring order
    rings: list[RingPlan]
    chain: Tensor | None  # a single token past the sinks: its slots as `cascade_kernels.cache_push` codes
    t: Tensor | None = None  # [1] the token's stream index on the device, where the indices sit at fixed addresses


class CascadeCache(KVCache):
    needs_scores = True
    policy = "cascade"

    def __init__(self, shape: CacheShape, n_sinks: int, cache_size: int, cascades: int, beta: float,
                 extra_slots: int = 0):
        """`extra_slots` past the last sub-cache belong to a subclass (the evidence store, cache/evidence.py)."""
        super().__init__(shape, n_sinks)
        assert cache_size % cascades == 0, (cache_size, cascades)
        self.cascades, self.width, self.beta = cascades, cache_size // cascades, beta
        self.cache_size = cache_size
        self.k, self.v, self.idx = empty_buffers(shape, n_sinks + cache_size + extra_slots)
        b, h = shape.batch, shape.n_kv_heads
        self.score = [torch.zeros(b, h, cache_size + extra_slots, dtype=torch.float32, device=k.device)
                      for k in self.k]
        self.start = [0] * cascades
        self.count = [0] * cascades
        self._plans: list[RingPlan] = []
        self._remote: dict | None = None  # device -> the chunk's index tensors there, when layers span devices
        self._fixed: FixedStep | None = None  # decode steps' indices at fixed addresses (`use_fixed_indices`)
        self._fixed_step = False  # the step planned last reads them

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
        times = list(range(self.seen + to_sinks, self.seen + n_new))
        eager_until = self.cache_size + self.n_sinks
        plans = []
        for i in range(self.cascades):
            if len(times) == 0:
                break
            plan, times = _plan_ring(i, times, self.start[i], self.count[i], self.width, self.n_sinks, eager_until)
            plans.append(_finish(plan, self.n_sinks + i * self.width, self.n_sinks))
            times = self._passed_on(plans[-1], times)
        self._plans = plans
        sinks = np.arange(self.n_sinks_filled, self.n_sinks_filled + to_sinks)
        self._written = np.concatenate([sinks] + [plan.write_slot for plan in plans])
        chain = _chain(plans) if n_new == 1 and not to_sinks and plans else _ints(())
        self._fixed_step = self._fixed is not None and len(chain) > 0 and self.shape.layer_devices is None
        if self._fixed_step:  # a decode step whose indices a captured graph reads: the same addresses every step
            order = self._age_order(torch.device("cpu"))
            o, c, ch, t = self._fixed.load(order, self.n_unscored, self.n_sinks, chain, self.seen)
            self._chunk = _Chunk(o, c, *self._fixed.unused, plans, ch, t)
            self._remote = None
            return
        # every ring's index lists, the written slots and the chain, sent to each device in one copy
        flat = [getattr(plan, name) for plan in plans for name in _INDEX_FIELDS]
        packed = torch.from_numpy(np.concatenate(flat + [plan.write_slot for plan in plans] + [chain]))
        if dev.type == "cuda":  # one pinned, asynchronous copy instead of a synchronising one per list
            packed = packed.pin_memory()
        self._chunk = self._chunk_on(dev, n_new, packed, len(chain))
        self._remote = None
        if self.shape.layer_devices is not None:  # the same indices on every other device that holds layers
            self._remote = {d: self._chunk_on(d, n_new, packed, len(chain)) for d in self.shape.devices[1:]}

    def use_fixed_indices(self, on: bool = True) -> bool:
        """A decode step past the sinks keeps its index tensors (visible slots, score columns, push chain, stream
        index) at the same device addresses from step to step, so that a CUDA graph captured once can replay it
        (engine/decode_graph.py); the cache's contents come out the same either way."""
        if on and self._fixed is None:
            self._fixed = FixedStep(self.shape.device, self.cascades)
        elif not on:
            self._fixed = None
        return True

    @property
    def fixed_key(self) -> tuple | None:
        return self._fixed.key if self._fixed_step else None

    def _passed_on(self, plan: RingPlan, times):
        """The arrival times of the items that `plan` pushes on to the next ring (all of them here; an evidence
        store drops the ones it took, engine/cache/evidence.py)."""
        return times

    def _chunk_on(self, dev: torch.device, n_new: int, packed: Tensor, n_chain: int) -> _Chunk:
        packed = packed.to(dev, non_blocking=True)
        n_dest = sum(len(plan.write_slot) for plan in self._plans)
        end = packed.numel() - n_chain
        order = self._age_order(dev)
        b, h = self.shape.batch, self.shape.n_kv_heads
        new_index = torch.arange(self.seen, self.seen + n_new, device=dev).expand(b, h, n_new)
        capacity = self.k[0].shape[2]
        new_src = torch.arange(capacity, capacity + n_new - self._to_sinks, device=dev).expand(b, h, -1)
        return _Chunk(order, order[self.n_unscored :] - self.n_sinks, new_index, new_src,
                      packed[end - n_dest : end], _bind(self._plans, packed), packed[end:] if n_chain else None)

    def _indices(self, layer: int) -> _Chunk:
        """The chunk's index tensors on `layer`'s device."""
        if self._remote is not None:
            dev = self.shape.device_of(layer)
            if dev != self.shape.device:
                return self._remote[dev]
        return self._chunk

    def past(self, layer: int) -> tuple[Tensor, Tensor]:
        order = self._indices(layer).order
        return gather_past(self.k[layer], self.v[layer], order)

    def past_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.k[layer], self.v[layer], self._indices(layer).order

    def update(self, layer: int, k: Tensor, v: Tensor, score: Tensor | None) -> None:
        """Two phases: the rings run on scores and source ids only (small tensors); then every written slot's
        key, value and token index is moved once, from the old buffer or the chunk, in one gather and one copy.
        This keeps the op count per ring low, which is what the update costs on a GPU (launches, not bytes)."""
        assert score is not None, "the cascade needs attention scores"
        kb, vb, sb, ib = self.k[layer], self.v[layer], self.score[layer], self.idx[layer]
        ch = self._indices(layer)
        n_cached, n_new, s = ch.cached.numel(), k.shape[2], self._to_sinks
        assert score.shape[2] == n_cached + n_new, (score.shape, n_cached, n_new)
        if n_cached:  # EMA over the chunk's queries: decay once per query, then add this chunk's share
            # Decaying every column (also the empty slots, whose scores are overwritten when filled) and adding
            # through the age order rounds exactly like gather, multiply, add and scatter, in two kernels not four.
            sb.mul_(self.beta**n_new).index_add_(2, ch.cached, score[:, :, :n_cached])
        if s:
            dst = slice(self.n_sinks_filled, self.n_sinks_filled + s)
            kb[:, :, dst], vb[:, :, dst], ib[:, :, dst] = k[:, :, :s], v[:, :, :s], ch.new_index[:, :, :s]
        if not ch.rings:
            return
        if ch.chain is not None:  # one decoded token: the chain of pushes in one kernel
            t = self.seen if ch.t is None else ch.t
            push_token(kb, vb, sb, ib, k, v, score[:, :, n_cached], ch.chain, t, self.n_sinks)
            return
        items = (score[:, :, n_cached + s :], ch.new_src)
        written = []
        for plan in ch.rings:
            items, src = self._compete(plan, items, sb)
            written.append(src)
            if plan.keep.numel():  # some pushed items are dropped on the way to the next ring
                items = (items[0].index_select(2, plan.keep), items[1].index_select(2, plan.keep))
        if ch.dest.numel():
            self._move(torch.cat(written, dim=2), ch.dest, (kb, k[:, :, s:]), (vb, v[:, :, s:]), ib=ib,
                       first_index=self.seen + s)

    def _compete(self, plan: RingPlan, items: tuple[Tensor, Tensor], sb: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """One ring on (score, source id): winners' scores are written; returns the items pushed on to the next
        ring and the source ids of this ring's written slots. A source id is a physical slot (its content
        before this chunk) or capacity + j for the chunk's j-th non-sink token."""
        cand_s, cand_src = items
        b, h = cand_s.shape[:2]
        if plan.base_slot is not None:
            col = plan.base_slot - self.n_sinks
            cand_s = torch.cat([sb[:, :, col : col + 1], cand_s], dim=2)
            cand_src = torch.cat([cand_src.new_full((b, h, 1), plan.base_slot), cand_src], dim=2)
        if plan.depth > 1:  # per segment, the last candidate with the highest score
            table = plan.seg_table.view(plan.n_seg, plan.depth)
            best = cand_s.index_select(2, plan.seg_table).view(b, h, plan.n_seg, plan.depth).argmax(-1)
            win = table.expand(b, h, -1, -1).gather(3, best.unsqueeze(-1)).squeeze(-1).index_select(2, plan.pick)
            s_pick, src_pick = cand_s.gather(2, win), cand_src.gather(2, win)
        else:  # every segment is one candidate: it wins
            s_pick, src_pick = cand_s.index_select(2, plan.pick), cand_src.index_select(2, plan.pick)
        n_write = plan.write_col.numel()
        pushed_s = torch.cat([sb.index_select(2, plan.out_old_col), s_pick[:, :, n_write:]], dim=2)  # read first
        pushed_src = torch.cat([plan.out_old.expand(b, h, -1), src_pick[:, :, n_write:]], dim=2)
        if n_write:
            sb.index_copy_(2, plan.write_col, s_pick[:, :, :n_write])
        return (pushed_s, pushed_src), src_pick[:, :, :n_write]

    def _move(self, src: Tensor, dest: Tensor, *kv: tuple[Tensor, Tensor], ib: Tensor, first_index: int) -> None:
        """Write slot dest[n] of every head from its source src[b, h, n]: an old slot or a token of the chunk.
        All sources are read before any slot is written (a pushed item may leave a slot that is refilled).
        Rows are picked with `index_select` on flattened [B·Hkv·slots, D] views: one row copy each, no index
        expanded over D."""
        b, h, capacity = ib.shape
        from_new = src >= capacity
        new_pos, old_pos = (src - capacity).clamp_(min=0), src.clamp(max=capacity - 1)
        heads = torch.arange(b * h, device=src.device).view(b, h, 1)
        old_rows = (heads * capacity + old_pos).view(-1)
        new_rows = (heads * kv[0][1].shape[2] + new_pos).view(-1)  # keys and values of the chunk: same shape
        pick_new = from_new.view(-1, 1)
        for buf, new in kv:
            d = buf.shape[-1]
            rows = torch.where(pick_new, new.reshape(-1, d).index_select(0, new_rows),
                               buf.view(-1, d).index_select(0, old_rows))
            buf.index_copy_(2, dest, rows.view(b, h, -1, d))
        ib.index_copy_(2, dest, torch.where(from_new, new_pos + first_index, ib.gather(2, old_pos)))

    def _commit(self) -> None:
        for i, plan in enumerate(self._plans):
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

    def export_state(self) -> tuple[dict, dict[str, Tensor]]:
        tensors: dict[str, Tensor] = {}
        for l in range(self.shape.n_layers):
            tensors |= {f"layer.{l}.k": self.k[l], f"layer.{l}.v": self.v[l], f"layer.{l}.score": self.score[l],
                        f"layer.{l}.index": self.idx[l]}
        return {"start": list(self.start), "count": list(self.count)}, tensors

    def import_state(self, control: dict, tensors: dict[str, Tensor]) -> None:
        start, count = control["start"], control["count"]
        if not (isinstance(start, list) and isinstance(count, list) and len(start) == len(count) == self.cascades):
            raise ValueError("sub-cache count")
        if not all(is_int(s) and 0 <= s < self.width for s in start):
            raise ValueError("ring starts")
        if not all(is_int(c) and 0 <= c <= self.width for c in count):
            raise ValueError("ring counts")
        for l in range(self.shape.n_layers):
            for buf, name in ((self.k, "k"), (self.v, "v"), (self.score, "score"), (self.idx, "index")):
                copy_named(buf[l], tensors, f"layer.{l}.{name}")
        self.start, self.count = list(start), list(count)
