"""The `scores` cache setting: "exact" (every query of a chunk feeds the EMA scores) or "last:R" (its last R,
ALGORITHM.md §3): validation, the weights the runner hands the attention, and what it changes in a real run."""
from __future__ import annotations

import pytest
import torch

import engine.attention as attention
from cascade_kernels.chunk_attention import ema_weights
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.runner import Runner
from tests.engine.tiny import tiny_model


@pytest.mark.parametrize("value", ["", "last", "last:", "last:0", "last:-3", "last:x", "first:4", "exact:1", "Last:4"])
def test_rejects_malformed(value):
    with pytest.raises(ConfigError, match="`scores`"):
        CacheConfig(scores=value)


def test_parses():
    assert CacheConfig().scores == "exact" and CacheConfig().score_queries is None
    assert CacheConfig(scores="last:64").score_queries == 64


def test_runner_hands_last_r_weights(monkeypatch):
    """A chunk of 32 with last:8 gets the renormalised last-8 weights (a decode step, one query, the exact one);
    the output of a chunk is the same as with exact scores (they only steer eviction)."""
    seen = []
    real = attention.chunk_attention

    def spy(q, k, v, scale, ema, *args, **kwargs):
        seen.append(ema)
        return real(q, k, v, scale, ema, *args, **kwargs)

    monkeypatch.setattr(attention, "chunk_attention", spy)
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 33))
    hidden = {}
    for scores in ("exact", "last:8"):
        seen.clear()
        config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=32, scores=scores, beta=0.99)
        with Runner(model, config) as runner:
            hidden[scores] = runner.step(ids[:, :32])
            runner.step(ids[:, 32:])
        last = config.score_queries
        assert torch.equal(seen[0], ema_weights(32, 0.99, last=last))
    assert (seen[0][:24] == 0).all() and (seen[0][24:] > 0).all()
    assert torch.equal(ema_weights(1, 0.99, last=8), ema_weights(1, 0.99))
    assert torch.equal(hidden["exact"], hidden["last:8"])


def test_last_r_changes_what_is_kept():
    """Past the cache's capacity the eviction follows the other scores: the kept tokens differ somewhere, and
    last:R with R >= the stride is the exact setting bit for bit."""
    model = tiny_model(max_positions=1024)
    ids = torch.randint(0, 256, (1, 320))

    def run(scores):
        config = CacheConfig(cache_size=64, cascades=2, sinks=4, stride=32, scores=scores, beta=0.99)
        with Runner(model, config) as runner:
            for i in range(0, ids.shape[1], 32):
                out = runner.step(ids[:, i : i + 32])
            return out

    exact = run("exact")
    assert torch.equal(run("last:32"), exact)
    assert not torch.equal(run("last:2"), exact)


def test_cache_files_record_the_setting(tmp_path):
    """--save-cache records `scores`; a file from before the setting existed loads as "exact"; a --load-cache
    asking for another value is refused naming the setting."""
    from engine import snapshot as snap
    from tests.engine.test_snapshot import loaded, refused, rewrite, saved

    lm = loaded(tiny_model("llama"))
    config = CacheConfig(policy="cascade", cache_size=32, cascades=4, sinks=4, stride=8, scores="last:4")
    path = saved(tmp_path, lm, config)
    _, meta, _ = snap.load_snapshot(path, lm, {"scores": "last:4"})
    assert meta["settings"]["scores"] == "last:4" and snap.config_of(meta) == config
    assert "`scores=last:4`" in refused(path, lm, {"scores": "exact"}, kind=ConfigError)
    rewrite(path, lambda m: m["settings"].pop("scores"), resign=True)  # as written before the setting
    _, meta, _ = snap.load_snapshot(path, lm, {"scores": "exact"})
    assert snap.config_of(meta).scores == "exact"
