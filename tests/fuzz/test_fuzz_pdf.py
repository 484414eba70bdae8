"""Fuzz target (b): mutated PDFs through the PDF page iteration of cascadectl/inputs.py.

Seeds are valid generated PDFs (plain, several pages, images only, rewritten by pypdf with compressed streams,
encrypted with and without a user password). Each example applies a few structure-aware mutations (byte flips,
truncation, deleted or duplicated ranges, splices from another seed, numbers and PDF keywords swapped) and reads
the result. Property: given directly, only `InputError` (one line) escapes; inside a folder, the file is read or
skipped and never stops the walk; pages come out in order, as valid str; nothing is printed; no example takes
longer than the per-example limit (a hang is a failure).
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import strategies as st
from pypdf import PdfReader, PdfWriter

from cascadectl.inputs import InputError, InputReport, iter_segments
from tests.cli.pdfs import pdf_bytes, write_encrypted_copy
from tests.fuzz.budget import QUICK_EXAMPLES, fuzz_for, per_example_timeout
from tests.fuzz.hostile import image_only_pdf_bytes, sample_pdf

KEYWORDS = [b"obj", b"endobj", b"stream", b"endstream", b"xref", b"trailer", b"startxref", b"/Length", b"/Count",
            b"/Kids", b"/Root", b"/Pages", b"/Page", b"/Parent", b"/Contents", b"/Filter", b"/FlateDecode", b"R",
            b"<<", b">>", b"[", b"]", b"(", b")", b"Tj", b"TJ", b"BT", b"ET", b"/Encrypt", b"%%EOF", b"null"]
NUMBERS = [b"0", b"1", b"-1", b"2", b"7", b"65535", b"999999999", b"4294967296", b"1e9", b"3.5", b"00000"]


@functools.cache
def seeds() -> tuple[bytes, ...]:
    """Valid PDFs to start from, built once."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = os.path.join(tmp, "plain.pdf")
        with open(plain, "wb") as f:
            f.write(sample_pdf(3))
        buf = io.BytesIO()
        writer = PdfWriter(clone_from=PdfReader(plain))
        writer.compress_identical_objects()
        for page in writer.pages:
            page.compress_content_streams()  # FlateDecode streams: the filters are fuzzed too
        writer.write(buf)
        encrypted = [write_encrypted_copy(Path(plain), Path(tmp) / f"e{i}.pdf", user_password=pw).read_bytes()
                     for i, pw in enumerate(["", "pw"])]
    return (sample_pdf(1), sample_pdf(3), pdf_bytes(["one", None, "three (with parens) \\ and more"]),
            image_only_pdf_bytes(2), buf.getvalue(), *encrypted)


@st.composite
def mutated_pdf(draw) -> bytes:
    pool = seeds()
    data = bytearray(draw(st.sampled_from(pool)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "delete", "duplicate", "insert", "splice", "number",
                                   "keyword"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        span = draw(st.integers(1, 64))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[at] = draw(st.sampled_from(b"\x00\xff()<>/[]%0123456789 \n\r\\"))
        elif op == "cut":
            del data[at:]
        elif op == "delete":
            del data[at : at + span]
        elif op == "duplicate":
            data[at:at] = data[at : at + span]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "splice":
            other = draw(st.sampled_from(pool))
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + span] = other[start : start + draw(st.integers(1, 200))]
        elif op in ("number", "keyword"):
            pattern = rb"\d+" if op == "number" else b"|".join(re.escape(k) for k in KEYWORDS)
            matches = list(re.finditer(pattern, bytes(data)))
            if matches:
                m = draw(st.sampled_from(matches))
                data[m.start() : m.end()] = draw(st.sampled_from(NUMBERS if op == "number" else KEYWORDS))
    return bytes(data)


def check(data: bytes) -> None:
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(printed), \
            contextlib.redirect_stdout(printed), per_example_timeout(30):
        path = os.path.join(tmp, "doc.pdf")
        with open(path, "wb") as f:
            f.write(data)
        report = InputReport()
        try:
            segments = list(iter_segments([path], report=report))
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
            segments = None
        if segments is not None:
            pages = [s.page for s in segments if s.page is not None]
            assert pages == sorted(pages) and all(p >= 1 for p in pages)
            assert report.files_read == [path]
            "".join(s.text for s in segments).encode("utf-8")

        # Inside a folder, a bad PDF is skipped and the walk goes on to the next file.
        with open(os.path.join(tmp, "z-notes.txt"), "w") as f:
            f.write("notes")
        folder = InputReport()
        text = "".join(s.text for s in iter_segments([tmp], report=folder))
        assert text.endswith("notes")
        assert folder.files_read[-1].endswith("z-notes.txt")
        assert (path in folder.files_read) == (segments is not None)
        assert (path in folder.files_read) != any(skipped == path for skipped, _ in folder.skipped)
    assert printed.getvalue() == ""  # pypdf's complaints stay quiet


def test_fuzz_pdf_quick():
    fuzz_for("pdf-quick", mutated_pdf(), check, examples=QUICK_EXAMPLES)


@pytest.mark.slow
@pytest.mark.fuzz
def test_fuzz_pdf():
    fuzz_for("pdf", mutated_pdf(), check)
