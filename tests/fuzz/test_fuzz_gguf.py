"""Fuzz target (e): the GGUF header check (engine/gguf.py, behind `--model FILE.gguf` and `ollama:`).

Seeds are real GGUFs written with gguf-py from tiny random models (F32 and Q8_0) and a synthetic one with nested
arrays, long strings and numeric arrays. Mutations: raw bytes (flips, cuts, inserted, deleted and spliced
ranges) and integers overwritten with extreme values (0, 1, 2^31, 2^32-1, 2^63, 2^64-1, ...) at random offsets
and at the header's counts, which reach the length, count and offset checks behind each field. Property:
`read_header` either raises `ModelFileError` (one line) or returns a header whose every tensor lies inside the
file; it never raises anything else, never runs past the time limit, and its memory stays within a small
multiple of the file size, whatever the counts and lengths claim.
"""
from __future__ import annotations

import functools
import os
import struct
import tempfile
import tracemalloc

import pytest
from hypothesis import strategies as st

from engine import gguf as gguf_file
from engine.errors import ModelFileError
from tests.engine.gguf_files import build_gguf, gguf_string, kv_string, kv_u32, tensor_info, write_gguf
from tests.engine.tiny import tiny_model
from tests.fuzz.budget import QUICK_EXAMPLES, fuzz_for, per_example_timeout

EXTREMES = [0, 1, 2, 3, 7, 8, 9, 13, 31, 32, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
            2**62, 2**63 - 1, 2**63, 2**64 - 1]


@functools.cache
def seeds() -> tuple[bytes, ...]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, qtype in (("llama", "F32"), ("qwen2", "Q8_0")):
            model = tiny_model(family, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16)
            path = os.path.join(tmp, f"{family}.gguf")
            write_gguf(model, path, qtype=qtype)
            with open(path, "rb") as f:
                out.append(f.read())
    nested = gguf_string("n") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 2) \
        + struct.pack("<IQ", 8, 2) + gguf_string("ab") + gguf_string("") + struct.pack("<IQ", 5, 3) + bytes(12)
    numbers = gguf_string("v") + struct.pack("<I", 9) + struct.pack("<IQ", 6, 4) + struct.pack("<4f", 1, 2, 3, 4)
    out.append(build_gguf([kv_string("general.architecture", "llama"), kv_u32("general.alignment", 64), nested,
                           numbers, kv_string("tokenizer.chat_template", "{{ x }}" * 50)],
                          [tensor_info("a", [64, 2]), tensor_info("b", [32], ggml_type=8, offset=512)],
                          bytes(1024), alignment=64))
    return tuple(out)


@st.composite
def raw(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "splice", "int", "int", "count"]))
        at = draw(st.integers(0, max(0, min(len(data), 4096) - 1)))  # the header lives in the first KiB or so
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(seeds()))
            start = draw(st.integers(0, min(len(other), 4096) - 1))
            data[at : at + 64] = other[start : start + draw(st.integers(1, 256))]
        elif op == "int":
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * width))
            data[at : at + width] = value.to_bytes(width, "little")
        elif op == "count" and len(data) >= 24:  # version, tensor count or kv count
            field = draw(st.sampled_from([(4, 4), (8, 8), (16, 8)]))
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * field[1]))
            data[field[0] : field[0] + field[1]] = value.to_bytes(field[1], "little")
    return bytes(data)


FILES = st.sampled_from(range(3)).flatmap(lambda i: st.one_of(raw(seeds()[i]), st.binary(max_size=300),
                                                              st.just(b"GGUF").map(lambda m: m + bytes(20))))


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, per_example_timeout(10):
        path = os.path.join(tmp, "x.gguf")
        with open(path, "wb") as f:
            f.write(data)
        tracemalloc.start()
        try:
            header = gguf_file.read_header(path)
        except ModelFileError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 4 * len(data) + (2 << 20), f"{peak} bytes traced for a {len(data)}-byte file"
        assert header.file_size == len(data) and isinstance(header.architecture, str)
        for t in header.tensors:
            assert header.data_start + t.offset + t.nbytes <= len(data)
        gguf_file.unreadable_types(header)
        gguf_file.cache_dtype(header)


def test_seeds_are_valid():
    for data in seeds():
        check(data)
        with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
            f.write(data)
            f.flush()
            assert gguf_file.read_header(f.name).tensors


def test_fuzz_gguf_quick():
    fuzz_for("gguf-quick", FILES, check, examples=QUICK_EXAMPLES * 2)


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_gguf():
    fuzz_for("gguf", FILES, check)
