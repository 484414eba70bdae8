"""Cache snapshots: exact round trips for every policy, refusals of bad files, atomic writes."""
import errno
import functools
import hashlib
import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from engine import snapshot as snap
from engine.config import CacheConfig
from engine.errors import CascadeError, ConfigError
from engine.models import LoadedModel
from engine.runner import Runner
from tests.engine.tiny import tiny_model

CONFIGS = {
    "cascade": CacheConfig(policy="cascade", cache_size=32, cascades=4, sinks=4, stride=8),
    "sink": CacheConfig(policy="sink", cache_size=32, sinks=4, stride=8),
    "full": CacheConfig(policy="full", sinks=4, stride=8),
}


def loaded(model, model_hash="0" * 64) -> LoadedModel:
    p = next(model.parameters())
    return LoadedModel(model=model, tokenizer=None, model_id="tiny", model_hash=model_hash, family="llama",
                       max_positions=model.config.max_position_embeddings, device=p.device, dtype=p.dtype)


@pytest.fixture(scope="module")
def lm():
    return loaded(tiny_model("llama"))


def chunks(n_tokens: int, stride: int, seed: int = 1) -> list[torch.Tensor]:
    ids = torch.randint(0, 256, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(stride, dim=1))


def feed(runner: Runner, parts) -> list[torch.Tensor]:
    return [runner.logits(runner.step(x)) for x in parts]


def saved(tmp_path, lm, config=CONFIGS["cascade"], n_tokens=60, name="c.safetensors", **kw) -> str:
    path = str(tmp_path / name)
    with Runner(lm.model, config) as runner:
        feed(runner, chunks(n_tokens, config.stride))
        snap.save_snapshot(path, runner.cache, lm, config, **kw)
    return path


@pytest.mark.parametrize("policy", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_continues_bit_identically(tmp_path, policy, dtype):
    """Save after k chunks, load into a fresh runner: the next chunks give the same logits, bit for bit."""
    lm = loaded(tiny_model("llama").to(dtype))
    config = CONFIGS[policy]
    parts = chunks(100, config.stride)  # 100 tokens through a 4 + 32 cache: sink and cascade evict
    path = str(tmp_path / "c.safetensors")
    with Runner(lm.model, config, n_sinks=6) as runner:
        feed(runner, parts[:7])
        size = snap.save_snapshot(path, runner.cache, lm, config, meta={"note": "x"},
                                  extra_tensors={"carry": torch.arange(5.0)})
        expected = feed(runner, parts[7:])
        seen = runner.cache.seen
    assert os.path.getsize(path) == size
    cache, meta, extra = snap.load_snapshot(path, lm, {"policy": policy, "cache_size": config.cache_size})
    assert meta["extra"] == {"note": "x"} and meta["n_sinks"] == 6 and snap.config_of(meta) == config
    assert torch.equal(extra["carry"], torch.arange(5.0))
    with Runner(lm.model, snap.config_of(meta), n_sinks=meta["n_sinks"]) as runner:
        runner.replace_cache(cache)
        got = feed(runner, parts[7:])
        assert runner.cache.seen == seen
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_size_is_that_of_the_cache_not_the_input(tmp_path, lm):
    cascade = CacheConfig(policy="cascade", cache_size=32, cascades=4, sinks=4, stride=32)
    short = os.path.getsize(saved(tmp_path, lm, cascade, n_tokens=40, name="short"))
    long = os.path.getsize(saved(tmp_path, lm, cascade, n_tokens=400, name="long"))
    assert abs(long - short) < 64  # only the digits of the counters in the metadata differ
    full = CacheConfig(policy="full", sinks=4, stride=64)
    grows = os.path.getsize(saved(tmp_path, lm, full, n_tokens=400, name="full-long"))
    assert grows > 5 * os.path.getsize(saved(tmp_path, lm, full, n_tokens=40, name="full-short"))  # O(input)


def test_any_safetensors_reader_opens_it(tmp_path, lm):
    path = saved(tmp_path, lm, meta={"a": 1})
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["cascadectl"])
        assert meta["format"] == snap.FORMAT and meta["extra"] == {"a": 1}
        assert f.get_tensor("layer.0.k").shape == (1, 2, 36, 16)


# ------------------------------------------------------------------------------------------------------ refusals


def rewrite(path: str, edit, resign: bool) -> None:
    """Re-serialise the header with edit(meta) applied, signing it again or not."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    meta = json.loads(header["__metadata__"]["cascadectl"])
    edit(meta)
    meta_json = json.dumps(meta, sort_keys=True)
    header["__metadata__"]["cascadectl"] = meta_json
    if resign:
        table = {k: v for k, v in header.items() if k != "__metadata__"}
        h = hashlib.sha256(meta_json.encode())
        h.update(b"\0" + json.dumps(table, sort_keys=True, separators=(",", ":")).encode() + b"\0")
        h.update(data)
        header["__metadata__"]["sha256"] = h.hexdigest()
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw + data)


def refused(path, lm, expected=None, kind=CascadeError) -> str:
    with pytest.raises(kind) as e:
        snap.load_snapshot(path, lm, expected)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_and_not_a_cache_file(tmp_path, lm):
    assert "no such file" in refused(str(tmp_path / "nope"), lm)
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world, not a cache" * 10)
    assert "not a cascadectl cache file" in refused(str(junk), lm)
    junk.write_bytes(b"")
    assert "not a cascadectl cache file" in refused(str(junk), lm)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(junk), metadata={"a": "b"})
    assert "not one cascadectl wrote" in refused(str(junk), lm)
    assert "directory" in refused(str(tmp_path), lm)


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated(tmp_path, lm, cut):
    path = saved(tmp_path, lm)
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    keep = 8 + n // 2 if cut == "header" else len(data) - cut
    open(path, "wb").write(data[:keep])
    assert "truncated" in refused(path, lm)


def test_flipped_byte_and_edited_metadata(tmp_path, lm):
    path = saved(tmp_path, lm)
    data = bytearray(open(path, "rb").read())
    data[-7] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert "checksum" in refused(path, lm)
    path = saved(tmp_path, lm)
    rewrite(path, lambda m: m["cache"].update(seen=m["cache"]["seen"] + 1), resign=False)
    assert "checksum" in refused(path, lm)


def test_other_format_version(tmp_path, lm):
    path = saved(tmp_path, lm)
    rewrite(path, lambda m: m.update(version=2), resign=True)
    assert "version 2" in refused(path, lm)


def test_other_model_dtype_and_settings(tmp_path, lm):
    other = loaded(lm.model, model_hash="1" * 64)
    path = saved(tmp_path, other)
    assert "`model`" in refused(path, lm, kind=ConfigError)
    path = saved(tmp_path, lm)
    bf16 = LoadedModel(**{**lm.__dict__, "dtype": torch.bfloat16})
    assert "`dtype=fp32`" in refused(path, bf16, kind=ConfigError)
    msg = refused(path, lm, {"cache_size": 64, "stride": 8}, kind=ConfigError)
    assert "`cache_size=32`" in msg and "64" in msg
    assert "`beta=" in refused(path, lm, {"beta": 0.5}, kind=ConfigError)


def test_well_signed_but_inconsistent_file(tmp_path, lm):
    """A file whose checksum matches but whose state cannot be (a hand-made file) is refused, not crashed on."""
    path = saved(tmp_path, lm)
    rewrite(path, lambda m: m["cache"].update(start=[99, 0, 0, 0]), resign=True)
    assert "not a usable" in refused(path, lm)
    path = saved(tmp_path, lm)
    rewrite(path, lambda m: m["settings"].update(cache_size=64), resign=True)
    assert "not a usable" in refused(path, lm)
    path = saved(tmp_path, lm)
    rewrite(path, lambda m: m["settings"].update(stride=-1), resign=True)
    assert "bad cache settings" in refused(path, lm)


@functools.lru_cache(maxsize=1)
def small_file() -> tuple[LoadedModel, bytes]:
    lm = loaded(tiny_model("llama", num_hidden_layers=1))
    config = CacheConfig(policy="sink", cache_size=4, sinks=1, stride=4)
    path = os.path.join(tempfile.mkdtemp(), "c")
    with Runner(lm.model, config) as runner:
        runner.step(torch.tensor([[1, 2, 3]]))
        snap.save_snapshot(path, runner.cache, lm, config)
    return lm, open(path, "rb").read()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_never_crash_the_loader(tmp_path, data):
    """Random edits anywhere in a valid file (and random bytes) give a one-line CascadeError, nothing else."""
    lm, valid = small_file()
    path = str(tmp_path / "c")
    raw = bytearray(valid)
    if data.draw(st.booleans()):
        raw = bytearray(data.draw(st.binary(max_size=300)))
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    open(path, "wb").write(bytes(raw))
    try:
        snap.load_snapshot(path, lm)
    except CascadeError as e:
        assert "\n" not in str(e)


# ----------------------------------------------------------------------------------------------------- atomicity


def no_leftovers(directory) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".tmp")]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing(tmp_path, lm, monkeypatch, failure):
    config = CONFIGS["cascade"]
    path = tmp_path / "c.safetensors"
    with Runner(lm.model, config) as runner:
        runner.step(torch.tensor([[1, 2, 3]]))

        def boom(fd):
            raise failure

        monkeypatch.setattr(snap.os, "fsync", boom)
        if isinstance(failure, OSError):
            with pytest.raises(CascadeError, match="no space left|No space left") as e:
                snap.save_snapshot(str(path), runner.cache, lm, config)
            assert str(path) in str(e.value)
        else:
            with pytest.raises(KeyboardInterrupt):
                snap.save_snapshot(str(path), runner.cache, lm, config)
    assert not path.exists() and no_leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path, lm, monkeypatch):
    path = saved(tmp_path, lm, meta={"v": 1})
    before = open(path, "rb").read()

    def half(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CascadeError):
        snap.write_atomic(path, half)
    assert open(path, "rb").read() == before and no_leftovers(tmp_path) == []


def test_missing_directory(tmp_path, lm):
    with Runner(lm.model, CONFIGS["sink"]) as runner:
        with pytest.raises(CascadeError, match="does not exist"):
            snap.save_snapshot(str(tmp_path / "no" / "c"), runner.cache, lm, CONFIGS["sink"])
    assert os.listdir(tmp_path) == []
