"""`full`: keep every token. The exactness baseline (quadratic time, linear memory)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import CacheShape, KVCache, copy_named, empty_buffers


class DenseCache(KVCache):
    needs_scores = False

    policy = "full"

    def __init__(self, shape: CacheShape, n_sinks: int = 0, capacity: int = 4096):
        super().__init__(shape, n_sinks)
        self.capacity = max(capacity, 1)
        self.k, self.v, _ = empty_buffers(shape, self.capacity)
        self._orders: dict[torch.device, Tensor] = {}  # device -> arange(seen), built once per chunk

    @property
    def n_past(self) -> int:
        return self.seen

    def _plan(self, n_new: int) -> None:
        need = self.seen + n_new
        self._written = np.arange(self.seen, need)
        if need <= self.capacity:
            return
        self._touch(None)
        # amortised doubling; only `full` ever grows, and it is refused past the model's position limit anyway
        new_cap = max(need, 2 * self.capacity)
        for buffers in (self.k, self.v):
            for i, old in enumerate(buffers):
                grown = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
                grown[:, :, : self.seen] = old[:, :, : self.seen]
                buffers[i] = grown
        self.capacity = new_cap

    def past(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.k[layer][:, :, : self.seen], self.v[layer][:, :, : self.seen]

    def past_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        dev = self.k[layer].device
        order = self._orders.get(dev)
        if order is None or order.shape[0] != self.seen:
            order = self._orders[dev] = torch.arange(self.seen, device=dev)
        return self.k[layer], self.v[layer], order

    def update(self, layer: int, k: Tensor, v: Tensor, score: Tensor | None) -> None:
        n = k.shape[2]
        self.k[layer][:, :, self.seen : self.seen + n] = k
        self.v[layer][:, :, self.seen : self.seen + n] = v

    def token_index(self, layer: int) -> Tensor:
        b, h = self.shape.batch, self.shape.n_kv_heads
        return torch.arange(self.seen, device=self.shape.device_of(layer)).expand(b, h, self.seen)

    def fill(self) -> list[tuple[int, int]]:
        return [(self.seen, self.seen)]

    def _tensors(self) -> list[Tensor]:
        return self.k + self.v

    def export_state(self) -> tuple[dict, dict[str, Tensor]]:
        """Only the tokens seen so far (the buffer beyond is unused headroom)."""
        tensors: dict[str, Tensor] = {}
        for l in range(self.shape.n_layers):
            tensors |= {f"layer.{l}.k": self.k[l][:, :, : self.seen], f"layer.{l}.v": self.v[l][:, :, : self.seen]}
        return {"capacity": self.capacity}, tensors

    def import_state(self, control: dict, tensors: dict[str, Tensor]) -> None:
        if not self.seen <= self.capacity:
            raise ValueError("capacity")
        for l in range(self.shape.n_layers):
            copy_named(self.k[l][:, :, : self.seen], tensors, f"layer.{l}.k")
            copy_named(self.v[l][:, :, : self.seen], tensors, f"layer.{l}.v")
