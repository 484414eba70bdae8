"""Answering from the frozen document (engine/batch_answer.py) against the model's own forward, and a batch of
questions against each question answered alone."""
from __future__ import annotations

import pytest
import torch

from engine.batch_answer import AnswerBatch, SharedDocument, answer_together, frozen_bytes
from engine.config import CacheConfig
from engine.errors import CapacityError
from engine.generate import GREEDY, Sampling
from engine.runner import Runner
from tests.engine.tiny import VARIANTS, WINDOW, tiny_model

FAMILIES = list(VARIANTS)


def _read(model, doc_ids, config):
    runner = Runner(model, config)
    for i in range(0, len(doc_ids), config.stride):
        runner.step(torch.tensor([doc_ids[i : i + config.stride]], device=model.device))
    return runner


class _Ids:
    """A tokenizer stand-in: ids as text "<id> "."""

    def decode(self, ids, **_):
        return "".join(f"{i} " for i in ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["full", "sink", "cascade"])
def test_nothing_evicted_equals_the_model_forward(family, policy):
    """Every logit of the request and of every answer step equals the transformers forward over
    [input | request | answer so far], for rows of different request lengths decoded together."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(3)
    doc = torch.randint(0, 256, (90,), generator=g).tolist()
    requests = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 1, 12)]
    config = CacheConfig(policy=policy, cache_size=128, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        batch = AnswerBatch(runner, SharedDocument(runner), 3, room=12 + 6)
        logits = torch.stack([batch.prefill(r, ids) for r, ids in enumerate(requests)])
        seqs = [doc + ids for ids in requests]
        seen = []  # (sequence so far, our next-token logits)
        for step in range(6):
            seen += [(seqs[r], logits[r]) for r in range(3)]
            tokens = [int(row.argmax()) for row in logits]
            seqs = [s + [t] for s, t in zip(seqs, tokens)]
            logits = batch.decode(tokens, [True] * 3)
    with torch.no_grad():  # the runner is closed: the model's own attention again
        for seq, got in seen:
            want = model(torch.tensor([seq])).logits[0, -1]
            assert (got - want).abs().max().item() <= 1e-4, (family, len(seq))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["full", "cascade"])
def test_one_row_in_the_documents_room_equals_the_model_forward(family, policy):
    """One question whose tail continues the frozen copy's buffers (`room`: on the CPU, one flash call a step over
    [document | tail]) gets the transformers forward's logits for its request and every answer step."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(8)
    doc = torch.randint(0, 256, (90,), generator=g).tolist()
    request = torch.randint(0, 256, (6,), generator=g).tolist()
    config = CacheConfig(policy=policy, cache_size=128, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        frozen = SharedDocument(runner, room=6 + 8)
        batch = AnswerBatch(runner, frozen, 1, room=6 + 8)
        assert batch.nbytes() == 0  # the tail lies in the document's room
        seq, logits, seen = doc + request, batch.prefill(0, request), []
        for _ in range(8):
            seen.append((seq, logits))
            token = int(logits.argmax())
            seq = seq + [token]
            logits = batch.decode([token], [True])[0]
    with torch.no_grad():
        for seq, got in seen:
            want = model(torch.tensor([seq])).logits[0, -1]
            assert (got - want).abs().max().item() <= 1e-4, (family, len(seq))


@pytest.mark.parametrize("family", ["mistral-window", "gemma3_text"])
def test_a_room_tail_that_grows_past_the_window_equals_the_model_forward(family):
    """A document shorter than the sliding window, and an answer that takes the tail past it: the steps inside
    the window may read [document | tail] at once, the later ones must hide the keys it leaves behind."""
    model = tiny_model(family)
    doc = list(range(3, 3 + WINDOW - 8))
    config = CacheConfig(policy="full", cache_size=128, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        batch = AnswerBatch(runner, SharedDocument(runner, room=3 + 16), 1, room=3 + 16)
        seq, logits, seen = doc + [7, 8, 9], batch.prefill(0, [7, 8, 9]), []
        for _ in range(16):
            seen.append((seq, logits))
            token = int(logits.argmax())
            seq = seq + [token]
            logits = batch.decode([token], [True])[0]
    assert len(seq) > WINDOW + 4
    with torch.no_grad():
        for seq, got in seen:
            want = model(torch.tensor([seq])).logits[0, -1]
            assert (got - want).abs().max().item() <= 1e-4, (family, len(seq))


def test_the_room_is_one_batchs_and_matches_separate_tails_after_eviction():
    """After eviction a row in the room gets the logits of a row with its own tail; a second one-row batch on the
    same copy, alive at once, takes tails of its own instead of sharing the room, and both stay right."""
    model = tiny_model()
    g = torch.Generator().manual_seed(9)
    doc = torch.randint(0, 256, (700,), generator=g).tolist()
    request = torch.randint(0, 256, (5,), generator=g).tolist()
    config = CacheConfig(policy="cascade", cache_size=64, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        own = AnswerBatch(runner, SharedDocument(runner), 1, room=20)
        frozen = SharedDocument(runner, room=20)
        first, second = AnswerBatch(runner, frozen, 1, room=20), AnswerBatch(runner, frozen, 1, room=20)
        assert first.nbytes() == 0 < second.nbytes()
        outs = [[b.prefill(0, request)] for b in (own, first, second)]
        for _ in range(10):
            token = int(outs[0][-1].argmax())
            for b, out in zip((own, first, second), outs):
                out.append(b.decode([token], [True])[0].clone())
    for out in outs[1:]:
        torch.testing.assert_close(torch.stack(out), torch.stack(outs[0]), atol=1e-5, rtol=1e-5)


def test_a_batch_equals_each_question_alone_after_eviction():
    """With a cascade that has evicted, each row of a batch gets the logits it gets alone; finished rows do not
    disturb the others."""
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    doc = torch.randint(0, 256, (700,), generator=g).tolist()
    requests = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 3, 6)]
    config = CacheConfig(policy="cascade", cache_size=64, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        frozen = SharedDocument(runner)
        assert frozen.n == runner.cache.n_past < len(doc)
        alone = []
        for ids in requests:
            one = AnswerBatch(runner, frozen, 1, room=20)
            steps = [one.prefill(0, ids)]
            for _ in range(8):
                steps.append(one.decode([int(steps[-1].argmax())], [True])[0])
            alone.append(torch.stack(steps))
        batch = AnswerBatch(runner, frozen, 3, room=20)
        got = [[batch.prefill(r, ids)] for r, ids in enumerate(requests)]
        for step in range(8):
            active = [True, step < 3, True]  # row 1 finishes early
            logits = batch.decode([int(got[r][-1].argmax()) for r in range(3)], active)
            for r in range(3):
                if active[r]:
                    got[r].append(logits[r])
    for r in range(3):
        torch.testing.assert_close(torch.stack(got[r]), alone[r][: len(got[r])], atol=1e-5, rtol=1e-5)


def test_answer_together_streams_what_generate_writes_alone():
    """Greedy with the default repetition control and sampled: each row's ids are those of the same sampling
    alone (its own generator, its own answer's n-grams)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 256, (300,), generator=g).tolist()
    requests = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 7)]
    config = CacheConfig(policy="cascade", cache_size=64, cascades=4, sinks=4, stride=16)
    for sampling in (Sampling(no_repeat_ngram=2), Sampling(temperature=1.0, top_k=20, seed=7)):
        with _read(model, doc, config) as runner:
            frozen = SharedDocument(runner)
            alone = []
            for ids in requests:
                pieces = answer_together(AnswerBatch(runner, frozen, 1, room=7 + 10), _Ids(), [ids], 10, sampling)
                alone.append("".join(p for _, p, _ in pieces))
            text = ["", ""]
            done = []
            for row, piece, finished in answer_together(AnswerBatch(runner, frozen, 2, room=7 + 10), _Ids(),
                                                        requests, 10, sampling):
                text[row] += piece
                if finished:
                    done.append(row)
        assert text == alone and sorted(done) == [0, 1]
        assert all(len(t.split()) == 10 for t in text)


def test_stop_ids_end_a_row():
    model = tiny_model()
    doc = list(range(40))
    config = CacheConfig(policy="cascade", cache_size=64, cascades=4, sinks=4, stride=16)
    with _read(model, doc, config) as runner:
        frozen = SharedDocument(runner)
        first = [t for _, p, _ in answer_together(AnswerBatch(runner, frozen, 1, room=12), _Ids(), [[1, 2]], 10,
                                                  GREEDY) for t in p.split()]
        stop = {int(first[3])}
        text = "".join(p for _, p, _ in answer_together(AnswerBatch(runner, frozen, 1, room=12), _Ids(), [[1, 2]], 10,
                                                        GREEDY, stop))
    assert text.split() == first[: first.index(first[3])]


def test_room_past_the_model_positions_is_refused():
    model = tiny_model()
    config = CacheConfig(policy="full", cache_size=128, cascades=4, sinks=4, stride=16)
    with _read(model, list(range(40)), config) as runner:
        with pytest.raises(CapacityError):
            AnswerBatch(runner, SharedDocument(runner), 2, room=runner.max_positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", ["cascade", "full"])
def test_frozen_bytes_is_what_the_frozen_copy_and_the_tails_take(policy, dtype):
    """The estimate the CLI checks against free memory before answering from the frozen cache is exact on the
    CPU (float32 copies, whatever the model's dtype), before and after eviction."""
    model = tiny_model().to(dtype)
    config = CacheConfig(policy=policy, cache_size=64, cascades=4, sinks=4, stride=16)
    for n_doc in (40, 300 if policy == "cascade" else 90):
        with _read(model, [i % 50 for i in range(n_doc)], config) as runner:
            doc = SharedDocument(runner)
            batch = AnswerBatch(runner, doc, 3, room=11)
            assert doc.nbytes() + batch.nbytes() == frozen_bytes(runner, 3, 11)
            doc = SharedDocument(runner, room=11)  # one row's tail in the copy's room
            batch = AnswerBatch(runner, doc, 1, room=11)
            assert doc.nbytes() + batch.nbytes() == frozen_bytes(runner, 1, 11)


# ---------------------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_batch(graph: bool, steps: int = 24):
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, num_hidden_layers=3, vocab_size=512, max_positions=4096)
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    doc = torch.randint(0, 512, (700,), generator=g).tolist()
    requests = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (9, 3, 6, 1)]
    config = CacheConfig(policy="cascade", cache_size=256, cascades=4, sinks=8, stride=32)
    with _read(model, doc, config) as runner:
        batch = AnswerBatch(runner, SharedDocument(runner), 4, room=9 + steps + 1)
        batch.graph = graph
        logits = torch.stack([batch.prefill(r, ids) for r, ids in enumerate(requests)])
        out = [logits.clone()]
        for step in range(steps):
            active = [True, True, step < 5, True]
            tokens = [int(t) for t in logits.argmax(-1)]
            logits = batch.decode(tokens, active)
            out.append(logits.clone())
        tails = [t.clone() for t in batch.k + batch.v]
        if graph:  # replays read their inputs through one pinned copy: no host synchronisation
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    batch.decode([1, 2, 3, 4], [False] * 4)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return torch.stack(out), tails, batch.graph_counts.as_dict()


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_batch_decode_equals_eager():
    eager, eager_tails, eager_counts = _gpu_batch(graph=False)
    graph, graph_tails, counts = _gpu_batch(graph=True)
    assert torch.equal(graph, eager)
    for a, b in zip(graph_tails, eager_tails):
        assert torch.equal(a, b)
    assert eager_counts == {"eager": 24, "captured": 0, "replayed": 0}
    assert counts == {"eager": 1, "captured": 1, "replayed": 22 + 3}
