"""The CPU decode step that reads the cache in place (engine/slot_decode.py, engine/cache/slot_keys.py).

Oracles: the slot-rotated key copy equals rotating the whole key buffer afresh, after any sequence of chunks of
every policy (evidence takes included); the pieces rebuild the age order; a model decoding through the in-place
path gives the logits and the cache contents of the plain path (gather, rotate every key at its rank), with and
without eviction, for every family."""
import functools
import random

import numpy as np
import pytest
import torch

import engine.attention as attention
import engine.cache.base as base
from cascade_kernels.dispatch import use_reference
from cascade_kernels.rope import apply_rope
from engine.cache import make_cache
from engine.cache.base import CacheShape
from engine.cache.slot_keys import pieces
from engine.config import CacheConfig
from engine.runner import Runner
from tests.engine.tiny import VARIANTS, tiny_model

HEADS, DIM = 2, 8


def _tables(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(n, dtype=torch.float64)[:, None] * torch.linspace(0.01, 1.0, DIM // 2, dtype=torch.float64)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().float(), angle.sin().float()


@pytest.mark.parametrize("seed", range(6))
def test_pieces_rebuild_the_order(seed):
    rng = np.random.default_rng(seed)
    runs = [np.arange(a, a + n) for a, n in zip(rng.integers(0, 10_000, 12), rng.integers(1, 80, 12))]
    order = np.concatenate(runs)
    rebuilt = []
    for kind, slot, rank, n in pieces(order, min_run=16):
        assert rank == len(rebuilt)
        if kind == "run":
            assert n >= 16
            rebuilt.extend(range(slot, slot + n))
        else:
            rebuilt.extend(order[rank : rank + n].tolist())
    assert rebuilt == order.tolist()
    assert pieces(np.zeros(0, dtype=np.int64)) == []


def _config(policy: str, rng: random.Random) -> CacheConfig:
    cascades = rng.choice([1, 2, 4])
    width = rng.randint(2, 12)
    evidence = rng.choice([0, 3]) if policy == "cascade" else 0
    return CacheConfig(policy=policy, cache_size=width * cascades + evidence, cascades=cascades,
                       sinks=rng.choice([0, 1, 4]), stride=width, evidence=evidence)


@pytest.mark.parametrize("policy", ["full", "sink", "cascade"])
@pytest.mark.parametrize("seed", range(8))
def test_slot_keys_equal_a_fresh_rotation(policy, seed):
    """Whatever the chunks wrote (and the evidence store moved), the copy read at a chunk's start is the buffer
    rotated at its slots, bit for bit; read at random steps, so stale slots pile up between reads."""
    rng = random.Random(seed)
    config = _config(policy, rng)
    shape = CacheShape(2, 1, HEADS, DIM, torch.float32, torch.device("cpu"))
    cache = make_cache(config, shape, config.sinks, expected_tokens=8)
    cos, sin = _tables(4096)
    gen = torch.Generator().manual_seed(seed)
    for step in range(60):
        n = rng.choice([1, 1, 1, 2, rng.randint(1, config.stride)])
        if config.evidence and step % 5 == 4:  # ask for a recent token: moved when a chunk evicts
            cache.take(rng.randrange(config.evidence), max(cache.seen - rng.randint(1, 3), 0))
        cache.begin(n)
        if rng.random() < 0.6:
            for layer in range(2):
                k_buf = cache.past_slots(layer)[0]
                got = cache.slot_keys(layer, cos, sin, ("t",))
                cap = k_buf.shape[2]
                assert torch.equal(got, apply_rope(k_buf, cos[:cap], sin[:cap])), (step, layer)
        for layer in range(2):
            k = torch.randn(1, HEADS, n, DIM, generator=gen)
            n_scored = cache.n_past - cache.n_unscored + n
            score = torch.rand(1, HEADS, n_scored, generator=gen) if cache.needs_scores else None
            cache.update(layer, k, -k, score)
        cache.end()


FAMILIES = sorted(VARIANTS)


def _decode(model, config: CacheConfig, ids: torch.Tensor, prefill: int, reference: bool):
    """Logits of every decode step after a prefill in chunks of `config.stride`, and the cache's final contents."""
    outs = []
    with use_reference(reference), Runner(model, config) as runner:
        for i in range(0, prefill, config.stride):
            runner.step(ids[:, i : min(i + config.stride, prefill)])
        for i in range(prefill, ids.shape[1]):
            outs.append(runner.logits(runner.step(ids[:, i : i + 1])))
        index = [runner.cache.token_index(layer) for layer in range(model.config.num_hidden_layers)]
    return torch.cat(outs, dim=1), index


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["full", "sink", "cascade", "evidence"])
@pytest.mark.parametrize("min_run", [2, 32])
def test_in_place_decode_equals_the_plain_path(family, policy, min_run, monkeypatch):
    """With eviction (cache 36 after 40 prefilled tokens, 120 decode steps): the same logits within fp32 rounding
    and the same tokens kept, as the plain path that gathers and re-rotates every key. Runs of 2 or more slots
    are read in place (min_run 2), or nearly everything is gathered (32, more than a ring here)."""
    monkeypatch.setattr(base, "pieces", functools.partial(pieces, min_run=min_run))
    calls = []
    real = attention.decode_in_place
    monkeypatch.setattr(attention, "decode_in_place", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 160), generator=torch.Generator().manual_seed(3))
    config = CacheConfig(policy="cascade" if policy == "evidence" else policy, cache_size=36, cascades=4, sinks=4,
                         stride=8, evidence=4 if policy == "evidence" else 0)
    got, got_index = _decode(model, config, ids, 40, False)
    assert calls or family in ("gemma2", "mistral-window", "gemma3_text", "smollm3")  # capped or windowed layers
    n_calls = len(calls)
    want, want_index = _decode(model, config, ids, 40, True)
    assert len(calls) == n_calls  # the reference took the plain path
    assert (got - want).abs().max().item() <= 1e-4
    for a, b in zip(got_index, want_index):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, sliced", [(4160, False), (1024, False), (1000, False), (4160, True), (2050, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_values_product_cut_along_the_slots_equals_one_product(n, sliced, dtype):
    """P·V cut into PV_SPLIT pieces along the slots (long, contiguous buffers) or taken whole (short, a slice of a
    longer buffer, a length the pieces do not divide) is p @ v within the rounding of another sum order."""
    from engine.slot_decode import values_product
    gen = torch.Generator().manual_seed(n)
    p = torch.rand(2, 3, 3, n, generator=gen).softmax(-1).to(dtype)
    buf = torch.randn(2, 3, n + (64 if sliced else 0), 64, generator=gen).to(dtype)
    v = buf[:, :, :n]
    want = (p.double() @ v.double()).to(torch.float32)
    got = values_product(p, v)
    assert got.shape == (2, 3, 3, 64) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).abs().max() <= tol
