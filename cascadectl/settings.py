"""The cache settings of one command line, as one object built in one place and passed down.

`@options.cache_options` builds a `CacheRequest` from the cache options (cascadectl/options.py
`CACHE_OPTIONS`); the commands ask it for their `CacheConfig` (`config`), for the settings a --load-cache file
must agree with (`explicit`), and nothing else rebuilds a CacheConfig from options."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import typer

from engine.config import CacheConfig
from engine.sizing import memory_budget, parse_cache_size, parse_memory

from .console import Say

_FIELDS = frozenset(f.name for f in fields(CacheConfig))


def given(ctx: typer.Context, name: str) -> bool:
    """Was option `name` given (command line or environment), rather than left at its default?"""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


@dataclass(frozen=True)
class AutoSize:
    """--cache-size auto, as the command line asked for it: --memory (None: a share of what is free) and the
    stride when given."""

    memory: int | None = None
    stride: int | None = None

    def budget(self, device) -> int:
        return memory_budget(device, self.memory)


@dataclass(frozen=True)
class CacheRequest:
    """The cache options as the command line gave them: `values` by setting name (cache_size may be "auto"),
    `memory` (--memory, for auto) and the names given explicitly rather than left at their defaults."""

    values: dict
    memory: str | None = None
    explicitly: frozenset = frozenset()

    @classmethod
    def from_command_line(cls, ctx: typer.Context, values: dict) -> "CacheRequest":
        values = dict(values)
        memory = values.pop("memory", None)
        return cls(values, memory, frozenset(name for name in values if given(ctx, name)))

    def config(self, policy: str | None = None) -> tuple[CacheConfig, AutoSize | None]:
        """The CacheConfig asked for (with `policy` instead of --policy: one of --compare), and the auto sizing
        request when --cache-size is auto."""
        settings = {k: v for k, v in self.values.items() if k in _FIELDS and k not in ("policy", "cache_size")}
        policy = self.values["policy"] if policy is None else policy
        size = parse_cache_size(self.values["cache_size"])
        budget = parse_memory(self.memory)
        if size is not None:
            if budget is not None:
                Say.info("note: --memory sizes --cache-size auto; with --cache-size given it is not used")
            return CacheConfig(policy=policy, cache_size=size, **settings), None
        base = CacheConfig(policy=policy, **{k: v for k, v in settings.items() if k != "stride"})
        stride = settings.get("stride") if "stride" in self.explicitly else None
        if stride is not None:
            base = replace(base, stride=min(stride, base.cache_size))
        return base, AutoSize(budget, stride)

    def explicit(self) -> dict:
        """Cache settings given explicitly: a --load-cache file must agree with them; the others come from it."""
        settings = {name: self.values[name] for name in self.values if name in self.explicitly}
        if "cache_size" in settings:
            size = parse_cache_size(settings["cache_size"])
            if size is None:
                del settings["cache_size"]  # auto: whatever the file holds
            else:
                settings["cache_size"] = size
        return settings
