"""`--cache-size auto`: a cache sized to the model and the machine, and the exact route for inputs that fit.

Two decisions, both from numbers the model and the machine give:

- **Exact when it fits.** An input whose prompt, text, request and answer fit the model's own positions (and
  the memory budget) is read with full attention: nothing is evicted, no eviction scores are computed, and the
  result is the model's own (`exact_room`).
- **Otherwise a cascade sized to the model**, the smallest of three bounds (`long_input_config`):
  positions (sinks + cache + stride + the question's queries stay below `max_position_embeddings`), memory
  (the KV bytes of one token times the cache fit the budget) and speed: attention over the cache may cost at
  most what the model's own weights cost per token (4·N·heads·head_dim FLOPs a layer against 2 FLOPs a weight),
  so a long input reads at no less than about half the speed of a short one; never below `MIN_CACHE` (the
  size measured on the embedded model, docs/RESULTS.md). The stride is one sub-cache (`cache / cascades`), at
  most `MAX_STRIDE`; for the embedded model that is today's 4,096-token cache with stride 1,024.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Iterable

import torch

from .config import CacheConfig
from .errors import ConfigError
from .families import kv_geometry
from .runner import cache_shape
from .tokens import peek

AUTO = "auto"
MIN_CACHE = 4096
MAX_STRIDE = 4096
CPU_SHARE = 0.25  # of available RAM, for the cache, when no --memory is given
GPU_SHARE = 0.80  # of free GPU memory after the weights are loaded
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


@dataclass(frozen=True)
class Sizing:
    """How the cache was sized, for the stderr note and `--json` (`record.sizing`)."""

    cache_size: int  # the cascade's size for inputs that do not fit
    stride: int
    bound: str  # what chose cache_size: "positions", "memory", "speed" or "minimum"
    kv_bytes_per_token: int  # keys, values and (cascade) scores of one cached token over all layers
    memory_budget_bytes: int
    exact_up_to: int  # input tokens that are read exactly (full attention) with this prompt and answer
    exact_stride: int  # the exact route's chunks: the requested stride, as --policy full would read
    exact: bool = False  # this input fitted and was read exactly

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.exact:
            return (f"the input fits the model's positions (up to {self.exact_up_to:,} input tokens do here): "
                    f"read exactly with full attention, nothing evicted")
        why = {"positions": "the model's positions", "memory": "the memory budget",
               "speed": "attention at most the weights' cost per token", "minimum": "the smallest auto size"}
        return (f"cache auto: {self.cache_size:,} tokens, stride {self.stride:,} (bound: {why[self.bound]}); "
                f"inputs up to {self.exact_up_to:,} tokens are read exactly")


def parse_cache_size(text: str | int) -> int | None:
    """`cache_size`: a number of tokens, or "auto" (None)."""
    if isinstance(text, int):
        return text
    value = str(text).strip().lower()
    if value == AUTO:
        return None
    try:
        return int(value.replace("_", "").replace(",", ""))
    except ValueError:
        raise ConfigError(f"`cache_size` must be a number of tokens or auto (got {text!r})") from None


def parse_memory(text: str | None) -> int | None:
    """`memory`: bytes from "8GiB", "512M", "2e9" (None when not given)."""
    if text is None:
        return None
    value = str(text).strip().lower().replace(" ", "")
    digits = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(digits):]
    try:
        n = float(digits) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"`memory` must be a size such as 8GiB or 512MB (got {text!r})") from None
    if not n >= 1 << 20:
        raise ConfigError(f"`memory` must be at least 1MiB (got {text!r})")
    return int(n)


def kv_bytes_per_token(model, policy: str = "cascade") -> int:
    """Bytes one cached token costs over all layers (the geometry the cache itself is built with): keys and
    values in the model's dtype, plus an fp32 score per KV head for the cascade, plus on the CPU the fp32 copy of
    the keys rotated at their slots that decoding reads (engine/cache/slot_keys.py)."""
    shape = cache_shape(model)
    element = torch.empty((), dtype=shape.dtype).element_size()
    scores = 4 * shape.n_kv_heads * shape.n_layers if policy == "cascade" else 0
    slot_keys = 4 * shape.n_layers * shape.n_kv_heads * shape.head_dim if shape.device.type == "cpu" else 0
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * element + scores + slot_keys


def speed_cap(model) -> int:
    """The cache size at which attention over it costs what the decoder layers' weights cost per token."""
    layers = model.model.layers
    _, head_dim = kv_geometry(model)
    weights = sum(p.numel() for p in layers.parameters())
    per_slot = 4 * int(model.config.num_attention_heads) * head_dim * len(layers)  # q·k and p·v, every head
    return int(2 * weights // per_slot)


def memory_budget(device: torch.device | str, memory: int | None = None) -> int:
    """Bytes the cache may take: `memory` when given, else a share of what is free (documented in README)."""
    if memory is not None:
        return memory
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_SHARE * free)
    return int(CPU_SHARE * available_ram())


def free_bytes(device: torch.device | str) -> int:
    """Memory free now on `device`: the CUDA allocator's free bytes on a GPU, `available_ram` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_ram()


def available_ram() -> int:
    """Available memory on this machine (MemAvailable on Linux; total pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def exact_room(limit: int, n_prefix: int, n_suffix: int, max_tokens: int, kv_bytes_full: int, budget: int) -> int:
    """Input tokens that the exact route can take: prompt, input, request and answer within the model's
    positions and the whole sequence's KV within the budget."""
    by_positions = limit - n_prefix - n_suffix - max_tokens
    by_memory = budget // max(1, kv_bytes_full) - n_prefix - n_suffix - max_tokens
    return max(0, min(by_positions, by_memory))


def long_input_config(base: CacheConfig, model, limit: int, n_sinks: int, extra_positions: int,
                      budget: int, stride: int | None = None) -> tuple[CacheConfig, Sizing]:
    """`base` with the auto cache size (and the auto stride, unless `stride` is given) for inputs that do not
    fit (see the module docstring)."""
    cascades = base.n_cascades
    per_token = kv_bytes_per_token(model, base.policy)
    room = limit - n_sinks - extra_positions  # cache + stride must fit below it; stride = cache / cascades
    fast = speed_cap(model)
    bounds = {
        "positions": int(room * cascades / (cascades + 1)) if stride is None else room - stride,
        "memory": budget // max(1, per_token),
        "speed": max(MIN_CACHE, fast),
    }
    bound = min(bounds, key=bounds.get)
    size = bounds[bound]
    if bound == "speed" and fast < MIN_CACHE:
        bound = "minimum"
    step = 256 * cascades if size >= 1024 * cascades else cascades
    size = size // step * step
    if size < cascades:
        raise ConfigError(f"no cache fits: the model has {limit:,} positions and the budget is {budget:,} bytes "
                          f"({per_token:,} a cached token); give `cache_size` and `memory`")
    given_stride = stride
    if stride is None:
        stride = max(1, min(size // cascades, MAX_STRIDE, max(1, room - size)))
    config = replace(base, cache_size=size, stride=stride)
    return config, Sizing(cache_size=size, stride=config.stride, bound=bound, kv_bytes_per_token=per_token,
                          memory_budget_bytes=budget, exact_up_to=0,
                          exact_stride=CacheConfig.stride if given_stride is None else given_stride)


def route(pieces: Iterable[list[int]], config: CacheConfig, sizing: Sizing, model, limit: int,
          reserved: int = 0) -> tuple[CacheConfig, Sizing, Iterable[list[int]]]:
    """Take the exact route when the input (`pieces`) fits beside `reserved` tokens of prompt, request and answer
    (`exact_room`): (config, sizing, pieces) to read it with, `--policy full` at `sizing.exact_stride`, so that
    the result is that of `--policy full` bit for bit; a longer input keeps `config` and streams as before,
    having held at most that many ids meanwhile."""
    room = exact_room(limit, reserved, 0, 0, kv_bytes_per_token(model, "full"), sizing.memory_budget_bytes)
    fitted, pieces = peek(pieces, room)
    sizing = replace(sizing, exact_up_to=room, exact=fitted is not None)
    if fitted is None:
        return config, sizing, pieces
    return CacheConfig(policy="full", sinks=config.sinks, stride=sizing.exact_stride), sizing, [fitted]
