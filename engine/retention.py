"""Question-guided retention (docs/ALGORITHM.md §9): the question decides, with the text, what the cascade keeps.

The paper's scores are question-agnostic: a cached token scores high when the text that follows attends to it.
For `ask` the question is known before the input is read, so it sits in the pinned prefix and:
1. while the prefix is processed, `query_hook` keeps each layer's pre-RoPE queries of the question tokens
   ([B, Hq, Q, D], a few KB per layer);
2. at every later chunk, `score_hook` rotates them as if the question stood right after the chunk (positions
   K + j, K = sinks + cached + chunk keys, so every key is in their past), takes their exact softmax attention
   over all K keys, drops the sink columns, averages over the question tokens, reduces each KV group like the
   cache does (max or mean), and adds  λ·(1 − β^L) ·  that to the chunk's scores [B, Hkv, K − sinks].

Scale of λ: the EMA increment of one chunk of L queries sums to (1 − β^L) per query head, so with λ = 1 the
question weighs as much as the whole chunk's own queries; summed over the chunks a token stays cached, the
question's share of its score tends to λ·a (a = the question's attention to it), next to the text's EMA of p.
Cost per chunk and layer: Q extra query rows over K keys (Q ≪ L)."""
from __future__ import annotations

import torch
from torch import Tensor

from .attention import apply_rope
from .runner import Runner

DEFAULT_WEIGHT = 1.0  # λ, relative to the chunk's own EMA increment (see the module docstring)


def question_attention(q: Tensor, k: Tensor, scale: float, head_reduce: str = "max") -> Tensor:
    """Exact softmax attention of rotated queries q [B, Hq, Q, D] over rotated keys k [B, Hkv, K, D].

    Averaged over the Q queries, reduced over the G = Hq / Hkv heads of each KV group: [B, Hkv, K] float32."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    g = hq // hkv
    s = q.float().reshape(b, hkv, g * n_q, d) @ k.float().transpose(-1, -2) * scale  # [B, Hkv, G·Q, K]
    p = torch.softmax(s, dim=-1).view(b, hkv, g, n_q, n_k).mean(dim=3)  # [B, Hkv, G, K]
    return p.amax(dim=2) if head_reduce == "max" else p.mean(dim=2)


class QuestionGuide:
    """Hooks on a Runner that add the question's attention to the cache's scores, as a context manager.

        with QuestionGuide(runner, prompt.question_span, weight):
            ingest(runner, prompt.prefix_ids, pieces)

    `span` = [start, end) of the question tokens in the stream (they are in the pinned prefix). The guide acts
    only on chunks that start after the question was read, and only where the cache computes scores."""

    def __init__(self, runner: Runner, span: tuple[int, int], weight: float = DEFAULT_WEIGHT):
        start, end = span
        assert 0 <= start < end, span
        self.runner, self.start, self.end, self.weight = runner, start, end, weight
        layers = runner.model.model.layers
        self.scale = [float(layer.self_attn.scaling) for layer in layers]
        self._parts: list[list[Tensor]] = [[] for _ in layers]
        self.queries: list[Tensor | None] = [None] * len(layers)  # pre-RoPE [B, Hq, Q, D] float32 per layer

    def __enter__(self) -> "QuestionGuide":
        self.runner.query_hook, self.runner.score_hook = self.capture, self.guide
        return self

    def __exit__(self, *exc) -> None:
        self.runner.query_hook = self.runner.score_hook = None

    def capture(self, layer: int, q: Tensor) -> None:
        """query_hook: keep the question's rows of the chunk's pre-RoPE queries q [B, Hq, L, D]."""
        if self.queries[layer] is not None:
            return
        t0 = self.runner.cache.seen  # stream index of the chunk's first token
        a, b = max(self.start, t0), min(self.end, t0 + q.shape[2])
        if a < b:
            self._parts[layer].append(q[:, :, a - t0 : b - t0].float().clone())
        if t0 + q.shape[2] >= self.end and self._parts[layer]:
            self.queries[layer] = torch.cat(self._parts[layer], dim=2)
            self._parts[layer] = []

    def increment(self, layer: int, k_all: Tensor, n_drop: int, n_new: int) -> Tensor:
        """λ·(1 − β^L)·(question attention) over the keys k_all [B, Hkv, K, D] but the first n_drop (sinks)."""
        q = self.queries[layer]
        n_k = k_all.shape[2]
        cos, sin = self.runner.rotary(n_k + q.shape[2], k_all.device)  # this layer's device
        q_rot = apply_rope(q, cos[n_k:].float(), sin[n_k:].float())  # the question right after the chunk
        a = question_attention(q_rot, k_all, self.scale[layer], self.runner.config.head_reduce)
        return self.weight * (1.0 - self.runner.config.beta**n_new) * a[:, :, n_drop:]

    def guide(self, layer: int, k_all: Tensor, scores: Tensor) -> Tensor:
        """score_hook: scores [B, Hkv, K − sinks] of the chunk, plus the question's share."""
        if self.queries[layer] is None or self.runner.cache.seen < self.end or self.weight == 0:
            return scores
        extra = self.increment(layer, k_all, k_all.shape[2] - scores.shape[2], self.runner.cache.n_new)
        return scores + extra

