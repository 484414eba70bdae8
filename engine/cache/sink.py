"""`sink`: StreamingLLM (arXiv 2309.17453) — the sink tokens plus a sliding window of the newest N tokens.

Layout per layer: `[ S sinks | ring of N slots ]`. Scores are not needed, so attention can skip them."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import CacheShape, KVCache, copy_named, empty_buffers, gather_past, is_int


class SinkWindowCache(KVCache):
    needs_scores = False
    policy = "sink"

    def __init__(self, shape: CacheShape, n_sinks: int, window: int):
        super().__init__(shape, n_sinks)
        self.window = window
        self.k, self.v, _ = empty_buffers(shape, n_sinks + window)
        self.index = torch.full((n_sinks + window,), -1, dtype=torch.long, device=shape.device)
        self.head = 0  # next ring slot to write
        self.count = 0  # ring slots in use
        self._order = torch.zeros(0, dtype=torch.long, device=shape.device)
        self._remote: dict | None = None  # device -> (src, dst, order) there, when layers span devices

    @property
    def n_past(self) -> int:
        return self.n_sinks_filled + self.count

    def _plan(self, n_new: int) -> None:
        to_sinks = min(n_new, self.n_sinks - self.n_sinks_filled)
        rest = n_new - to_sinks
        kept = min(rest, self.window)
        # tokens of the chunk and the slots they land in: sinks in order, then the ring (earlier ones overwritten)
        src = list(range(to_sinks)) + list(range(n_new - kept, n_new))
        dst = list(range(self.n_sinks_filled, self.n_sinks_filled + to_sinks))
        dst += [self.n_sinks + (self.head + rest - kept + j) % self.window for j in range(kept)]
        dev = self.shape.device
        self._written = np.asarray(dst, dtype=np.int64)
        self._src = torch.tensor(src, dtype=torch.long, device=dev)
        self._dst = torch.tensor(dst, dtype=torch.long, device=dev)
        self._order = self._age_order(self.head, self.count)
        self._next = ((self.head + rest) % self.window, min(self.window, self.count + rest))
        if self.shape.layer_devices is not None:  # the same indices on every other device that holds layers
            self._remote = {d: tuple(t.to(d, non_blocking=True) for t in (self._src, self._dst, self._order))
                            for d in self.shape.devices[1:]}

    def _indices(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """The chunk's (src, dst, order) on `layer`'s device."""
        if self._remote is not None:
            dev = self.shape.device_of(layer)
            if dev != self.shape.device:
                return self._remote[dev]
        return self._src, self._dst, self._order

    def _age_order(self, head: int, count: int) -> Tensor:
        oldest = head if count == self.window else 0
        ring = [self.n_sinks + (oldest + i) % self.window for i in range(count)]
        return torch.tensor(list(range(self.n_sinks_filled)) + ring, dtype=torch.long, device=self.shape.device)

    def past(self, layer: int) -> tuple[Tensor, Tensor]:
        order = self._indices(layer)[2]
        return gather_past(self.k[layer], self.v[layer], order)

    def past_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.k[layer], self.v[layer], self._indices(layer)[2]

    def update(self, layer: int, k: Tensor, v: Tensor, score: Tensor | None) -> None:
        src, dst, _ = self._indices(layer)
        self.k[layer].index_copy_(2, dst, k.index_select(2, src))
        self.v[layer].index_copy_(2, dst, v.index_select(2, src))

    def _commit(self) -> None:
        self.index[self._dst] = self._src + self.seen
        self.head, self.count = self._next

    def token_index(self, layer: int) -> Tensor:
        order = self._age_order(self.head, self.count)
        b, h = self.shape.batch, self.shape.n_kv_heads
        return self.index[order].expand(b, h, -1).to(self.shape.device_of(layer))

    def fill(self) -> list[tuple[int, int]]:
        return [(self.n_sinks_filled, self.n_sinks), (self.count, self.window)]

    def _tensors(self) -> list[Tensor]:
        return self.k + self.v

    def export_state(self) -> tuple[dict, dict[str, Tensor]]:
        tensors = {"index": self.index}
        for l in range(self.shape.n_layers):
            tensors |= {f"layer.{l}.k": self.k[l], f"layer.{l}.v": self.v[l]}
        return {"head": self.head, "count": self.count}, tensors

    def import_state(self, control: dict, tensors: dict[str, Tensor]) -> None:
        head, count = control["head"], control["count"]
        if not (is_int(head) and is_int(count) and 0 <= head < self.window and 0 <= count <= self.window):
            raise ValueError("window head or count")
        for l in range(self.shape.n_layers):
            copy_named(self.k[l], tensors, f"layer.{l}.k")
            copy_named(self.v[l], tensors, f"layer.{l}.v")
        copy_named(self.index, tensors, "index")
        self.head, self.count = head, count
