"""A decode step's index tensors at the same device addresses every step, for a decode step captured in a CUDA graph.

A graph replays kernels with the pointers they were captured with, so whatever changes from one decode step to the
next must change in place: here one device buffer holds the visible slots in age order, their score columns, the
push chain (padded with `cascade_kernels.cache_push.SKIP` to one code per sub-cache) and the token's stream index.
The host writes them each step into a pinned copy and sends it in one asynchronous transfer, ordered on the stream
before the replay that reads it. The buffer is made anew only when its length changes (a new number of visible
tokens), which is also when a graph must be captured anew (engine/decode_graph.py keys its graph on that).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cascade_kernels.cache_push import SKIP


class FixedStep:
    def __init__(self, device: torch.device, n_rings: int):
        self.device, self.n_rings = device, n_rings
        self.buffer: Tensor | None = None
        # what a decode step past the sinks never reads (the chunk's new-token indices): fixed too, and empty
        self.unused = tuple(torch.zeros(0, dtype=torch.long, device=device) for _ in range(3))

    @property
    def key(self) -> tuple | None:
        """The buffer's address and length: what a captured graph read its indices from."""
        return None if self.buffer is None else (self.buffer.data_ptr(), self.buffer.numel())

    def load(self, order: Tensor, n_unscored: int, n_sinks: int, chain: np.ndarray, t: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(order, score columns of the scored visible tokens, chain, [t]) as views of the fixed buffer.

        order: [n] int64 on the CPU, the physical slot of each visible token in age order; chain: the step's codes,
        at most one per sub-cache."""
        assert len(chain) <= self.n_rings, (len(chain), self.n_rings)
        n = order.numel()
        padded = np.full(self.n_rings, SKIP, dtype=np.int64)
        padded[: len(chain)] = chain
        host = torch.cat([order, order[n_unscored:] - n_sinks, torch.from_numpy(padded), torch.tensor([t])])
        if self.buffer is None or self.buffer.numel() != host.numel():
            self.buffer = torch.empty_like(host, device=self.device)
        if self.device.type == "cuda":  # asynchronous; the caching host allocator keeps the page until it is read
            self.buffer.copy_(host.pin_memory(), non_blocking=True)
        else:
            self.buffer.copy_(host)
        b = self.buffer
        n_scored = n - n_unscored
        return (b[:n], b[n : n + n_scored], b[n + n_scored : n + n_scored + self.n_rings],
                b[n + n_scored + self.n_rings :])
