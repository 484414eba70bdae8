"""`cascade` with an evidence store: whole spans of the input kept beside the cascade, at the same memory.

The cascading rule thins every run of consecutive tokens once it leaves sub-cache 0 (docs/ALGORITHM.md §2), so a
fact stated once far back cannot survive whole in the cascade, whatever its scores. An evidence store sets
aside E of the cache's slots for *spans* of consecutive tokens that a selector (engine/evidence.py) chose:

    [ S sinks | sub-cache 0 | ... | sub-cache C-1 | E evidence slots ]      physical layout per layer
    [ S sinks | evidence (token order) | sub-cache C-1 ... sub-cache 0 ]    age order, the RoPE positions

The cascade has N - E slots, so memory and the largest position are those of a plain cascade of N.

Taking a token (`take(slot, t)`) is a request; it is carried out between chunks, before the next one is
planned, and only from a slot whose content is the same for every head and layer: while nothing has been
evicted the whole cascade is one FIFO (eager fill), afterwards sub-cache 0 is (it accepts every token). The
token's key, value and index are copied into the evidence slot, and its cascade slot becomes *dead*: it is left
out of the age order, scores -inf (so it loses any compete), and when a ring pushes it on it is dropped instead
(`_passed_on`). So no token is ever visible twice. Requests wait while nothing has been evicted, so an input
that fits the cache is read exactly as without the store. A token that has already left sub-cache 0 cannot be
taken any more; with chunks no longer than a sub-cache, every token of the last chunk is still in sub-cache 0
when the next one begins (`engine/config.py` clips the stride to that).

All of it is integer control state, the same for every batch row, head and layer, kept on the host."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import CacheShape
from .cascade import CascadeCache, RingPlan, _ints


class EvidenceCascadeCache(CascadeCache):
    def __init__(self, shape: CacheShape, n_sinks: int, cache_size: int, cascades: int, beta: float,
                 evidence: int):
        super().__init__(shape, n_sinks, cache_size, cascades, beta, extra_slots=evidence)
        self.evidence = evidence
        self.ev_base = n_sinks + cache_size  # physical slot of evidence slot 0
        self.ev_token = np.full(evidence, -1, dtype=np.int64)  # stream index held by each evidence slot, or -1
        self.dead = np.zeros(cache_size, dtype=bool)  # cascade slots whose token an evidence slot holds
        self.wanted: dict[int, int] = {}  # evidence slot -> token to take there when it can be
        self.state: dict = {}  # the selector's own (JSON-able) state, saved and restored with the cache

    # ---- what the selector calls between chunks

    def take(self, slot: int, t: int) -> None:
        """Ask for token `t` in evidence slot `slot` (replacing what it held)."""
        self.release(slot)
        self.wanted[slot] = t

    def release(self, slot: int) -> None:
        """Empty evidence slot `slot` (its old token is gone: its cascade copy died when it was taken)."""
        self.wanted.pop(slot, None)
        self.ev_token[slot] = -1

    def held(self) -> np.ndarray:
        """The stream index in each evidence slot (-1: empty or not yet taken)."""
        return self.ev_token.copy()

    # ---- the protocol

    @property
    def fifo(self) -> bool:
        """Nothing evicted yet: every token so far arrived in the eager fill, so the whole cascade is one FIFO,
        the same in every head."""
        return self.seen <= self.cache_size + self.n_sinks + 1

    @property
    def n_evidence(self) -> int:
        return int((self.ev_token >= 0).sum())

    @property
    def n_past(self) -> int:
        return self.n_sinks_filled + self.n_evidence + sum(self.count) - int(self.dead.sum())

    @property
    def n_unscored(self) -> int:
        return self.n_sinks_filled + self.n_evidence

    def _plan(self, n_new: int) -> None:
        last = self.seen + n_new - 1
        if last > self.cache_size + self.n_sinks and not self.peeking:  # this chunk evicts: take what was asked for
            self._take_wanted()
        super()._plan(n_new)

    def _take_wanted(self) -> None:
        if not self.wanted:
            return
        moves = []
        for slot, t in sorted(self.wanted.items()):
            if t >= self.seen:  # not read yet: wait
                continue
            source = self._locate(t)
            del self.wanted[slot]
            if source is not None and not self.dead[source - self.n_sinks]:
                moves.append((self.ev_base + slot, source))
                self.ev_token[slot] = t
                self.dead[source - self.n_sinks] = True
        if not moves:
            return
        self._touch(np.asarray([d for d, _ in moves], dtype=np.int64))  # written now, before the chunk's attention
        dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*moves))
        for layer in range(self.shape.n_layers):
            dev = self.k[layer].device
            d, s = dst.to(dev), src.to(dev)
            for buf in (self.k[layer], self.v[layer], self.idx[layer]):
                buf.index_copy_(2, d, buf.index_select(2, s))
            self.score[layer].index_fill_(2, s - self.n_sinks, float("-inf"))

    def _locate(self, t: int) -> int | None:
        """Physical cascade slot that holds token `t` in every head, or None."""
        if t < self.n_sinks:
            return None
        if self.fifo:  # eager fill: sub-cache C-1 (oldest) ... sub-cache 0 hold the newest tokens in order
            slots = self._ring_slots()
            rank = t - (self.seen - len(slots))
            return int(slots[rank]) if 0 <= rank < len(slots) else None
        first = self.seen - self.count[0]
        if not first <= t < self.seen:
            return None
        return self.n_sinks + (self.start[0] + t - first) % self.width

    def _ring_slots(self) -> np.ndarray:
        """Every occupied cascade slot in age order, dead ones included."""
        parts = [(self.start[i] + np.arange(self.count[i])) % self.width + self.n_sinks + i * self.width
                 for i in reversed(range(self.cascades))]
        return np.concatenate(parts) if parts else _ints(())

    def _passed_on(self, plan: RingPlan, times):
        n_old = len(plan.out_old)
        if n_old == 0 or not self.dead.any():
            return times
        alive = ~self.dead[plan.out_old - self.n_sinks]
        if alive.all():
            return times
        keep = np.concatenate([np.flatnonzero(alive), n_old + np.arange(len(times) - n_old)])
        plan.keep = keep if len(keep) else _ints(())
        return np.asarray(times)[keep]

    def _age_order(self, dev: torch.device | None = None) -> Tensor:
        dev = dev or self.shape.device
        filled = np.flatnonzero(self.ev_token >= 0)
        filled = filled[np.argsort(self.ev_token[filled], kind="stable")] + self.ev_base
        rings = self._ring_slots()
        rings = rings[~self.dead[rings - self.n_sinks]] if len(rings) else rings
        order = np.concatenate([np.arange(self.n_sinks_filled), filled, rings]).astype(np.int64)
        return torch.from_numpy(order).to(dev)

    def _commit(self) -> None:
        for plan in self._plans:
            self.dead[np.asarray(plan.write_slot, dtype=np.int64) - self.n_sinks] = False
        super()._commit()

    # ---- persistence

    def export_state(self) -> tuple[dict, dict[str, Tensor]]:
        control, tensors = super().export_state()
        return control | {"evidence": self.control()}, tensors

    def import_state(self, control: dict, tensors: dict[str, Tensor]) -> None:
        super().import_state(control, tensors)
        try:
            self.load_control(control["evidence"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("evidence state") from None

    def control(self) -> dict:
        """The evidence store's control state (engine/snapshot.py saves it beside the rings')."""
        return {"ev_token": self.ev_token.tolist(), "dead": np.flatnonzero(self.dead).tolist(),
                "wanted": sorted([int(k), int(v)] for k, v in self.wanted.items()), "state": self.state}

    def load_control(self, control: dict) -> None:
        """Restore `control()`'s output; ValueError when it does not fit this cache."""
        ev, dead, wanted = control["ev_token"], control["dead"], control["wanted"]
        if not (isinstance(ev, list) and len(ev) == self.evidence and isinstance(dead, list)
                and isinstance(wanted, list)
                and isinstance(control["state"], dict)):
            raise ValueError("evidence state")
        ints = [*ev, *dead, *(x for pair in wanted for x in pair)]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in ints):
            raise ValueError("evidence state")
        if any(not 0 <= d < self.cache_size for d in dead) or any(
                len(pair) != 2 or not 0 <= pair[0] < self.evidence for pair in wanted):
            raise ValueError("evidence slots")
        self.ev_token = np.asarray(ev, dtype=np.int64)
        self.dead = np.zeros(self.cache_size, dtype=bool)
        self.dead[np.asarray(dead, dtype=np.int64)] = True
        self.wanted = {int(a): int(b) for a, b in wanted}
        self.state = dict(control["state"])
