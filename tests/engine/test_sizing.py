"""--cache-size auto (engine/sizing.py): the bounds, the byte count per token, the exact route's peek."""
import pytest
import torch

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.runner import Runner
from engine.sizing import (MIN_CACHE, exact_room, kv_bytes_per_token, long_input_config, parse_cache_size,
                           parse_memory, route, speed_cap)
from engine.tokens import peek
from tests.engine.tiny import tiny_model


def test_parse_cache_size():
    assert parse_cache_size("auto") is None and parse_cache_size(" AUTO ") is None
    assert parse_cache_size("4096") == 4096 and parse_cache_size("65_536") == 65536 and parse_cache_size(7) == 7
    with pytest.raises(ConfigError, match="`cache_size` must be a number of tokens or auto"):
        parse_cache_size("lots")


def test_parse_memory():
    assert parse_memory(None) is None
    assert parse_memory("8GiB") == 8 << 30 and parse_memory("512MB") == 512 << 20 and parse_memory("2e9") == 2e9
    assert parse_memory("1.5 g") == int(1.5 * (1 << 30))
    for bad in ("much", "12 parsecs", "-3G", "10"):
        with pytest.raises(ConfigError, match="`memory`"):
            parse_memory(bad)


@pytest.mark.parametrize("policy", ["full", "sink", "cascade"])
def test_kv_bytes_per_token_is_what_the_cache_holds(policy):
    model = tiny_model("llama", seed=1)
    # one sub-cache of 64: runs long enough for decoding to read them in place (slot_keys.MIN_RUN)
    config = CacheConfig(policy=policy, cache_size=64, cascades=1, sinks=4, stride=16)
    runner = Runner(model, config, n_sinks=4, expected_tokens=200)
    with torch.inference_mode():
        for start in range(0, 192, 16):
            runner.step(torch.arange(start, start + 16).remainder(250).unsqueeze(0))
        for t in range(192, 200):  # decode steps: on the CPU they add the slot-rotated keys (engine/slot_decode.py)
            runner.step(torch.tensor([[t]]))
    per_token = kv_bytes_per_token(model, policy)
    held = 200 if policy == "full" else 64 + 4
    assert runner.cache.nbytes() >= held * per_token
    if policy == "full":  # the dense cache grows in steps: whole tokens of it
        assert runner.cache.nbytes() % per_token == 0
    else:
        assert runner.cache.nbytes() <= 1.25 * held * per_token + 4096  # bookkeeping on top is small


def test_positions_bound_a_short_model():
    model = tiny_model("llama", max_positions=512)
    config, sizing = long_input_config(CacheConfig(), model, 512, n_sinks=64, extra_positions=10, budget=1 << 34)
    assert sizing.bound == "positions"
    assert config.cache_size % config.cascades == 0 and config.stride <= config.cache_size // config.cascades
    assert 64 + config.cache_size + config.stride + 10 <= 512  # every position below the model's limit
    config.check_positions(64, 512)


def test_memory_bounds_the_cache():
    model = tiny_model("llama", max_positions=1 << 20)
    per_token = kv_bytes_per_token(model, "cascade")
    config, sizing = long_input_config(CacheConfig(), model, 1 << 20, 64, 0, budget=3001 * per_token)
    assert sizing.bound == "memory" and config.cache_size == 3000
    assert sizing.kv_bytes_per_token == per_token


def test_speed_bound_follows_the_weights():
    """Attention at the cap costs what the decoder weights cost per token: 4·N·heads·head_dim a layer."""
    model = tiny_model("llama", max_positions=1 << 22)
    cfg = model.config
    weights = sum(p.numel() for p in model.model.layers.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert speed_cap(model) == 2 * weights // (4 * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers)
    config, sizing = long_input_config(CacheConfig(), model, 1 << 22, 64, 0, budget=1 << 40)
    assert sizing.bound == ("minimum" if speed_cap(model) < MIN_CACHE else "speed")
    assert config.cache_size == max(MIN_CACHE, speed_cap(model)) // 1024 * 1024
    assert config.stride == config.cache_size // 4 and sizing.exact_stride == CacheConfig.stride


def test_a_given_stride_is_kept():
    model = tiny_model("llama", max_positions=1 << 20)
    config, _ = long_input_config(CacheConfig(), model, 1 << 20, 64, 0, budget=1 << 40, stride=300)
    assert config.stride == 300


def test_no_cache_fits():
    model = tiny_model("llama", max_positions=1 << 20)
    with pytest.raises(ConfigError, match="no cache fits"):
        long_input_config(CacheConfig(), model, 1 << 20, 64, 0, budget=1)


def test_exact_room():
    assert exact_room(8192, 30, 20, 256, 100, 1 << 40) == 8192 - 306
    assert exact_room(8192, 30, 20, 256, 100, 100 * 1000) == 1000 - 306  # the memory is the tighter bound
    assert exact_room(100, 30, 20, 256, 1, 1 << 40) == 0


@pytest.mark.parametrize("n", [0, 5, 99, 100, 101, 250])
def test_peek_holds_back_nothing(n):
    pieces = [list(range(i, min(i + 7, n))) for i in range(0, n, 7)]
    fitted, rest = peek(iter(pieces), 100)
    if n <= 100:
        assert fitted == list(range(n)) and list(rest) == []
    else:
        assert fitted is None and [i for p in rest for i in p] == list(range(n))


def test_route_takes_full_attention_only_when_it_fits():
    model = tiny_model("llama", max_positions=1 << 20)
    config, sizing = long_input_config(CacheConfig(), model, 1 << 20, 64, 0, budget=1 << 40, stride=512)
    assert sizing.exact_stride == 512
    exact, fitted, pieces = route([[1, 2, 3]], config, sizing, model, limit=30, reserved=20)  # room: 10 tokens
    assert exact == CacheConfig(policy="full", stride=512) and fitted.exact and list(pieces) == [[1, 2, 3]]
    kept, longer, pieces = route([[1] * 6, [2] * 6], config, sizing, model, limit=30, reserved=20)
    assert kept == config and not longer.exact and longer.exact_up_to == 10 and list(pieces) == [[1] * 6, [2] * 6]
