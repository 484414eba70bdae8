"""One model, one cache, our attention patched in: runs token chunks through the model.

`Runner.step(ids)` is the single entry point for prefill chunks and decode steps alike (a decode step is a
chunk of one token), so scores, positions and cache updates follow one code path.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from kernels.chunk_attention import ema_weights

from .attention import StepContext, patched_attention
from .cache import CacheShape, KVCache, make_cache
from .config import CacheConfig
from .errors import CapacityError


class Runner:
    def __init__(self, model: nn.Module, config: CacheConfig, n_sinks: int | None = None, expected_tokens: int = 0,
                 batch: int = 1):
        cfg = model.config
        self.model, self.config = model, config
        self.n_sinks = config.sinks if n_sinks is None else max(n_sinks, 0)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        p = next(model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = CacheShape(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, head_dim, p.dtype, p.device)
        self.cache: KVCache = make_cache(config, shape, self.n_sinks, expected_tokens)
        self.score_hook = None  # set by question-guided retention
        self.query_hook = None  # idem, while the question is read
        self._stack = ExitStack()
        self._ctx_ref = self._stack.enter_context(patched_attention(model))
        self._cos = self._sin = None

    def close(self) -> None:
        """Restore the model's own attention."""
        self._stack.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rotary(self, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin [n, D] for positions 0 .. n-1 from the model's own rotary module (any RoPE scaling)."""
        if self._cos is None or self._cos.shape[0] < n:
            size = max(n, self.n_sinks + self.config.cache_size + self.config.stride)
            p = next(self.model.parameters())
            pos = torch.arange(size, device=p.device).unsqueeze(0)
            cos, sin = self.model.model.rotary_emb(p.new_zeros(1), pos)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[:n], self._sin[:n]

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """Feed ids [B, L] (L <= stride); returns the final hidden states [B, L, hidden]."""
        n_new = ids.shape[1]
        past = self.cache.n_past
        if past + n_new > self.max_positions:
            raise CapacityError(
                f"position {past + n_new - 1} is past the model's limit of {self.max_positions}; "
                f"lower --cache-size or --stride, or use --policy cascade/sink"
            )
        self.cache.begin(n_new)
        cos, sin = self._rotary(past + n_new)
        ema = ema_weights(n_new, self.config.beta, ids.device) if self.cache.needs_scores else None
        self._ctx_ref[0] = StepContext(self.cache, cos, sin, ema, self.config.head_reduce, self.score_hook,
                                       self.query_hook)
        try:
            position_ids = torch.arange(past, past + n_new, device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
            hidden = self.model.model(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state
        finally:
            self._ctx_ref[0] = None
        self.cache.end()
        return hidden

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """LM head in float32 for hidden [B, T, hidden] -> [B, T, V]."""
        return self.model.lm_head(hidden).float()
