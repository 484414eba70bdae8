"""Hand-built PDFs for the input-layer tests: tiny, dependency-free, and readable by pypdf.

`write_pdf` writes the objects, the cross-reference table and the trailer itself (bench/fixtures.py, which the
benchmarks share), so the tests do not depend on any PDF-producing library; pypdf's `PdfWriter` is only used to
make encrypted copies of such a file.
"""
from __future__ import annotations

from pathlib import Path

from pypdf import PdfReader, PdfWriter

from bench.fixtures import assemble, pdf_bytes, write_pdf  # noqa: F401 - the tests' names for them




def write_encrypted_copy(src: Path, dst: Path, user_password: str, owner_password: str = "owner") -> Path:
    """Copy `src` to `dst` encrypted with RC4-128, which pypdf handles without optional crypto packages.

    With `user_password=""` anyone can open the file (only the owner password restricts it), which is how many
    "protected" PDFs in the wild are made.
    """
    writer = PdfWriter(clone_from=PdfReader(src))
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="RC4-128")
    with dst.open("wb") as fh:
        writer.write(fh)
    return dst
