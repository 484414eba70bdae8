"""The evidence store beside the cascade (engine/cache/evidence.py): the chunked update with spans taken between
chunks equals the per-token rule (tests/engine/cascade_oracle.py), no token is ever visible twice, the data moves
with the bookkeeping, and a store that is never used changes nothing."""
import random

import pytest
import torch

from engine.cache.base import CacheShape
from engine.cache.cascade import CascadeCache
from engine.cache.evidence import EvidenceCascadeCache
from tests.engine.cascade_oracle import PerTokenEvidenceCascade

HEADS, DIM = 3, 4


def _shape(n_layers: int = 2) -> CacheShape:
    return CacheShape(n_layers, 1, HEADS, DIM, torch.float32, torch.device("cpu"))


def _step(cache, tokens: list[int], scores: torch.Tensor) -> None:
    n = len(tokens)
    cache.begin(n)
    ids = torch.tensor(tokens, dtype=torch.float32)
    k = ids.view(1, 1, n, 1).expand(1, HEADS, n, DIM).clone()
    for layer in range(cache.shape.n_layers):
        n_cached = cache.n_past - cache.n_unscored
        score = torch.cat([torch.zeros(1, HEADS, n_cached), scores], dim=2)
        cache.update(layer, k, -k, score)
    cache.end()


def _check(seed: int) -> None:
    rng = random.Random(seed)
    n_sinks, width, cascades = rng.choice([0, 1, 2, 4]), rng.randint(1, 6), rng.randint(1, 4)
    evidence = rng.randint(1, 8)
    total = rng.randint(1, 200)
    scores = torch.tensor([[rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(total)] for _ in range(HEADS)])
    cache = EvidenceCascadeCache(_shape(), n_sinks, width * cascades, cascades, 0.5, evidence)
    cache.beta = 1.0
    oracles = [PerTokenEvidenceCascade(n_sinks, width, cascades) for _ in range(HEADS)]
    pos, next_slot = 0, 0
    while pos < total:
        n = min(total - pos, rng.choice([1, 2, 3, rng.randint(1, width)]))
        # between chunks: ask for a few recent tokens (some not locatable any more, some not read yet)
        if pos and rng.random() < 0.5 and next_slot < evidence:
            for t in sorted(rng.sample(range(max(0, pos - 3 * width), pos + 2), k=min(2, evidence - next_slot))):
                cache.take(next_slot, t)
                next_slot += 1
        # the oracle takes what the cache would at this chunk's start: only when the chunk evicts
        if pos + n - 1 > width * cascades + n_sinks:
            for slot, t in sorted(cache.wanted.items()):
                if t < pos:
                    for o in oracles:
                        o.take(t)
        _step(cache, list(range(pos, pos + n)), scores[:, pos : pos + n].unsqueeze(0))
        for h, o in enumerate(oracles):
            for t in range(pos, pos + n):
                o.push(t, float(scores[h, t]))
        pos += n
        index = cache.token_index(0)[0]
        for h, o in enumerate(oracles):
            got = index[h].tolist()
            assert got == o.visible(), (seed, h, pos)
            assert len(set(got)) == len(got), (seed, h, "a token visible twice")
        assert cache.n_past == index.shape[1]
    cache.begin(0)  # (this may take what is still wanted)
    index = cache.token_index(0)[0]
    for layer in range(cache.shape.n_layers):
        assert torch.equal(cache.token_index(layer)[0], index), seed
        keys, values = cache.past(layer)
        assert torch.equal(keys[0, :, :, 0].long(), index), seed
        assert torch.equal(values[0, :, :, 0].long(), -index), seed
    cache.end()


@pytest.mark.parametrize("block", range(5))
def test_chunked_update_with_evidence_equals_per_token_rule(block):
    for seed in range(block * 100, block * 100 + 100):
        _check(seed)


def test_an_unused_store_is_the_cascade():
    """No span asked for: the same tokens, keys and scores as a plain cascade of the remaining slots."""
    rng = random.Random(1)
    total, width, cascades, n_sinks = 150, 4, 3, 2
    scores = torch.rand(1, HEADS, total, generator=torch.Generator().manual_seed(0))
    plain = CascadeCache(_shape(), n_sinks, width * cascades, cascades, 0.9)
    store = EvidenceCascadeCache(_shape(), n_sinks, width * cascades, cascades, 0.9, 8)
    pos = 0
    while pos < total:
        n = min(total - pos, rng.randint(1, width))
        for cache in (plain, store):
            _step(cache, list(range(pos, pos + n)), scores[:, :, pos : pos + n])
        pos += n
    assert torch.equal(plain.token_index(1), store.token_index(1))
    assert torch.equal(plain.cached_scores(1), store.cached_scores(1))


def test_taken_span_is_whole_and_survives_any_distance():
    """A span taken from sub-cache 0 stays whole however much follows; the cascade alone thins it."""
    width, cascades, n_sinks = 4, 3, 2
    store = EvidenceCascadeCache(_shape(1), n_sinks, width * cascades, cascades, 0.9, 5)
    zeros = lambda n: torch.zeros(1, HEADS, n)  # noqa: E731
    pos = 0
    while pos < 40:
        _step(store, list(range(pos, pos + 4)), zeros(4))
        pos += 4
    for slot, t in enumerate(range(pos - 4, pos + 1)):  # the last chunk and the next token
        store.take(slot, t)
    for _ in range(100):
        _step(store, list(range(pos, pos + 4)), zeros(4))
        pos += 4
    index = store.token_index(0)[0]
    for h in range(HEADS):
        row = index[h].tolist()
        assert row[n_sinks : n_sinks + 5] == list(range(36, 41))
        assert len(set(row)) == len(row)
    assert store.n_evidence == 5
