"""GPU decode steps replayed from a captured CUDA graph.

At batch 1 a decode step is many small kernels (about 1,300 for an 8B Llama: norms, projections, RoPE, paged
attention, the cache push, per layer); launched one by one from Python they leave the GPU idle most of the time
(docs/BENCHMARKS.md, "GPU decode"). Captured once as a CUDA graph, the whole step (every layer, the cache update,
the LM head) is one launch.

A graph replays its kernels with the arguments they were captured with, so a step may be replayed only where
nothing but tensor contents changes from one step to the next. A decode step past the sinks meets that once the
cache's shape holds still (the same number of visible tokens every step: a full cache): the rotary tables, the EMA
weights and all buffers keep their addresses; what does change (which slots are visible and in what order, the
slots the token is pushed through, its stream index) the cache keeps in one buffer at a fixed address that the
host refills before each replay (engine/cache/fixed_step.py), and the token id goes into a fixed [1, 1] tensor.

Per shape (the cache object, its visible and unscored token counts, the addresses of its index buffer and of the
runner's rotary tables): the first step runs eagerly on the fixed
indices (it compiles the Triton kernels and warms cuBLAS), the second is captured and replayed, every later one
replayed. Another shape (another question's cache, a span taken by the evidence store) drops the graph and starts
over. Where a graph cannot serve (CPU, CASCADECTL_KERNELS=ref, a model spread over devices, hooks that do host
work inside the step, a policy without fixed indices, steps that fill the sinks) decode runs eagerly.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from cascade_kernels.dispatch import graph_path


@dataclass
class GraphCounts:
    """How the decode steps ran: eager (no graph could serve, or the first step of a shape), captured, replayed."""

    eager: int = 0
    captured: int = 0
    replayed: int = 0

    def as_dict(self) -> dict:
        return {"eager": self.eager, "captured": self.captured, "replayed": self.replayed}


class DecodeGraph:
    """One runner's captured decode step (`Runner.decode` asks `serves()` and calls `decode`)."""

    def __init__(self, runner):
        self.runner = runner
        self.counts = GraphCounts()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None  # the graphs' private memory pool, kept across recaptures
        self._cache: weakref.ref | None = None  # the cache the key below belongs to
        self._key: tuple | None = None  # the captured graph's shape
        self._warm: tuple | None = None  # the shape of the last eager step on fixed indices
        self._ids: Tensor | None = None  # [1, 1] the token id the graph reads
        self._logits: Tensor | None = None  # [V] the graph's output
        self.off: str | None = None  # why the last step could not go through a graph (`serves`), None if it could

    def serves(self) -> bool:
        """Whether decode steps may go through here: a CUDA cache on one device whose policy keeps fixed indices,
        and no hook that needs the step's tensors on the host. Where not, `off` says why."""
        self.off = self._why_not()
        return self.off is None

    def _why_not(self) -> str | None:
        r = self.runner
        cache = r.cache
        if graph_path(cache.shape.device) != "graph":
            return "not on CUDA, or CASCADECTL_KERNELS=ref"
        if cache.shape.layer_devices is not None:
            return "the model is spread over several devices (a graph is captured on one)"
        if cache.shape.batch != 1:
            return "batch > 1"
        if r.score_hook is not None or r.query_hook is not None or r.key_hook is not None:
            return "a hook reads the step on the host"
        if not cache.use_fixed_indices(True):
            return f"the {type(cache).__name__} policy keeps no fixed decode indices"
        return None

    def report(self) -> dict:
        """How the decode steps ran so far (`GraphCounts`), and why no graph served the last one (`off`, or None)."""
        return {**self.counts.as_dict(), "off": self.off}

    def decode(self, token: int) -> Tensor:
        """One token through the model: next-token logits [V] float32, valid until the next step."""
        r = self.runner
        cache = r.cache
        device = cache.shape.device
        r.plan(1)
        # what the captured kernels read at fixed addresses: the index buffer and the rotary tables
        key = (cache.n_past, cache.n_unscored, cache.fixed_key, r.rotary_key)
        same = self._cache is not None and self._cache() is cache
        fixed = cache.fixed_step  # not, e.g., for a step that still fills the sinks
        if fixed and same and self._graph is not None and key == self._key:
            ids = self._ids
            ids.fill_(token)
            self._graph.replay()
            logits = self._logits
            self.counts.replayed += 1
        elif fixed and same and key == self._warm:  # the second step of this shape: capture it, then run it
            self.drop()
            ids = self._ids = torch.full((1, 1), token, dtype=torch.long, device=device)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._logits = self._forward(ids)
            graph.replay()
            self._graph, self._key = graph, key
            logits = self._logits
            self.counts.captured += 1
        else:  # eager; on fixed indices the first step of a shape, which compiles what the capture records
            self.drop()
            ids = torch.full((1, 1), token, dtype=torch.long, device=device)
            logits = self._forward(ids)
            if fixed:
                self._cache, self._warm = weakref.ref(cache), key
            self.counts.eager += 1
        r.commit(ids)
        return logits

    def drop(self) -> None:
        """Free the captured graph (its memory returns to the pool)."""
        self._graph = self._key = self._ids = self._logits = None

    def _forward(self, ids: Tensor) -> Tensor:
        r = self.runner
        return r.logits(r.forward(ids)[:, -1])[0]
