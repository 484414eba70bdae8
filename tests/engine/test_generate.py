"""Decoding through the cache: greedy equals the model's own greedy decoding, sampling is seeded, stops stop, and
the sampling settings are transformers' logits processors over the model's generation_config."""
from dataclasses import replace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.generate import GREEDY, NO_REPEAT_NGRAM, Sampling, generate, next_token
from engine.runner import Runner
from tests.engine.tiny import tiny_model

CACHE = CacheConfig(cache_size=32, cascades=2, sinks=2, stride=8)


def _prompt_logits(runner, ids):
    return runner.logits(runner.step(ids)[:, -1])[0]


def _run(model, ids, sampling=GREEDY, n=40, **kw):
    with Runner(model, CACHE) as runner:
        return list(generate(runner, _prompt_logits(runner, ids), n, sampling, **kw))


@pytest.fixture(scope="module")
def model_and_prompt():
    model = tiny_model(seed=6)
    return model, torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))


def test_greedy_equals_transformers_greedy():
    model = tiny_model("qwen2", seed=4)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:]
    with Runner(model, CacheConfig(cache_size=64, cascades=2, sinks=4, stride=8)) as runner:
        got = list(generate(runner, _prompt_logits(runner, ids), max_tokens=12))
    assert got == expected.tolist()


def test_greedy_is_argmax_with_no_processors():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(1))
    for sampling in (GREEDY, Sampling.from_model(GenerationConfig(do_sample=True, repetition_penalty=1.5),
                                                 temperature=0.0)):
        assert sampling == GREEDY and len(sampling.processors()) == 0
        assert next_token(logits, sampling, sampling.processors(), [int(logits.argmax())], None) == logits.argmax()


def test_sampling_is_reproducible_and_stops(model_and_prompt):
    model, ids = model_and_prompt
    hot = Sampling(temperature=1.0, seed=11)
    runs = [_run(model, ids, hot) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 40  # also: decoding past the cache size keeps working
    stop = runs[0][5]
    assert _run(model, ids, hot, stop_ids={stop}) == runs[0][: runs[0].index(stop)]


def test_filtered_sampling_is_reproducible_by_seed(model_and_prompt):
    model, ids = model_and_prompt
    warm = Sampling(temperature=1.5, top_k=40, top_p=0.95, min_p=0.01, repeat_penalty=1.1, seed=3)
    first = _run(model, ids, warm)
    assert first == _run(model, ids, warm)
    assert first != _run(model, ids, replace(warm, seed=4))
    assert first != _run(model, ids)  # not greedy


def test_top_k_1_is_greedy(model_and_prompt):
    model, ids = model_and_prompt
    assert _run(model, ids, Sampling(temperature=0.7, top_k=1, seed=5)) == _run(model, ids)


def test_repetition_penalty_is_transformers_processor():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.2])
    answer = [3, 1, 3]  # token 3 (the argmax) and token 1 were already written
    penalised = Sampling(repeat_penalty=2.0).processors()(torch.tensor([answer]), logits[None])[0]
    reference = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([answer]), logits[None].clone())[0]
    torch.testing.assert_close(penalised, reference, rtol=0, atol=0)
    torch.testing.assert_close(penalised, torch.tensor([2.0, -2.0, 0.5, 1.5, -0.2]))  # > 0: / 2, < 0: * 2
    sampling = Sampling(repeat_penalty=2.0)
    assert next_token(logits, sampling, sampling.processors(), answer, None) == 0  # greedy, but not token 3 again
    assert next_token(logits, sampling, sampling.processors(), [], None) == 3


def test_repetition_penalty_changes_greedy_decoding(model_and_prompt):
    model, ids = model_and_prompt
    plain = _run(model, ids)
    assert _run(model, ids, Sampling(repeat_penalty=1.0)) == plain
    penalised = _run(model, ids, Sampling(repeat_penalty=3.0))
    assert penalised != plain and penalised == _run(model, ids, Sampling(repeat_penalty=3.0))
    assert len(set(penalised)) >= len(set(plain))


def test_settings_come_from_the_model_unless_given():
    authors = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05)
    got = Sampling.from_model(authors, seed=2)
    assert got == Sampling(temperature=0.6, top_k=20, top_p=0.9, repeat_penalty=1.05, seed=2)
    assert got.model_defaults == ("do_sample", "temperature", "top_k", "top_p", "repeat_penalty")
    assert Sampling.from_model(authors, top_p=0.5, min_p=0.1).top_p == 0.5
    assert Sampling.from_model(authors, temperature=0.0) == GREEDY
    assert Sampling.from_model(authors, temperature=0.0, repeat_penalty=1.2) == Sampling(repeat_penalty=1.2)
    silent = GenerationConfig(bos_token_id=1, eos_token_id=2)  # the embedded SmolLM2's: greedy, no 4-gram twice
    loopless = Sampling(no_repeat_ngram=NO_REPEAT_NGRAM)
    assert Sampling.from_model(silent) == loopless and Sampling.from_model(None) == loopless
    assert Sampling.from_model(silent, no_repeat_ngram=0) == Sampling(no_repeat_ngram=0)  # off when asked
    assert Sampling.from_model(silent, repeat_penalty=1.2) == Sampling(repeat_penalty=1.2)  # one control is enough
    assert Sampling.from_model(GenerationConfig(no_repeat_ngram_size=3)).no_repeat_ngram == 3  # the model's own
    assert Sampling.from_model(silent, top_k=5) == Sampling(temperature=1.0, top_k=5, no_repeat_ngram=4)
    assert Sampling.from_model(silent, temperature=0.8) == Sampling(temperature=0.8, no_repeat_ngram=4)
    greedy_penalised = Sampling.from_model(GenerationConfig(repetition_penalty=1.3, temperature=0.7))
    assert greedy_penalised == Sampling(repeat_penalty=1.3)  # do_sample unset: its temperature is not used


def test_no_repeat_ngram_never_writes_an_ngram_twice(model_and_prompt):
    model, ids = model_and_prompt
    out = _run(model, ids, Sampling(no_repeat_ngram=3))
    grams = [tuple(out[i:i + 3]) for i in range(len(out) - 2)]
    assert len(grams) == len(set(grams))
    assert _run(model, ids, Sampling(no_repeat_ngram=0)) == _run(model, ids)


@pytest.mark.parametrize("given, flag", [
    ({"top_p": -0.1}, "--top-p"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
    ({"top_k": -1}, "--top-k"), ({"min_p": 1.2}, "--min-p"), ({"repeat_penalty": 0.0}, "--repeat-penalty"),
    ({"temperature": -1.0}, "--temperature"), ({"temperature": float("nan")}, "--temperature"),
    ({"temperature": 0.0, "top_p": -1.0}, "--top-p"),
])
def test_out_of_range_settings_name_the_option(given, flag):
    with pytest.raises(ConfigError, match=flag):
        Sampling.from_model(None, **given)
