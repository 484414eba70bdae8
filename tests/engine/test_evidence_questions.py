"""Several questions over one ingest (engine/evidence.py: probe, Selectors, restrict): the probed queries are
those a pinned read captures, each question's spans stay in its share, no token is held twice, and a copy
restricted to one question sees only that question's evidence."""
import copy

import torch

from engine.cache import EvidenceCascadeCache
from engine.config import CacheConfig
from engine.evidence import EvidenceSelector, Probed, Selectors, kept_spans, probe, restrict, split_slots
from engine.prompt import Prompt
from engine.retention import QuestionGuide
from engine.runner import Runner
from engine.reading import ingest
from tests.engine.tiny import tiny_model

PREFIX = 12
WEIGHTS = {0: 1.0, 1: 1.0}


def _prompt(ids: list[int], question: tuple[int, int]) -> Prompt:
    return Prompt(prefix_ids=ids, suffix_ids=[1, 2], question_span=question)


def test_probe_equals_what_a_pinned_read_captures():
    model = tiny_model(seed=2)
    prefix = torch.randint(0, 256, (PREFIX,), generator=torch.Generator().manual_seed(1)).tolist()
    body = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    config = CacheConfig(cache_size=128, cascades=4, sinks=4, stride=16, evidence=32)
    with Runner(model, config, n_sinks=PREFIX) as runner:
        guide = QuestionGuide(runner, (4, 10), 0.0)
        selector = EvidenceSelector(runner, guide, WEIGHTS, PREFIX)
        with guide, selector:
            ingest(runner, prefix, [body])
    probed = probe(model, _prompt(prefix, (4, 10)))
    for layer in range(len(model.model.layers)):
        assert torch.equal(probed.queries[layer], guide.queries[layer])
        assert torch.equal(probed.control[layer], selector.control[layer])


def _several(model, body, n_questions, evidence):
    """A question-agnostic ingest with one selector per question; (cache, selectors)."""
    prefix = list(range(PREFIX))
    config = CacheConfig(cache_size=128 + evidence, cascades=4, sinks=4, stride=16, evidence=evidence)
    probes = [probe(model, _prompt(list(range(40 + k, 40 + k + PREFIX)), (3, 9))) for k in range(n_questions)]
    runner = Runner(model, config, n_sinks=PREFIX)
    selectors = [EvidenceSelector(runner, p, WEIGHTS, PREFIX, part=(k, n_questions)) for k, p in enumerate(probes)]
    with runner, Selectors(selectors):
        ingest(runner, prefix, [body])
    return runner.cache, selectors


def test_each_question_fills_its_own_share_and_no_token_is_held_twice():
    model = tiny_model(seed=3)
    body = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    cache, selectors = _several(model, body, 3, split_slots(96, 3))
    assert isinstance(cache, EvidenceCascadeCache) and cache.evidence == 96
    held = [int(t) for t in cache.held() if t >= 0]
    assert held and len(held) == len(set(held))
    index = cache.token_index(0)[0]
    for h in range(index.shape[0]):  # every head sees every token at most once
        row = index[h].tolist()
        assert len(set(row)) == len(row)
    ids = list(range(PREFIX)) + body
    for k, selector in enumerate(selectors):
        share = range(k * 32, (k + 1) * 32)
        spans = kept_spans(cache, k)
        assert spans, k
        for s in spans:
            assert PREFIX <= s.start < s.end <= len(ids) and list(s.ids) == ids[s.start : s.end]
        for slot, t in enumerate(cache.held().tolist()):  # a held token of share k lies in one of k's spans
            if slot in share and t >= 0:
                assert any(s.start <= t < s.end for s in spans)


def test_restrict_leaves_only_that_questions_evidence():
    model = tiny_model(seed=3)
    body = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    cache, _ = _several(model, body, 2, split_slots(64, 2))
    for k in range(2):
        mine = copy.deepcopy(cache)
        restrict(mine, k)
        spans = kept_spans(cache, k)
        for t in mine.held().tolist():
            assert t < 0 or any(s.start <= t < s.end for s in spans)
        own = [t for slot, t in enumerate(cache.held().tolist()) if k * 32 <= slot < (k + 1) * 32 and t >= 0]
        assert set(own) <= set(mine.held().tolist())
        assert mine.n_past == cache.n_past - (cache.n_evidence - mine.n_evidence)
    assert kept_spans(cache, 0) and kept_spans(cache, 1)


def test_split_slots():
    assert split_slots(512, 1) == 512 and split_slots(512, 3) == 480 and split_slots(64, 5) == 160
    assert isinstance(Probed((), ()), Probed)


def test_a_frozen_document_hides_what_restrict_releases():
    """engine/batch_answer.py: question k of a batch sees exactly the tokens a copy restricted to k keeps, and
    freezing the cache changes nothing in it (pending takes wait)."""
    from engine.batch_answer import SharedDocument
    from engine.evidence import others_evidence

    model = tiny_model(seed=3)
    body = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    cache, _ = _several(model, body, 2, split_slots(64, 2))
    before = (cache.n_past, cache.held().tolist(), dict(cache.wanted), cache.token_index(0).clone())
    with Runner(model, CacheConfig(cache_size=128 + 64, cascades=4, sinks=4, stride=16, evidence=64),
                n_sinks=PREFIX) as runner:
        runner.replace_cache(cache)
        doc = SharedDocument(runner, hidden=[others_evidence(cache, k) for k in range(2)])
    assert (cache.n_past, cache.held().tolist(), dict(cache.wanted)) == before[:3]
    assert torch.equal(cache.token_index(0), before[3])
    tokens = cache.token_index(0)[0, 0][doc.pos[0]]  # the frozen keys: every question's first, then the rest
    assert doc.n == tokens.numel() and doc.visible[0].shape == (2, doc.n)
    assert doc.visible[0][:, : doc.n_common[0]].all() and not doc.visible[0][:, doc.n_common[0] :].all(dim=0).any()
    for k in range(2):
        mine = copy.deepcopy(cache)
        restrict(mine, k)
        assert sorted(tokens[doc.visible[0][k]].tolist()) == sorted(mine.token_index(0)[0, 0].tolist())
    assert not doc.visible[0].all()


def test_batched_questions_each_answer_as_alone_with_their_own_evidence():
    """Question k's row of a batch over the frozen store gets the logits of question k answered alone from a frozen
    document that hides the same tokens."""
    from engine.batch_answer import AnswerBatch, SharedDocument
    from engine.evidence import others_evidence

    model = tiny_model(seed=3)
    body = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    cache, _ = _several(model, body, 2, split_slots(64, 2))
    requests = [[7, 8, 9], [10, 11, 12, 13, 14]]
    with Runner(model, CacheConfig(cache_size=128 + 64, cascades=4, sinks=4, stride=16, evidence=64),
                n_sinks=PREFIX) as runner:
        runner.replace_cache(cache)
        hidden = [others_evidence(cache, k) for k in range(2)]
        batch = AnswerBatch(runner, SharedDocument(runner, hidden), 2, room=12)
        together = [[batch.prefill(k, ids)] for k, ids in enumerate(requests)]
        for _ in range(4):
            logits = batch.decode([int(t[-1].argmax()) for t in together], [True, True])
            for k in range(2):
                together[k].append(logits[k])
        for k, ids in enumerate(requests):
            one = AnswerBatch(runner, SharedDocument(runner, [hidden[k]]), 1, room=12)
            alone = [one.prefill(0, ids)]
            for _ in range(4):
                alone.append(one.decode([int(alone[-1].argmax())], [True])[0])
            torch.testing.assert_close(torch.stack(together[k]), torch.stack(alone), atol=1e-5, rtol=1e-5)
