"""Decoding through the cache: greedy equals the model's own greedy decoding, sampling is seeded, stops stop."""
import torch

from engine.config import CacheConfig
from engine.generate import generate
from engine.runner import Runner
from tests.engine.tiny import tiny_model


def _prompt_logits(runner, ids):
    return runner.logits(runner.step(ids)[:, -1])[0]


def test_greedy_equals_transformers_greedy():
    model = tiny_model("qwen2", seed=4)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:]
    with Runner(model, CacheConfig(cache_size=64, cascades=2, sinks=4, stride=8)) as runner:
        got = list(generate(runner, _prompt_logits(runner, ids), max_tokens=12))
    assert got == expected.tolist()


def test_sampling_is_reproducible_and_stops():
    model = tiny_model(seed=6)
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    runs = []
    for _ in range(2):
        with Runner(model, CacheConfig(cache_size=32, cascades=2, sinks=2, stride=8)) as runner:
            runs.append(list(generate(runner, _prompt_logits(runner, ids), 40, temperature=1.0, seed=11)))
    assert runs[0] == runs[1] and len(runs[0]) == 40  # also: decoding past the cache size keeps working
    stop = runs[0][5]
    with Runner(model, CacheConfig(cache_size=32, cascades=2, sinks=2, stride=8)) as runner:
        cut = list(generate(runner, _prompt_logits(runner, ids), 40, temperature=1.0, seed=11, stop_ids={stop}))
    assert cut == runs[0][: runs[0].index(stop)]
