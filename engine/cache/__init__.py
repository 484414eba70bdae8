"""Cache policies behind one protocol (base.KVCache): full, sink (StreamingLLM) and cascade."""
from __future__ import annotations

from ..config import CacheConfig
from .base import CacheShape, KVCache
from .cascade import CascadeCache
from .evidence import EvidenceCascadeCache
from .dense import DenseCache
from .sink import SinkWindowCache

__all__ = ["CacheShape", "KVCache", "CascadeCache", "EvidenceCascadeCache", "DenseCache", "SinkWindowCache", "make_cache"]


def make_cache(config: CacheConfig, shape: CacheShape, n_sinks: int, expected_tokens: int = 0) -> KVCache:
    """The policy's cache for a model of `shape`; `n_sinks` may exceed config.sinks to pin a prompt prefix."""
    if config.policy == "full":
        return DenseCache(shape, n_sinks, capacity=expected_tokens or 4096)
    if config.policy == "sink":
        return SinkWindowCache(shape, n_sinks, config.cache_size)
    if config.evidence:
        return EvidenceCascadeCache(shape, n_sinks, config.cache_size - config.evidence, config.cascades,
                                    config.beta, config.evidence)
    return CascadeCache(shape, n_sinks, config.cache_size, config.cascades, config.beta)
