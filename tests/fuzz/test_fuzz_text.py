"""Fuzz target (a): arbitrary and mutated bytes through the text path of cascadectl/inputs.py.

Property: for any bytes, read as stdin or as a file, with any block sizes, `iter_segments` either raises
`InputError` (PDF on a pipe, binary, no text) or yields text that equals a one-shot decode of the whole input with
the codec its byte-order mark names, with the replaced sequences counted exactly, segments within
`MAX_SEGMENT_CHARS`, no lone surrogates, and hash and counters that agree with the text.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import os
import tempfile
from unittest import mock

import pytest
from hypothesis import strategies as st

from cascadectl import inputs
from cascadectl.inputs import InputError, InputReport, iter_segments
from tests.fuzz.budget import QUICK_EXAMPLES, fuzz_for, per_example_timeout

BOMS = {  # the byte-order marks the input layer honours, longest first (UTF-32 LE starts with UTF-16 LE's)
    codecs.BOM_UTF32_LE: "utf-32", codecs.BOM_UTF32_BE: "utf-32", codecs.BOM_UTF8: "utf-8-sig",
    codecs.BOM_UTF16_LE: "utf-16", codecs.BOM_UTF16_BE: "utf-16",
}


def reference(data: bytes) -> tuple[str, int]:
    """(text, replaced sequences) of `data` decoded in one go, by the documented rules, independently of inputs.py."""
    encoding = next((enc for bom, enc in BOMS.items() if data.startswith(bom)), "utf-8")
    replaced = [0]

    def count(exc: UnicodeError):
        replaced[0] += 1
        return "\ufffd", exc.end  # type: ignore[attr-defined]

    codecs.register_error("fuzz-reference", count)
    return codecs.decode(data, encoding, "fuzz-reference"), replaced[0]


# --- inputs --------------------------------------------------------------------------------------------------------

ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]


@st.composite
def mutated_text(draw) -> bytes:
    """Real text in some encoding (with or without a BOM), then a few byte flips, cuts and splices."""
    text = draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=300))
    data = bytearray(text.encode(draw(st.sampled_from(ENCODINGS))))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "bom", "drop"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=6))
        elif op == "bom":
            data[0:0] = draw(st.sampled_from(list(BOMS)))
        elif op == "drop" and data:
            del data[at : at + draw(st.integers(1, 3))]
    return bytes(data)


CASES = st.tuples(
    st.one_of(st.binary(max_size=600), mutated_text(), st.binary(max_size=40).map(lambda tail: b"%PDF-" + tail)),
    st.integers(5, 64),  # SNIFF_BYTES (>= 5 so that "%PDF-" and any BOM fit in the sniffed head, as at 8 KiB)
    st.integers(1, 64),  # READ_BLOCK_BYTES
    st.integers(1, 50),  # MAX_SEGMENT_CHARS
    st.booleans(),  # through a file rather than stdin
)


def check(case) -> None:
    data, sniff, block, max_chars, as_file = case
    report = InputReport()
    with mock.patch.multiple(inputs, SNIFF_BYTES=sniff, READ_BLOCK_BYTES=block, MAX_SEGMENT_CHARS=max_chars), \
            tempfile.TemporaryDirectory() as tmp, per_example_timeout(20):
        path = os.path.join(tmp, "input.txt")
        if as_file:
            with open(path, "wb") as f:
                f.write(data)
        try:
            segments = list(iter_segments([path] if as_file else ["-"], stdin=io.BytesIO(data), report=report))
        except InputError as exc:
            message = str(exc)
            assert message and "\n" not in message
            expect_error(data, sniff, as_file, message)
            return
    out = "".join(s.text for s in segments)
    text, replaced = reference(data)
    assert not data.startswith(b"%PDF-")
    assert out == text
    assert report.replaced_bytes == replaced
    assert all(0 < len(s.text) <= max_chars for s in segments)
    out.encode("utf-8")  # no lone surrogates: they cannot be tokenized or hashed
    assert report.chars_emitted == len(out) and report.bytes_read == len(data)
    assert report.text_sha256 == hashlib.sha256(out.encode()).hexdigest()


def expect_error(data: bytes, sniff: int, as_file: bool, message: str) -> None:
    """The error is the one the documented rules predict for these bytes."""
    head = data[:sniff]
    if data.startswith(b"%PDF-"):
        assert as_file or "is a PDF" in message  # a file goes to the PDF reader, whose refusals vary
    elif b"\0" in head and not any(head.startswith(bom) for bom in BOMS if BOMS[bom] != "utf-8-sig"):
        assert "looks binary" in message
    else:
        assert reference(data)[0] == "" and "no text in the input" in message


def test_fuzz_text_quick():
    fuzz_for("text-quick", CASES, check, examples=QUICK_EXAMPLES * 3)


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_text():
    fuzz_for("text", CASES, check)
