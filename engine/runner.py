"""One model, one cache, our attention patched in: runs token chunks through the model.

`Runner.step(ids)` is the single entry point for prefill chunks and decode steps alike (a decode step is a
chunk of one token), so scores, positions and cache updates follow one code path. `Runner.decode(token)` is a
decode step with its logits; on a GPU it replays the same step captured as a CUDA graph (engine/decode_graph.py).

A model spread over several devices (loaded with a device_map) works the same way: every layer's cache lives
on that layer's device, and the rotary tables and EMA weights are kept on each device, so a step adds no
transfers but the activations' own hops between devices and one small index copy per device.
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from cascade_kernels.chunk_attention import ema_weights
from cascade_kernels.dispatch import reference_only

from .attention import StepContext, patched_attention
from .cache import CacheShape, KVCache, make_cache
from .config import CacheConfig
from .decode_graph import DecodeGraph
from .errors import CapacityError
from .families import kv_geometry, output_logits, rotary_tables


def layer_devices(model: nn.Module) -> list[torch.device]:
    """The device of every decoder layer's attention weights, in layer order."""
    return [layer.self_attn.o_proj.weight.device for layer in model.model.layers]  # phi3 has no q_proj


def cache_shape(model: nn.Module, batch: int = 1, devices: list[torch.device] | None = None) -> CacheShape:
    """The cache geometry of `model`; per-layer devices only when its layers do not all sit with its embedding.

    `devices` overrides the detected per-layer devices (tests use it to exercise the multi-device path on CPU)."""
    cfg = model.config
    p = next(model.parameters())
    n_kv_heads, head_dim = kv_geometry(model)  # read from the attention modules, the same for every family
    devices = layer_devices(model) if devices is None else [torch.device(d) for d in devices]
    spread = tuple(devices) if any(d != p.device for d in devices) else None
    return CacheShape(cfg.num_hidden_layers, batch, n_kv_heads, head_dim, p.dtype, p.device, spread)


class Runner:
    def __init__(self, model: nn.Module, config: CacheConfig, n_sinks: int | None = None, expected_tokens: int = 0,
                 batch: int = 1, devices: list[torch.device] | None = None):
        cfg = model.config
        self.model, self.config = model, config
        self.n_sinks = config.sinks if n_sinks is None else max(n_sinks, 0)
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 1 << 30))
        shape = cache_shape(model, batch, devices)
        self.cache: KVCache = make_cache(config, shape, self.n_sinks, expected_tokens)
        self.score_hook = None  # set by question-guided retention
        self.query_hook = None  # idem, while the question is read
        self.key_hook = None  # set by the evidence store (engine/evidence.py): scores each chunk's keys
        self.after_step = None  # idem: called with the step's ids [B, L] after its cache commit
        # CPU decode steps read the cache in place (engine/slot_decode.py); False: the plain gather path (bench/tests)
        self.in_place_decode = True
        # GPU decode steps replay a captured CUDA graph (engine/decode_graph.py); False: every step eager (bench/tests)
        self.graph_decode = True
        self._graph: DecodeGraph | None = None
        self._stack = ExitStack()
        self._slot = self._stack.enter_context(patched_attention(model))
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}  # device -> cos, sin [size, D]

    def close(self) -> None:
        """Restore the model's own attention (and free a captured decode graph)."""
        self._graph = None
        self._stack.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rotary(self, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [n, D] for positions 0 .. n-1 from the model's own rotary module (any RoPE scaling).

        On `device` (default: the embedding's); tables are built once and copied once to each device."""
        home = self.cache.shape.device
        device = home if device is None else device
        cached = self._tables.get(home)
        if cached is None or cached[0].shape[0] < n:  # grown by doubling: a dense cache asks for one more each step
            # never past the model's positions by itself: rotary modules that rescale by length (dynamic NTK,
            # longrope) would change every angle
            grown = min(2 * cached[0].shape[0], self.max_positions) if cached is not None else 0
            size = max(n, self.n_sinks + self.config.cache_size + self.config.stride, grown)
            p = next(self.model.parameters())
            cos, sin = rotary_tables(self.model, torch.arange(size, device=p.device), p.new_zeros(1))
            self._tables = {home: (cos.to(home), sin.to(home))}
        if device not in self._tables:
            cos, sin = self._tables[home]
            self._tables[device] = (cos.to(device), sin.to(device))
        cos, sin = self._tables[device]
        return cos[:n], sin[:n]

    @property
    def rotary_key(self) -> int | None:
        """The address of the rotary tables (they move when they grow): a captured decode graph reads them."""
        tables = self._tables.get(self.cache.shape.device)
        return None if tables is None else tables[0].data_ptr()

    @torch.inference_mode()
    def step(self, ids: Tensor) -> Tensor:
        """Feed ids [B, L] (L <= stride); returns the final hidden states [B, L, hidden]."""
        self.plan(ids.shape[1])
        hidden = self.forward(ids)
        self.commit(ids)
        return hidden

    @torch.inference_mode()
    def decode(self, token: int) -> Tensor:
        """Feed one token (batch 1); returns the next-token logits [V] float32, valid until the next step.

        On a GPU the step replays a captured CUDA graph once the cache's shape holds still (engine/decode_graph.py);
        elsewhere, and while the graph cannot serve, it is `step` and `logits` as for any chunk."""
        if self.graph_decode:
            if self._graph is None:
                self._graph = DecodeGraph(self)
            if self._graph.serves():
                return self._graph.decode(token)
            self._graph.counts.eager += 1
        hidden = self.step(torch.tensor([[token]], device=self.cache.shape.device))
        return self.logits(hidden[:, -1])[0]

    def decode_report(self) -> dict | None:
        """How `decode` steps ran on a CUDA device: counts of eager, captured and replayed steps and why the graph was
        off for the last one (None where it served); None off CUDA or before any decode step."""
        if self._graph is None or self.cache.shape.device.type != "cuda":
            return None
        return self._graph.report()

    # `step` in its three parts, for engine/decode_graph.py, which captures `forward` alone

    def plan(self, n_new: int) -> None:
        """Check the positions and plan the next `n_new` tokens' cache update on the host (cache.begin)."""
        past = self.cache.n_past
        if past + n_new > self.max_positions:
            raise CapacityError(
                f"position {past + n_new - 1} is past the model's limit of {self.max_positions}; "
                f"lower `cache_size` or `stride`, or use `policy=cascade` or `policy=sink`"
            )
        self.cache.begin(n_new)

    def forward(self, ids: Tensor) -> Tensor:
        """The planned chunk through every layer (attention, cache update): final hidden states [B, L, hidden]."""
        n_new = ids.shape[1]
        past = self.cache.n_past
        cos, sin = self.rotary(past + n_new)
        scored = self.config.score_queries  # None: every query of the chunk (exact); R: its last R
        ema = ema_weights(n_new, self.config.beta, ids.device, scored) if self.cache.needs_scores else None
        ctx = StepContext(self.cache, cos, sin, ema, self.config.head_reduce, self.score_hook, self.query_hook,
                          key_hook=self.key_hook, per_device=self._other_devices(past + n_new, n_new),
                          slot_tables=self._slot_tables(past, n_new))
        return self.run_layers(ids, ctx)

    def run_layers(self, ids: Tensor, ctx) -> Tensor:
        """The model's layers over ids [B, L] with `ctx` as every layer's attention context: a `StepContext`
        (the cache's step, above), or an object whose `attend(layer, fam, q, k, v)` computes the attention itself
        (engine/batch_answer.py); final hidden states [B, L, hidden]."""
        self._slot.ctx = ctx
        try:
            # Our attention takes positions and masking from the cache (ctx cos/sin, causal chunk), so the model is
            # handed a ready-made 4D mask that transformers passes through untouched: otherwise its mask builder
            # looks for packed sequences in the position ids with a host-synchronising `.all()` on every step.
            return self.model.model(input_ids=ids, attention_mask=self._no_mask(ids.device),
                                    use_cache=False).last_hidden_state
        finally:
            self._slot.ctx = None

    def commit(self, ids: Tensor) -> None:
        """Commit the planned cache update (cache.end) and tell `after_step` (ids: the chunk's [B, L])."""
        self.cache.end()
        if self.after_step is not None:
            self.after_step(ids)

    def _slot_tables(self, past: int, n_new: int) -> tuple[Tensor, Tensor] | None:
        """For a decode step on the CPU, tables for the in-place path (engine/slot_decode.py): the query is rotated
        up to past + capacity there, within the model's positions (runs beyond them are gathered). None elsewhere,
        and under CASCADECTL_KERNELS=ref."""
        shape = self.cache.shape
        if (n_new != 1 or not self.in_place_decode or shape.device.type != "cpu" or shape.layer_devices is not None
                or reference_only()):
            return None
        return self.rotary(min(past + 1 + self.cache.past_slots(0)[0].shape[2], max(self.max_positions, past + 1)))

    def _no_mask(self, device: torch.device) -> Tensor:
        """A [1, 1, 1, 1] placeholder mask (never read by our attention), one per device."""
        masks = self.__dict__.setdefault("_masks", {})
        if device not in masks:
            masks[device] = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        return masks[device]

    def _other_devices(self, n: int, n_new: int) -> dict | None:
        """(cos, sin, ema) on every device other than the embedding's that holds layers; None on one device."""
        shape = self.cache.shape
        if shape.layer_devices is None:
            return None
        needs_ema, scored = self.cache.needs_scores, self.config.score_queries
        return {d: (*self.rotary(n, d), ema_weights(n_new, self.config.beta, d, scored) if needs_ema else None)
                for d in shape.devices[1:]}

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """LM head in float32 for hidden [B, T, hidden] -> [B, T, V], on the device of the input ids."""
        # what the model's LM wrapper adds after the head: gemma's final capping, granite's scaling
        logits = output_logits(self.model.config, self.model.lm_head(hidden).float())
        return logits if self.cache.shape.layer_devices is None else logits.to(self.cache.shape.device)

    def replace_cache(self, cache: KVCache) -> KVCache:
        """Put `cache` in place of the runner's own (a snapshot's, or a copy to answer from) between chunks, and
        return the one it replaces; the one way a cache changes hands, so nobody assigns `runner.cache`."""
        previous, self.cache = self.cache, cache
        return previous
