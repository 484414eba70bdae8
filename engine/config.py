"""Cache and prefill settings: one frozen dataclass that checks itself.

CLI options map one-to-one onto these fields, so the defaults live here and nowhere else.
Error messages name the setting to change (`cache_size`: engine/errors.py); the CLI shows it as its flag."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .errors import CapacityError, ConfigError

POLICIES = ("full", "sink", "cascade")
HEAD_REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "cascade"  # full = exact quadratic baseline, sink = StreamingLLM, cascade = arXiv 2406.17808
    cache_size: int = 4096  # N: cached tokens besides the sinks; fixed memory whatever the input length
    cascades: int = 4  # C: sub-caches of N/C slots; reach ~ (N/C)(2^C - 1) tokens; 1 = StreamingLLM
    sinks: int = 64  # S: minimum sink tokens (the pinned prompt prefix is always kept in full)
    stride: int = 1024  # L: prefill chunk length; queries of a chunk see the cache as it was at its start
    beta: float = 0.999  # EMA decay of the attention scores, per query
    head_reduce: str = "max"  # how the query heads of one KV group are combined into one score
    # slots of cache_size set aside for whole spans that the question chose (engine/evidence.py); cascade only
    evidence: int = 0
    # which queries of a prefill chunk feed the scores: "exact" = all, "last:R" = its last R (ALGORITHM.md §3)
    scores: str = "exact"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"`policy` must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ConfigError(f"`head_reduce` must be one of {', '.join(HEAD_REDUCTIONS)} (got {self.head_reduce!r})")
        if self.stride < 1:
            raise ConfigError(f"`stride` must be >= 1 (got {self.stride})")
        if self.sinks < 0:
            raise ConfigError(f"`sinks` must be >= 0 (got {self.sinks})")
        if self.scores != "exact" and self.score_queries is None:
            raise ConfigError(f"`scores` must be 'exact' or 'last:R' with an integer R >= 1 (got {self.scores!r})")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"`beta` must be strictly between 0 and 1 (got {self.beta})")
        if self.policy == "full":
            return
        if self.cache_size < 1:
            raise ConfigError(f"`cache_size` must be >= 1 (got {self.cache_size})")
        if self.cascades < 1:
            raise ConfigError(f"`cascades` must be >= 1 (got {self.cascades})")
        if self.policy == "cascade" and not self.evidence and self.cache_size % self.cascades:
            raise ConfigError(
                f"`cache_size` ({self.cache_size}) must be a multiple of `cascades` ({self.cascades})"
            )
        if self.stride > self.cache_size:
            raise ConfigError(f"`stride` ({self.stride}) must be <= `cache_size` ({self.cache_size})")
        if self.evidence < 0:
            raise ConfigError(f"`evidence` must be >= 0 (got {self.evidence})")
        if self.evidence:
            if self.policy != "cascade":
                raise ConfigError(f"`evidence` needs `policy=cascade` (got {self.policy}); use `evidence=0`")
            rest = self.cache_size - self.evidence
            if rest < self.cascades or rest % self.cascades:
                raise ConfigError(
                    f"`cache_size` ({self.cache_size}) - `evidence` ({self.evidence}) = {rest} must be a positive "
                    f"multiple of `cascades` ({self.cascades})")
            if self.stride > rest // self.cascades:
                raise ConfigError(
                    f"`stride` ({self.stride}) must be <= one sub-cache ({rest // self.cascades} slots) with "
                    f"`evidence`, so that a chosen span is still whole when it is taken")

    def with_evidence(self, slots: int) -> "CacheConfig":
        """This config with `slots` evidence slots, the stride clipped to one sub-cache of what is left (the
        evidence store takes a span from sub-cache 0, engine/cache/evidence.py). Plain `cascade` only."""
        if self.policy != "cascade" or slots <= 0:
            return replace(self, evidence=0)
        width = (self.cache_size - slots) // self.cascades
        return replace(self, evidence=slots, stride=max(1, min(self.stride, width)))

    @property
    def score_queries(self) -> int | None:
        """R of `scores="last:R"` (only a chunk's last R queries feed the EMA scores); None for "exact" and for
        anything malformed (which __post_init__ rejects)."""
        kind, _, count = self.scores.partition(":")
        if kind != "last" or not count.isdigit() or int(count) < 1:
            return None
        return int(count)

    @property
    def n_cascades(self) -> int:
        """Sub-caches actually used: `sink` is one window."""
        return 1 if self.policy == "sink" else self.cascades

    def max_position(self, n_sinks: int, n_tokens: int | None = None) -> int:
        """Largest RoPE position the prefill uses with `n_sinks` pinned tokens (§4 of ALGORITHM.md).

        `full` uses absolute positions, so its bound is the input length `n_tokens`."""
        if self.policy == "full":
            return (n_tokens or 0) - 1
        return n_sinks + self.cache_size + self.stride - 1

    def check_positions(self, n_sinks: int, limit: int, n_tokens: int | None = None) -> None:
        """Fail before any work when positions would pass the model's `max_position_embeddings`."""
        top = self.max_position(n_sinks, n_tokens)
        if top < limit:
            return
        if self.policy == "full":
            raise CapacityError(
                f"`policy=full` needs {n_tokens} positions but the model has {limit}; "
                f"use `policy` cascade or sink for inputs this long"
            )
        raise CapacityError(
            f"sinks ({n_sinks}) + `cache_size` ({self.cache_size}) + `stride` ({self.stride}) = {top + 1} "
            f"positions, more than the model's {limit}; lower `cache_size` or `stride`"
        )
