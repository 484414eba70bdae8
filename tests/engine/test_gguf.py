"""`--model FILE.gguf`: tiny GGUFs written here load with the same logits as the same weights in safetensors,
convert once into the cache keyed by their hash, carry their chat template; hostile files are refused in one
line, in bounded time and memory, before transformers or gguf-py parse them."""
from __future__ import annotations

import json
import shutil
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import gguf as gguf_file
from engine import models
from engine.errors import ConfigError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from tests.engine.gguf_files import (
    CHAT_TEMPLATE,
    as_converted,
    build_gguf,
    gguf_string,
    kv_string,
    kv_u32,
    tensor_info,
    write_gguf,
)
from tests.engine.tiny import tiny_model

FAMILIES = ["llama", "qwen2", "qwen3"]  # llama: q/k rows permuted by llama.cpp; qwen2: biases; qwen3: q/k norms


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """A fresh CASCADECTL_HOME per test: every conversion here is a first one."""
    home = tmp_path / "home"
    monkeypatch.setenv("CASCADECTL_HOME", str(home))
    return home


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ids(seed: int = 0, n: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def safetensors_dir(model, folder: Path, tokenizer_from: Path) -> Path:
    """The same weights as a `--model DIR` folder, with the tokenizer the GGUF conversion wrote."""
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def cache_of(lm) -> Path:
    return Path(lm.model.config.name_or_path)


# --- loading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_logits_of_the_same_weights_in_safetensors(tmp_path, family):
    reference = tiny_model(family, seed=3)
    path = write_gguf(reference, tmp_path / f"tiny-{family}.gguf")
    notes: list[str] = []
    lm = models.load_model(str(path), device="cpu", dtype="fp32", notify=notes.append)
    assert len(notes) == 1 and "convert" in notes[0]
    assert lm.family == family and lm.model_id == str(path) and lm.max_positions == 512
    assert lm.model_hash == models.gguf_sha256(path)
    cache = cache_of(lm)
    meta = json.loads((cache / models.CACHE_MARKER).read_text())
    assert meta["dtype"] == "float32" and meta["gguf_architecture"] == family
    assert cache.name == f"tiny-{family}-{lm.model_hash[:12]}"

    same = safetensors_dir(reference, tmp_path / "dir", cache)
    from_dir = models.load_model(str(same), device="cpu", dtype="fp32")
    for seed in range(2):
        x = ids(seed)
        got, want = logits(lm.model, x), logits(from_dir.model, x)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - logits(reference, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q8_0_gguf_gives_the_logits_of_its_dequantized_weights(tmp_path, family):
    """A quantized file is kept at bf16 in the cache: the reference is the de-quantized weights rounded so."""
    model = tiny_model(family, seed=4)
    path = write_gguf(model, tmp_path / "tiny-q8.gguf", qtype="Q8_0")
    lm = models.load_model(str(path), device="cpu", dtype="fp32")
    meta = json.loads((cache_of(lm) / models.CACHE_MARKER).read_text())
    assert meta["dtype"] == "bfloat16" and meta["tensor_types"]["Q8_0"] > 0
    reference = as_converted(model, "Q8_0")
    x = ids()
    assert (logits(lm.model, x) - logits(reference, x)).abs().max().item() <= 1e-4
    # and the quantization did change the weights, so the comparison above is not vacuous
    assert (logits(reference, x) - logits(tiny_model(family, seed=4), x)).abs().max().item() > 1e-4


def test_chat_template_comes_from_the_gguf_metadata(tmp_path):
    path = write_gguf(tiny_model("qwen2"), tmp_path / "chat.gguf")
    lm = models.load_model(str(path), device="cpu", dtype="fp32")
    assert lm.tokenizer.chat_template == CHAT_TEMPLATE
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                            tokenize=False)
    assert text == "<user>hi<assistant>"
    reloaded = models.load_model(str(path), device="cpu", dtype="fp32")  # from the cache
    assert reloaded.tokenizer.chat_template == CHAT_TEMPLATE


def test_second_load_reads_the_cache_only(tmp_path, monkeypatch):
    import gguf

    path = write_gguf(tiny_model("llama"), tmp_path / "once.gguf")
    first = models.load_model(str(path), device="cpu", dtype="fp32")

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached reload parsed or converted the GGUF")

    monkeypatch.setattr(gguf_file, "read_header", forbidden)  # the first step of every conversion
    monkeypatch.setattr(gguf, "GGUFReader", forbidden)
    notes: list[str] = []
    second = models.load_model(str(path), device="cpu", dtype="fp32", notify=notes.append)
    assert notes == [] and second.model_hash == first.model_hash  # the hash came from its side file
    assert torch.equal(logits(first.model, ids()), logits(second.model, ids()))


def test_cache_is_keyed_by_the_file_hash(tmp_path, home):
    path = tmp_path / "same-name.gguf"
    write_gguf(tiny_model("llama", seed=1), path)
    a = models.load_model(str(path), device="cpu", dtype="fp32")
    time.sleep(0.01)  # a new mtime, so that the remembered hash is not trusted
    write_gguf(tiny_model("llama", seed=2), path)
    b = models.load_model(str(path), device="cpu", dtype="fp32")
    assert a.model_hash != b.model_hash and cache_of(a) != cache_of(b)
    assert not torch.equal(logits(a.model, ids()), logits(b.model, ids()))
    caches = sorted(p.name for p in (home / "models").iterdir() if p.is_dir())
    assert caches == sorted([cache_of(a).name, cache_of(b).name])  # no temp dir left behind


def test_interrupted_conversion_leaves_no_cache(tmp_path, home, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    path = write_gguf(tiny_model("llama"), tmp_path / "cut.gguf")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)  # after the weights were written
    with pytest.raises(ConfigError, match="CASCADECTL_HOME"):
        models.load_model(str(path), device="cpu", dtype="fp32")
    assert [p for p in (home / "models").iterdir() if p.is_dir()] == []
    monkeypatch.undo()
    assert models.load_model(str(path), device="cpu", dtype="fp32").family == "llama"


def test_a_file_given_as_model_that_is_no_gguf(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text, long enough to pass the size check")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        models.load_model(str(path), device="cpu")


def test_a_folder_of_ggufs_points_at_the_file(tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "only.gguf")
    with pytest.raises(ModelNotFoundError, match=f"pass the file itself, e.g. --model {path}"):
        models.load_model(str(tmp_path), device="cpu")


# --- what transformers cannot read -----------------------------------------------------------------------------


def test_quantisation_type_transformers_cannot_read(tmp_path):
    """Q8_K (llama.cpp's intermediate type) has no de-quantizer in gguf-py: refused before any weight is read."""
    blocks = np.zeros((4, 292), dtype=np.uint8)  # 4 rows of one 256-value Q8_K block each
    path = write_gguf(tiny_model("llama"), tmp_path / "q8k.gguf", extra={"blk.0.extra.weight": (blocks, "Q8_K")})
    with pytest.raises(UnsupportedModelError) as e:
        models.load_model(str(path), device="cpu")
    message = str(e.value)
    assert "Q8_K" in message and "cannot de-quantize" in message and "Q4_K" in message and "\n" not in message


def test_architecture_transformers_reads_but_cascadectl_does_not(tmp_path):
    data = build_gguf([kv_string("general.architecture", "gpt2"), kv_u32("gpt2.context_length", 64),
                       kv_u32("gpt2.embedding_length", 8), kv_u32("gpt2.block_count", 1),
                       kv_u32("gpt2.feed_forward_length", 16), kv_u32("gpt2.attention.head_count", 2)])
    path = tmp_path / "gpt2.gguf"
    path.write_bytes(data)
    with pytest.raises(UnsupportedModelError) as e:
        models.load_model(str(path), device="cpu")
    assert "'gpt2'" in str(e.value)
    for family in models.SUPPORTED_FAMILIES:
        assert family in str(e.value)


def test_architecture_transformers_cannot_read_from_a_gguf(tmp_path):
    path = tmp_path / "bert.gguf"
    path.write_bytes(build_gguf([kv_string("general.architecture", "bert")]))
    with pytest.raises(UnsupportedModelError, match="'bert' GGUF, which transformers cannot read"):
        models.load_model(str(path), device="cpu")


def test_metadata_describing_a_far_larger_model_is_refused_before_allocating(tmp_path):
    """embedding_length 61440 over tiny tensors would make transformers allocate a ~30 GB model first."""
    path = write_gguf(tiny_model("llama"), tmp_path / "liar.gguf",
                      lie={"embedding_length": 61440, "feed_forward_length": 65536})
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError, match="describes a .*-parameter model"):
            models.load_model(str(path), device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20


def test_tensor_shapes_that_disagree_with_the_metadata(tmp_path):
    """A header that is well formed but whose tensors do not fit the model it describes: one line, no report."""
    path = write_gguf(tiny_model("qwen2"), tmp_path / "shapes.gguf", lie={"attention.head_count_kv": 3})
    with pytest.raises(ModelFileError, match="tensor shapes do not match the model its metadata describes") as e:
        models.load_model(str(path), device="cpu")
    assert "\n" not in str(e.value)


# --- hostile headers -------------------------------------------------------------------------------------------

ARCH = kv_string("general.architecture", "llama")
BIG = 2**63 - 1


def _kv_raw(key: str, value_type: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + payload


HOSTILE = {
    "empty": (b"", "only 0 bytes"),
    "magic": (b"GGML" + bytes(60), "does not start with the GGUF magic"),
    "version 1": (build_gguf([ARCH], version=1), "version 1 is not supported"),
    "version 99": (build_gguf([ARCH], version=99), "version 99"),
    "absurd tensor count": (build_gguf([ARCH], tensor_count=BIG), "more than its"),
    "absurd kv count": (build_gguf([ARCH], kv_count=2**40), "more than its"),
    "key length": (build_gguf([gguf_string("k", length=2**62)]), "metadata key 0 is"),
    "string length": (build_gguf([ARCH, gguf_string("general.name") + struct.pack("<I", 8)
                                  + gguf_string("x", length=2**60)]), "runs past the end"),
    "array length": (build_gguf([ARCH, _kv_raw("a", 9, struct.pack("<IQ", 4, 2**61))]), "runs past the end"),
    "string array length": (build_gguf([ARCH, _kv_raw("a", 9, struct.pack("<IQ", 8, 10**6))]),
                            "runs past the end"),
    "nested arrays": (build_gguf([ARCH, _kv_raw("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1)
                                                + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]),
                      "nests arrays"),
    "unknown value type": (build_gguf([ARCH, _kv_raw("a", 13, bytes(8))]), "unknown value type 13"),
    "unknown array type": (build_gguf([ARCH, _kv_raw("a", 9, struct.pack("<IQ", 77, 1))]), "unknown value type 77"),
    "duplicate key": (build_gguf([ARCH, ARCH]), "appears twice"),
    "key not utf-8": (build_gguf([ARCH, gguf_string(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "not UTF-8"),
    "no architecture": (build_gguf([kv_u32("general.alignment", 32)]), "no general.architecture"),
    "alignment": (build_gguf([ARCH, kv_u32("general.alignment", 3)]), "not a power of two"),
    "unknown tensor type": (build_gguf([ARCH], [tensor_info("t", [32], ggml_type=99)], bytes(128)),
                            "unknown type id 99"),
    "removed tensor type": (build_gguf([ARCH], [tensor_info("t", [32], ggml_type=4)], bytes(128)),
                            "unknown type id 4"),
    "too many dims": (build_gguf([ARCH], [tensor_info("t", [1] * 9)]), "9 dimensions"),
    "zero dim": (build_gguf([ARCH], [tensor_info("t", [4, 0])]), "zero dimension"),
    "absurd shape": (build_gguf([ARCH], [tensor_info("t", [2**40, 2**40])]), "larger than the file"),
    "partial block": (build_gguf([ARCH], [tensor_info("t", [33, 2], ggml_type=2)], bytes(64)), "whole blocks"),
    "data past the end": (build_gguf([ARCH], [tensor_info("t", [40])], bytes(64)), "ends past the end"),
    "offset past the end": (build_gguf([ARCH], [tensor_info("t", [8], offset=2**62)], bytes(64)),
                            "ends past the end"),
    "misaligned": (build_gguf([ARCH], [tensor_info("t", [8], offset=4)], bytes(64)), "not a multiple"),
    "overlap": (build_gguf([ARCH], [tensor_info("a", [16]), tensor_info("b", [16], offset=32)], bytes(128)),
                "overlaps"),
    "duplicate tensor": (build_gguf([ARCH], [tensor_info("t", [8]), tensor_info("t", [8], offset=32)], bytes(64)),
                         "appears twice"),
    "tensor name": (build_gguf([ARCH], [tensor_info("t" * 65, [8])], bytes(64)), "is 65 bytes long"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_header_is_one_line_in_bounded_time_and_memory(tmp_path, case):
    data, message = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ModelFileError) as e:
            models.load_model(str(path), device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(e.value) and "\n" not in str(e.value)
    assert time.monotonic() - start < 5 and peak < 16 << 20


def test_every_truncation_of_a_real_file_is_refused(tmp_path):
    """Cut a tiny but complete GGUF at many points: the header check refuses each before anything else runs."""
    whole = write_gguf(tiny_model("llama"), tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    for end in sorted({*range(0, 4096, 97), *range(len(whole) - 4096, len(whole), 389), len(whole) - 1}):
        cut.write_bytes(whole[:end])
        with pytest.raises(ModelFileError) as e:
            gguf_file.read_header(cut)
        assert "\n" not in str(e.value)
    assert gguf_file.read_header(tmp_path / "whole.gguf").architecture == "llama"


def test_header_of_the_embedded_gguf():
    header = gguf_file.read_header(models.find_embedded_gguf())
    assert header.architecture == "llama" and header.version == 3 and len(header.tensors) == 272
    assert gguf_file.unreadable_types(header) == [] and gguf_file.cache_dtype(header) == "bfloat16"
    assert header.chat_template and "im_start" in header.chat_template
    assert header.metadata["tokenizer.ggml.tokens"] == gguf_file.GgufSkipped(8, 49152)
