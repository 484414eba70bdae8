"""A model spread over several devices: each layer's cache, rotary tables and scores on that layer's device.

On CPU the multi-device path is exercised by naming some layers' device `cpu:0`, which torch keeps distinct
from `cpu` as a key but maps to the same memory: every per-device copy and lookup runs, the numbers must not
move. The GPU test compares one GPU with an explicit split over two (run it on a 2-GPU machine)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from engine import models
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.retention import QuestionGuide
from engine.runner import Runner
from tests.engine.test_models import _tiny_tokenizer
from tests.engine.tiny import tiny_model

N_LAYERS = 4
CONFIGS = [
    CacheConfig(policy="cascade", cache_size=32, cascades=4, sinks=4, stride=8),
    CacheConfig(policy="sink", cache_size=32, sinks=4, stride=8),
    CacheConfig(policy="full", stride=8),
]


def _ids(n: int = 200, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _logits(runner: Runner, ids: list[int], stride: int) -> torch.Tensor:
    """Logits of every position, fed chunk by chunk through the cache: [len(ids), V]."""
    device = runner.cache.shape.device
    out = [runner.logits(runner.step(torch.tensor([ids[i : i + stride]], device=device)))[0]
           for i in range(0, len(ids), stride)]
    return torch.cat(out).cpu()


def _split(n_layers: int, first: str, second: str) -> dict:
    """An explicit device_map: the first half of the layers (and the embedding) on `first`, the rest on `second`."""
    half = n_layers // 2
    placement = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    placement |= {f"model.layers.{i}": first if i < half else second for i in range(n_layers)}
    return placement


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-4l")
    tiny_model("llama", num_hidden_layers=N_LAYERS).save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer(folder)
    return folder


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.policy)
def test_per_layer_devices_on_cpu_change_nothing(config):
    model = tiny_model("llama", num_hidden_layers=N_LAYERS)
    ids = _ids()
    with Runner(model, config, expected_tokens=len(ids)) as runner:
        expected = _logits(runner, ids, config.stride)
        assert runner.cache.shape.layer_devices is None  # one device: the plain path
    spread = ["cpu", "cpu", "cpu:0", "cpu:0"]
    with Runner(model, config, expected_tokens=len(ids), devices=spread) as runner:
        got = _logits(runner, ids, config.stride)
        shape = runner.cache.shape
        assert shape.layer_devices == tuple(torch.device(d) for d in spread)
        assert shape.devices == (torch.device("cpu"), torch.device("cpu:0"))
        assert [shape.device_of(i) for i in range(N_LAYERS)] == list(shape.layer_devices)
        if config.policy != "full":
            assert set(runner.cache._remote) == {torch.device("cpu:0")}  # indices were planned for the other device
        assert set(runner._tables) == {torch.device("cpu"), torch.device("cpu:0")}
    assert torch.equal(got, expected)


def test_question_guided_retention_on_per_layer_devices():
    config = CONFIGS[0]
    model = tiny_model("llama", num_hidden_layers=N_LAYERS)
    ids = _ids(160)
    results = []
    for devices in (None, ["cpu", "cpu:0", "cpu", "cpu:0"]):
        with Runner(model, config, n_sinks=12, devices=devices) as runner, QuestionGuide(runner, (4, 12), 1.0):
            logits = _logits(runner, ids, config.stride)
            results.append((logits, [runner.cache.token_index(i).clone() for i in range(N_LAYERS)]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_explicit_cpu_device_map_loads_and_runs(model_dir):
    plain = models.load_model(str(model_dir), "cpu", "fp32")
    mapped = models.load_model(str(model_dir), "cpu", "fp32", device_map=_split(N_LAYERS, "cpu", "cpu"))
    assert mapped.device == torch.device("cpu")
    config, ids = CONFIGS[0], _ids(64)
    with Runner(plain.model, config) as a, Runner(mapped.model, config) as b:
        assert torch.equal(_logits(a, ids, config.stride), _logits(b, ids, config.stride))


def test_device_map_auto_is_a_no_op_without_several_gpus(model_dir, monkeypatch):
    assert models.resolve_device_map("auto", torch.device("cpu")) is None
    assert models.resolve_device_map("none", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert models.resolve_device_map("auto", torch.device("cuda")) is None
    lm = models.load_model(str(model_dir), "cpu", "fp32", device_map="auto")
    assert lm.device_map is None and lm.device == torch.device("cpu")


def test_bad_device_map_names_the_flag():
    with pytest.raises(ConfigError, match="--device-map"):
        models.resolve_device_map("balanced", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_two_gpus_match_one(model_dir, dtype, atol):
    """Cascade logits with layers split over cuda:0 and cuda:1 equal the single-GPU run, over strided chunks and
    single-token steps, and the split adds no host synchronisation (counted with torch's sync debug mode)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    one = models.load_model(str(model_dir), "cuda:0", dtype)
    two = models.load_model(str(model_dir), "cuda", dtype, device_map=_split(N_LAYERS, "cuda:0", "cuda:1"))
    assert {two.model.model.layers[0].self_attn.q_proj.weight.device.index,
            two.model.model.layers[-1].self_attn.q_proj.weight.device.index} == {0, 1}
    config, ids = CONFIGS[0], _ids(400)
    syncs = []
    logits = []
    for lm in (one, two):
        with Runner(lm.model, config) as runner:
            assert (runner.cache.shape.layer_devices is not None) == (lm is two)
            _logits(runner, ids[:16], config.stride)  # warm-up: first-call allocations and compilation
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = [runner.step(torch.tensor([ids[i : i + config.stride]], device=lm.device))
                           for i in range(16, 360, config.stride)]
                    # then single tokens, as decoding feeds them (the cache's one-token push on each layer's card)
                    out += [runner.step(torch.tensor([ids[i : i + 1]], device=lm.device)) for i in range(360, 400)]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
            logits.append(torch.cat([runner.logits(h)[0].cpu() for h in out]))
    torch.testing.assert_close(logits[1], logits[0], atol=atol, rtol=0)
    assert syncs[1] <= syncs[0], syncs
