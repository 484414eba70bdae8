"""The cache protocol shared by every policy.

A model-level cache holds one layer's keys/values per decoder layer, preallocated, plus control state that is
the same for every batch row, head and layer (which slot holds what depends only on token counts; which
*token* wins a slot may differ per head). Each prefill chunk or decode step is one transaction:

    cache.begin(n_new)                    # plan the chunk on the host, from integers only
    for every layer:
        k_past, v_past = cache.past(l)    # pre-RoPE [B, Hkv, P, D]: sinks first, then cached tokens oldest first
        ...attention over [k_past | k_new] at slot positions 0 .. P + n_new - 1...
        cache.update(l, k_new, v_new, score)   # score: [B, Hkv, P - sinks + n_new] fp32, or None
    cache.end()

Keys are stored before RoPE and rotated at their slot position (rank in `past`) at attention time.
`past_slots(l)` gives the same keys/values without copying them: the raw buffers plus the physical slot of each
age rank, for attention kernels that gather and rotate on load (kernels/paged_attention.py).
When the model is spread over several devices (`CacheShape.layer_devices`), each layer's buffers live on that
layer's device and the chunk's small index tensors are copied once per device per chunk, never per layer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .slot_keys import SlotKeys, pieces


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    batch: int
    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device  # where the input ids and the control tensors live (the embedding's device)
    # each layer's device when the model is spread over several (device_map); None = every layer on `device`
    layer_devices: tuple[torch.device, ...] | None = None

    def device_of(self, layer: int) -> torch.device:
        return self.device if self.layer_devices is None else self.layer_devices[layer]

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Distinct devices holding layers, the home device first."""
        return tuple(dict.fromkeys((self.device, *(self.layer_devices or ()))))


class KVCache(ABC):
    """One policy's cache for a whole model (one buffer set per layer)."""

    needs_scores: bool = False  # does `update` consume attention scores?
    policy: str = ""  # the --policy this class implements (engine/config.py POLICIES)

    def __init__(self, shape: CacheShape, n_sinks: int):
        self.shape = shape
        self.n_sinks = n_sinks  # the first n_sinks tokens of the stream are kept forever
        self.seen = 0  # tokens consumed so far (absolute index of the next token)
        self.n_new = 0  # tokens of the chunk in flight
        self._written: np.ndarray | None = None  # physical slots the planned chunk writes (None: unknown, any)
        self._slot_keys: SlotKeys | None = None  # made by the first CPU decode step that reads the cache in place
        self._pieces: list | None = None
        self.peeking = False  # inside `peek`

    @property
    @abstractmethod
    def n_past(self) -> int:
        """Tokens visible to the next chunk (sinks + cached), the same in every layer."""

    @property
    def n_sinks_filled(self) -> int:
        return min(self.seen, self.n_sinks)

    @property
    def n_unscored(self) -> int:
        """Leading visible tokens that attention sees but gives no score: the sinks (and, with an evidence store,
        the kept spans, which `engine/cache/cascade.py` places right after them)."""
        return self.n_sinks_filled

    def begin(self, n_new: int) -> None:
        """Plan the insertion of the next `n_new` tokens."""
        self.n_new = n_new
        self._written, self._pieces = None, None
        self._plan(n_new)

    @abstractmethod
    def _plan(self, n_new: int) -> None: ...

    @contextmanager
    def peek(self) -> Iterator[None]:
        """Inside the block `past` and `past_slots` show what the next token would see, without reading one: a
        token is planned and never committed, and planning takes no side step (an evidence store's pending takes
        wait). engine/batch_answer.py freezes the cache this way."""
        self.peeking = True
        try:
            self.begin(1)
            yield
        finally:
            self.peeking = False
            self.n_new, self._written, self._pieces = 0, None, None

    @abstractmethod
    def past(self, layer: int) -> tuple[Tensor, Tensor]:
        """Pre-RoPE keys and values visible to the current chunk: [B, Hkv, n_past, D], age order."""

    @abstractmethod
    def past_slots(self, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """`past(layer)` without the copy: the layer's key and value buffers [B, Hkv, capacity, D] and `order`
        [n_past] int64 on their device, the physical slot of each visible token in age order, so that
        `past(layer) == (k.index_select(2, order), v.index_select(2, order))`. Valid until `update(layer, ...)`."""

    @abstractmethod
    def update(self, layer: int, k: Tensor, v: Tensor, score: Tensor | None) -> None:
        """Insert the chunk's pre-RoPE k, v [B, Hkv, n_new, D]; `score` covers non-sink past + new columns."""

    def end(self) -> None:
        """Commit the planned control state after every layer has been updated."""
        self._commit()
        self.seen += self.n_new
        self.n_new = 0
        self._touch(self._written)

    def _touch(self, slots: np.ndarray | None) -> None:
        """Slots whose keys just changed (None: any): their slot-rotated copy is stale."""
        if self._slot_keys is not None:
            self._slot_keys.invalidate(slots)

    def slot_keys(self, layer: int, cos: Tensor, sin: Tensor, key: tuple) -> Tensor:
        """The layer's key buffer rotated at each physical slot's index (engine/cache/slot_keys.py); `cos`, `sin`
        cover every slot, `key` names the tables they come from."""
        if self._slot_keys is None:
            self._slot_keys = SlotKeys(self.shape.n_layers)
        return self._slot_keys.keys(layer, self.past_slots(layer)[0], cos, sin, key)

    def pieces(self) -> list[tuple[str, int, int, int]]:
        """The current chunk's visible tokens as runs of consecutive slots and gathered rest, in age order
        (engine/cache/slot_keys.py `pieces`); computed once per chunk, on the host."""
        if self._pieces is None:
            self._pieces = pieces(self.past_slots(0)[2].cpu().numpy())
        return self._pieces

    def _commit(self) -> None:
        pass

    def use_fixed_indices(self, on: bool = True) -> bool:
        """Ask that decode steps keep their index tensors at fixed device addresses (what a captured CUDA graph
        replays, engine/decode_graph.py); returns whether this policy does. None does by default."""
        return False

    @property
    def fixed_step(self) -> bool:
        """Whether the step planned last reads its indices from fixed addresses (see `use_fixed_indices`)."""
        return self.fixed_key is not None

    @property
    def fixed_key(self) -> tuple | None:
        """Where the step planned last reads its indices (address and length of the fixed buffer), None where it
        reads none: a captured graph may replay only while this stays the same."""
        return None

    @abstractmethod
    def token_index(self, layer: int) -> Tensor:
        """Original stream index of every visible token: [B, Hkv, n_past] int64 (for retention reports)."""

    @abstractmethod
    def fill(self) -> list[tuple[int, int]]:
        """(used, capacity) of the sinks and of each sub-cache, for progress displays."""

    @abstractmethod
    def export_state(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able control state, named tensors) of everything but `seen`: what `import_state` needs to rebuild
        this cache in a fresh one of the same settings (engine/snapshot.py writes both to a cache file)."""

    @abstractmethod
    def import_state(self, control: dict, tensors: dict[str, Tensor]) -> None:
        """Restore `export_state()` into this fresh cache, whose `seen` is already set; ValueError naming what does not
        fit (a crafted or damaged file)."""

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (with the slot-rotated keys, once a CPU decode step made them)."""
        extra = [] if self._slot_keys is None else [k for k in self._slot_keys.k if k is not None]
        return sum(t.numel() * t.element_size() for t in self._tensors() + extra)

    @abstractmethod
    def _tensors(self) -> list[Tensor]: ...


def gather_past(k: Tensor, v: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """`(k.index_select(2, order), v.index_select(2, order))` for contiguous [B, H, C, D] buffers, done as one row
    gather each over their [B·H·C, D] views: the same values, and on the CPU about 4× faster than `index_select`
    along dim 2 (bench/cpu_decode_gather.py), which every CPU decode step pays twice per layer."""
    if not (k.is_contiguous() and v.is_contiguous()):
        return k.index_select(2, order), v.index_select(2, order)
    b, h, c, d = k.shape
    rows = (torch.arange(b * h, device=k.device).mul_(c).view(-1, 1) + order.view(1, -1)).view(-1)
    return tuple(buf.view(-1, d).index_select(0, rows).view(b, h, -1, d) for buf in (k, v))


def empty_buffers(shape: CacheShape, capacity: int) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Preallocated per-layer keys, values [B, Hkv, capacity, D] and token indices [B, Hkv, capacity]."""
    kv = (shape.batch, shape.n_kv_heads, capacity, shape.head_dim)
    layers = range(shape.n_layers)
    ks = [torch.zeros(kv, dtype=shape.dtype, device=shape.device_of(i)) for i in layers]
    vs = [torch.zeros(kv, dtype=shape.dtype, device=shape.device_of(i)) for i in layers]
    idx = [torch.full(kv[:3], -1, dtype=torch.long, device=shape.device_of(i)) for i in layers]
    return ks, vs, idx


def copy_named(dst: Tensor, tensors: dict[str, Tensor], name: str) -> None:
    """Copy `tensors[name]` into `dst` (`import_state`); ValueError when it is missing or of another dtype or shape."""
    src = tensors.get(name)
    if src is None or src.dtype != dst.dtype or src.shape != dst.shape:
        got = "missing" if src is None else f"{src.dtype} {tuple(src.shape)}"
        raise ValueError(f"{name}: {got}")
    dst.copy_(src)


def is_int(x) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)
