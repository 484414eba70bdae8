"""The evidence selector on a real forward: with nothing evicted the store changes no logit; spans are whole,
never overlap, stay inside the input and survive any distance; `--evidence 0` is the plain cascade."""
import contextlib

import torch

from engine.cache import CascadeCache, EvidenceCascadeCache, make_cache
from engine.cache.base import CacheShape
from engine.config import CacheConfig
from engine.evidence import EvidenceSelector, default_slots, kept_spans
from engine.retention import QuestionGuide
from engine.runner import Runner
from engine.reading import ingest
from tests.engine.tiny import tiny_model

PREFIX = 12
QUESTION = (4, 10)  # the question's tokens inside the pinned prefix


def _run(model, ids, config, weights=None):
    """Prefix pinned, question guiding; the logits of every input position and the runner's cache."""
    outs = []
    with Runner(model, config, n_sinks=PREFIX) as runner:
        guide = QuestionGuide(runner, QUESTION, 1.0)
        selector = EvidenceSelector(runner, guide, weights or {0: 1.0, 1: 1.0}, PREFIX) if config.evidence else None
        with guide, selector or contextlib.nullcontext():
            pos = 0
            for n in [PREFIX] + [config.stride] * ((ids.shape[1] - PREFIX) // config.stride + 1):
                chunk = ids[:, pos : pos + n]
                if chunk.shape[1] == 0:
                    break
                outs.append(runner.logits(runner.step(chunk)))
                pos += n
        return torch.cat(outs, dim=1), runner.cache


def test_no_eviction_with_the_store_equals_the_forward():
    """Spans are chosen but nothing is evicted, so none is taken: the logits are the model's own."""
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits
    for stride in (1, 7, 24):
        config = CacheConfig(cache_size=128, cascades=4, sinks=4, stride=stride, evidence=32)
        got, cache = _run(model, ids, config)
        assert isinstance(cache, EvidenceCascadeCache) and cache.n_evidence == 0 and cache.wanted
        assert (got - expected).abs().max().item() <= 1e-4, stride


def test_spans_are_whole_disjoint_and_inside_the_input():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 1200), generator=torch.Generator().manual_seed(4))
    config = CacheConfig(cache_size=128, cascades=4, sinks=4, stride=16, evidence=32)  # one span of 32
    _, cache = _run(model, ids, config)
    spans = kept_spans(cache)
    assert spans and cache.n_evidence > 0
    taken = sorted(int(t) for t in cache.held() if t >= 0)
    assert len(taken) == len(set(taken))
    for s in spans:
        assert PREFIX <= s.start < s.end <= ids.shape[1]
        assert list(s.ids) == ids[0, s.start : s.end].tolist()
    ranges = sorted((s.start, s.end) for s in spans)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    index = cache.token_index(0)[0]
    for h in range(index.shape[0]):  # every head sees the kept tokens once, right after the sinks
        row = index[h].tolist()
        assert len(set(row)) == len(row)
        assert row[PREFIX : PREFIX + len(taken)] == taken


def test_evidence_zero_is_the_plain_cascade():
    config = CacheConfig(cache_size=128, cascades=4, stride=16)
    assert config.with_evidence(0) == config
    shape = CacheShape(2, 1, 2, 16, torch.float32, torch.device("cpu"))
    assert type(make_cache(config.with_evidence(0), shape, 4)) is CascadeCache
    assert type(make_cache(config.with_evidence(32), shape, 4)) is EvidenceCascadeCache


def test_budget_and_stride():
    assert default_slots(4096, 4) == 512 and default_slots(512, 4) == 64 and default_slots(192, 2) == 0
    config = CacheConfig(cache_size=4096, cascades=4, stride=1024).with_evidence(512)
    assert config.stride == 896 and config.max_position(64) == CacheConfig().max_position(64) - 128
