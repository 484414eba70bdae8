"""The README's Python API example runs as written (on the embedded model), and the API's pieces agree with the
engine's own: engine.perplexity_of with a Runner fed by hand, a loaded Document with the one it was saved from."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import engine
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.models import LoadedModel
from engine.perplexity import perplexity
from engine.runner import Runner
from engine.tokens import rechunk
from tests.cli.fakes import fake_lm

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "sample.txt", tmp_path / "data" / "sample.txt")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out
    assert re.match(r"PPL \d+\.\d\d over \d+ tokens\n", out)
    assert (tmp_path / "sample.kv").is_file()


def test_perplexity_of_is_the_engines_perplexity():
    lm: LoadedModel = fake_lm()
    text = "the cascade keeps what the attention points at. " * 20
    config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=16)
    got = engine.perplexity_of(lm, text, config)
    with Runner(lm.model, config) as runner:
        want = perplexity(runner, rechunk([lm.tokenizer.encode(text)], config.stride))
    assert (got.n_scored, got.nll_sum, got.nll_sq_sum) == (want.n_scored, want.nll_sum, want.nll_sq_sum)
    pieces = engine.perplexity_of(lm, [text[:300], text[300:]], config)  # text pieces: the same tokens here
    assert pieces.nll_sum == got.nll_sum


def test_saved_document_answers_as_the_one_it_came_from(tmp_path):
    lm = fake_lm()
    config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=16)
    with engine.read(lm, "abcdefgh " * 40, config, max_tokens=8) as doc:
        first = doc.answer(max_tokens=8)
        assert doc.answer(max_tokens=8) == first  # answers come from a copy: the reading is unchanged
        doc.save(str(tmp_path / "d.kv"))
    with engine.load(lm, str(tmp_path / "d.kv")) as again:
        assert again.config == config and again.input_tokens == 360
        assert again.answer(max_tokens=8) == first


def test_errors_name_the_setting():
    with pytest.raises(ConfigError) as e:
        CacheConfig(cache_size=100, cascades=3)
    assert e.value.setting == "cache_size" and "`cache_size` (100)" in str(e.value)


def test_answer_from_the_frozen_cache_or_an_evicting_copy(monkeypatch):
    """`Document.answer` decodes from the frozen cache by default: with nothing evicted that is the evicting copy's
    answer (both the model's own attention); after eviction both answer and the cache is left as it was; a frozen
    copy that would not fit in free memory takes the evicting copy."""
    import engine.batch_answer as batch_answer
    lm = fake_lm()
    text = "abcdefgh " * 40
    roomy = CacheConfig(cache_size=1024, cascades=2, sinks=4, stride=16)
    with engine.read(lm, text, roomy, max_tokens=8) as doc:
        assert doc.answer(max_tokens=8) == doc.answer(max_tokens=8, frozen=False)
    config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=16)
    with engine.read(lm, text, config, max_tokens=8) as doc:
        seen = doc.runner.cache.seen
        frozen, evicting = doc.answer(max_tokens=8), doc.answer(max_tokens=8, frozen=False)
        assert frozen and evicting and doc.runner.cache.seen == seen
        calls = []
        monkeypatch.setattr(batch_answer, "free_bytes", lambda device: calls.append(device) or 0)
        assert doc.answer(max_tokens=8) == evicting and calls
