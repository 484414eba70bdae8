"""Fuzz target (d): the cache-file loader (engine/snapshot.py, behind `--load-cache`, `--resume`).

Seeds are real snapshots of a one-layer model's cascade, sink and full caches. Two kinds of mutation: raw bytes
(flips, cuts, inserted and spliced ranges, a wrong header length), and re-signed edits that keep the checksum valid
(any metadata value replaced or removed, a tensor's dtype or shape swapped for one of the same size, a tensor
dropped), which reach the checks behind the checksum: a file can be signed by anyone, the checksum only catches
accidents. Property: `load_snapshot` raises only `CascadeError` (one line), never unpickles anything, and a cache
it accepts can take the next chunk through the model.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import traceback

import pytest
import torch
from hypothesis import strategies as st

from engine.config import CacheConfig
from engine.errors import CascadeError
from engine.runner import Runner
from engine.reading import ingest
from tests.fuzz.budget import QUICK_EXAMPLES, fuzz_for, per_example_timeout
from tests.fuzz.hostile import fast_lm

snapshot = pytest.importorskip("engine.snapshot", reason="the cache-file loader has not landed")

SETTINGS = dict(cache_size=32, cascades=4, sinks=4, stride=16)
VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64, -1, -7, None, True, False, 0.5, "x", "", [], {}, [1, 2],
          "cascade", "sink", "full", "float32", "bfloat16", "I64", "F32"]
SAME_SIZE = {"F32": ["I32"], "I32": ["F32"], "I64": ["F64"], "F64": ["I64"], "BF16": ["F16"], "F16": ["BF16"],
             "U8": ["BOOL"], "BOOL": ["U8"]}


@functools.cache
def lm():
    return fast_lm()


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """Real snapshot files of each policy, after 100 tokens (the cascade has evicted by then)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for policy in ("cascade", "sink", "full"):
            config = CacheConfig(policy=policy, **SETTINGS)
            with Runner(lm().model, config, expected_tokens=128) as runner:
                ingest(runner, [1, 2, 3, 4], [list(range(5, 105))])
                path = os.path.join(tmp, policy)
                snapshot.save_snapshot(path, runner.cache, lm(), config, {"kind": "ingest", "n": [1, 2]},
                                       {"carry": torch.zeros(3)})
                with open(path, "rb") as f:
                    out.append(f.read())
    return tuple(out)


# --- mutations -----------------------------------------------------------------------------------------------------


def split(data: bytes) -> tuple[dict, dict, list[tuple[str, dict, bytes]]]:
    """(metadata, signature entries, [(name, table entry, bytes)]) of a valid snapshot file."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    signature = header.pop("__metadata__")
    body = data[8 + n :]
    tensors = [(name, entry, body[entry["data_offsets"][0] : entry["data_offsets"][1]])
               for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])]
    return json.loads(signature["cascadectl"]), signature, tensors


def signed(meta: dict, tensors: list[tuple[str, dict, bytes]]) -> bytes:
    """A file with this content and a valid checksum, laid out as the writer does (docs/FORMATS.md)."""
    meta_json = json.dumps(meta, sort_keys=True)
    table, offset = {}, 0
    for name, entry, blob in tensors:
        table[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
    h = hashlib.sha256(meta_json.encode())
    h.update(b"\0" + json.dumps(table, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for _, _, blob in tensors:
        h.update(blob)
    header = json.dumps({"__metadata__": {"cascadectl": meta_json, "sha256": h.hexdigest()}, **table},
                        separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"".join(blob for _, _, blob in tensors)


def leaves(obj, path=()):
    """Paths to every value inside nested dicts/lists."""
    yield path
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, (*path, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from leaves(value, (*path, i))


@st.composite
def resigned(draw, data: bytes) -> bytes:
    meta, _, tensors = split(data)
    tensors = [list(t) for t in tensors]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "set", "delete", "dtype", "shape", "drop"]))
        if op in ("set", "delete"):
            path = draw(st.sampled_from([p for p in leaves(meta) if p]))
            parent = meta
            for key in path[:-1]:
                parent = parent[key]
            if op == "set":
                parent[path[-1]] = draw(st.sampled_from(VALUES))
            elif isinstance(parent, dict):
                del parent[path[-1]]
        elif tensors:
            i = draw(st.integers(0, len(tensors) - 1))
            name, entry, blob = tensors[i]
            entry = dict(entry)
            if op == "dtype" and entry["dtype"] in SAME_SIZE:
                entry["dtype"] = draw(st.sampled_from(SAME_SIZE[entry["dtype"]]))
            elif op == "shape" and entry["shape"]:
                entry["shape"] = list(reversed(entry["shape"])) if draw(st.booleans()) else [*entry["shape"], 1]
            elif op == "drop":
                del tensors[i]
                continue
            tensors[i] = [name, entry, blob]
    return signed(meta, [tuple(t) for t in tensors])


@st.composite
def raw(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "splice", "length"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "splice":
            other = draw(st.sampled_from(seeds()))
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + 64] = other[start : start + draw(st.integers(1, 256))]
        elif op == "length" and len(data) >= 8:
            data[:8] = draw(st.sampled_from([0, 1, 7, 8, 2**24, 2**63, len(data)])).to_bytes(8, "little")
    return bytes(data)


FILES = st.sampled_from(range(3)).flatmap(lambda i: st.one_of(
    raw(seeds()[i]), resigned(seeds()[i]), st.binary(max_size=300)))


# Open findings of this target in engine/snapshot.py (docs/ROBUSTNESS.md), as (exception type, innermost function):
# while a finding is open, pin it with an xfail test and list it here, so that the fuzz run keeps looking for others.
KNOWN: set = set()  # both earlier findings (a dict as dtype; a non-numeric cache_size in a `full` file) are fixed


def known(exc: BaseException) -> bool:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return (type(exc), frame.name) in KNOWN


def check(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp, per_example_timeout(30):
        path = os.path.join(tmp, "x.kv")
        with open(path, "wb") as f:
            f.write(data)
        try:
            snap = snapshot.load_snapshot(path, lm())
        except CascadeError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        except TypeError as exc:
            if known(exc):
                return
            raise
        # Accepted: the cache must take the next chunk (a file can be signed by anyone).
        with Runner(lm().model, snapshot.config_of(snap.meta), n_sinks=snap.meta["n_sinks"]) as runner:
            runner.replace_cache(snap.cache)
            try:
                runner.step(torch.tensor([[5, 6, 7]]))
            except CascadeError:
                pass
            except TypeError as exc:
                if not known(exc):
                    raise


def _edited(policy: int, edit) -> str:
    """Path of a re-signed copy of seed `policy` (0 cascade, 1 sink, 2 full) with `edit(meta)` applied."""
    meta, _, tensors = split(seeds()[policy])
    edit(meta)
    path = os.path.join(tempfile.mkdtemp(), "edited.kv")
    with open(path, "wb") as f:
        f.write(signed(meta, tensors))
    return path


def test_dtype_that_is_not_a_string_is_refused():
    with pytest.raises(CascadeError):
        snapshot.load_snapshot(_edited(0, lambda meta: meta.update(dtype={"x": 1})), lm())


def test_full_cache_file_with_a_non_numeric_size_is_refused():
    path = _edited(2, lambda meta: meta["settings"].update(cache_size="sink"))
    with pytest.raises(CascadeError):
        snapshot.load_snapshot(path, lm())


def test_fuzz_cache_quick():
    fuzz_for("cache-quick", FILES, check, examples=QUICK_EXAMPLES * 2)


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_cache():
    fuzz_for("cache", FILES, check)
