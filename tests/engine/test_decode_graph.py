"""Decode steps captured as a CUDA graph (engine/decode_graph.py) and the fixed indices they read
(engine/cache/fixed_step.py).

The oracle is the eager step. On the CPU: a cache whose decode steps read their indices from the fixed buffer ends
every step with bitwise the buffers of one that builds them anew (cascade and evidence policies, through fills,
evictions, competes and dead evidence slots), and `Runner.decode` equals `step` + `logits`. On a GPU
(`-m gpu`): a tiny bf16 Llama decodes 40 greedy tokens with the graph and without it, with the same logits, tokens
and cache buffers bitwise; the graph is captured once per cache shape and replayed after, a new cache recaptures,
and replays issue no host synchronisation.
"""
from __future__ import annotations

import pytest
import torch

from engine.cache import make_cache
from engine.cache.base import CacheShape
from engine.cache.cascade import CascadeCache
from engine.cache.evidence import EvidenceCascadeCache
from engine.config import CacheConfig
from engine.runner import Runner
from tests.engine.tiny import tiny_model



def _caches(kind: str):
    shape = CacheShape(2, 1, 2, 16, torch.float32, torch.device("cpu"))
    if kind == "cascade":
        return [CascadeCache(shape, 4, 40, 4, 0.99) for _ in range(2)]
    return [EvidenceCascadeCache(shape, 4, 32, 4, 0.99, 12) for _ in range(2)]


def _feed(caches, lengths, seed=0, take_every=0):
    """The same seeded keys, values and scores into every cache, chunk by chunk (with an evidence store, a span
    of recent tokens taken every `take_every` chunks, so slots die and pushes are dropped); returns per cache how
    many steps read the fixed indices."""
    gen = torch.Generator().manual_seed(seed)
    fixed = [0] * len(caches)
    slot = 0
    for j, n in enumerate(lengths):
        if take_every and j % take_every == take_every - 1 and slot < caches[0].evidence:
            t = caches[0].seen - 1 - int(torch.randint(0, 30, (1,), generator=gen))
            for c in caches:
                c.take(slot, max(t, 0))
            slot += 1
        k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
        for c in caches:
            c.begin(n)
        n_scores = caches[0].n_past - caches[0].n_unscored + n
        score = torch.rand(1, 2, n_scores, generator=gen)
        for i, c in enumerate(caches):
            assert c.n_past - c.n_unscored + n == n_scores
            fixed[i] += c.fixed_step
            for layer in range(2):
                c.update(layer, k, v, score)
            c.end()
    return fixed


@pytest.mark.parametrize("kind", ["cascade", "evidence"])
def test_fixed_indices_change_nothing(kind):
    plain, fixed = _caches(kind)
    assert fixed.use_fixed_indices(True) and not fixed.fixed_step
    counts = _feed([plain, fixed], [3, 30, 1, 1, 17] + [1] * 300, take_every=20 if kind == "evidence" else 0)
    assert counts[0] == 0 and counts[1] > 250  # every single-token step past the sinks read the fixed buffer
    for a, b in zip(plain._tensors(), fixed._tensors()):
        assert torch.equal(a, b)
    assert plain.n_past == fixed.n_past and plain.seen == fixed.seen


def test_fixed_indices_off_again():
    plain, fixed = _caches("cascade")
    fixed.use_fixed_indices(True)
    _feed([plain, fixed], [10, 1, 1, 40])
    fixed.use_fixed_indices(False)
    counts = _feed([plain, fixed], [1] * 20, seed=1)
    assert counts == [0, 0]
    for a, b in zip(plain._tensors(), fixed._tensors()):
        assert torch.equal(a, b)


def test_runner_decode_equals_step_and_logits_on_cpu():
    model = tiny_model("llama")
    config = CacheConfig(policy="cascade", cache_size=48, cascades=4, stride=16, sinks=4)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    outs = []
    for use_decode in (True, False):
        with Runner(model, config) as runner:
            for i in range(0, 64, 16):
                runner.step(ids[:, i : i + 16])
            token, logits = 7, []
            for _ in range(30):
                if use_decode:
                    row = runner.decode(token)
                else:
                    row = runner.logits(runner.step(torch.tensor([[token]]))[:, -1])[0]
                logits.append(row.clone())
                token = int(row.argmax())
            outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_model():
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=512, num_hidden_layers=3, vocab_size=512, max_positions=4096)
    return model.to("cuda", torch.bfloat16)


def _gpu_decode(model, config, graph: bool, steps: int = 40, prefill: int = 512):
    ids = torch.randint(0, 512, (1, prefill), generator=torch.Generator().manual_seed(1)).cuda()
    with Runner(model, config) as runner:
        runner.graph_decode = graph
        for i in range(0, prefill, config.stride):
            runner.step(ids[:, i : i + config.stride])
        token, logits, tokens = 5, [], []
        for _ in range(steps):
            row = runner.decode(token)
            logits.append(row.clone())
            token = int(row.argmax())
            tokens.append(token)
        bufs = [t.clone() for t in runner.cache._tensors()]
        report = runner.decode_report()
    return torch.stack(logits), tokens, bufs, report


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("evidence", [0, 32])
def test_graph_decode_equals_eager(evidence):
    model = _gpu_model()
    config = CacheConfig(policy="cascade", cache_size=256, cascades=4, stride=32, sinks=8, evidence=evidence)
    eager = _gpu_decode(model, config, graph=False)
    graph = _gpu_decode(model, config, graph=True)
    assert torch.equal(graph[0], eager[0])
    assert graph[1] == eager[1]
    for a, b in zip(graph[2], eager[2]):
        assert torch.equal(a, b)
    report = graph[3]
    assert (report["eager"], report["captured"], report["replayed"], report["off"]) == (1, 1, 38, None), report


@pytest.mark.gpu
@needs_cuda
def test_graph_recaptured_for_a_new_cache_and_replays_do_not_synchronise():
    model = _gpu_model()
    config = CacheConfig(policy="cascade", cache_size=256, cascades=4, stride=128, sinks=8)
    ids = torch.randint(0, 512, (1, 512), generator=torch.Generator().manual_seed(2)).cuda()
    with Runner(model, config) as runner:
        for i in range(0, 512, 128):
            runner.step(ids[:, i : i + 128])
        token = torch.zeros((), dtype=torch.long, device="cuda")
        for _ in range(3):  # eager warm-up, capture, one replay
            token = runner.decode(int(token)).argmax()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(5):  # the token id stays on the host side as an int given in: no device read here
                runner.decode(3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts = lambda: tuple(runner.decode_report()[k] for k in ("eager", "captured", "replayed"))  # noqa: E731
        assert counts() == (1, 1, 6)
        # another cache of the same shape (as each question of `ask -q ... -q ...` gets): warm-up, capture again
        runner.replace_cache(make_cache(config, runner.cache.shape, config.sinks))
        for i in range(0, 512, 128):
            runner.step(ids[:, i : i + 128])
        for _ in range(3):
            runner.decode(3)
        assert counts() == (2, 2, 7)
