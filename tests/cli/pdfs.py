"""Hand-built PDFs for the input-layer tests: tiny, dependency-free, and readable by pypdf.

`write_pdf` writes the objects, the cross-reference table and the trailer itself, so the tests do not depend on any
PDF-producing library; pypdf's `PdfWriter` is only used to make encrypted copies of such a file.
"""
from __future__ import annotations

from pathlib import Path

from pypdf import PdfReader, PdfWriter


def _escape(text: str) -> str:
    """Escape a string for a PDF literal string `( ... )`; the standard 14 fonts only cover Latin-1."""
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _content_stream(text: str | None) -> bytes:
    """One line of `text` per `Tj`, 14 points apart, from the top left; None or "" draws a line and no text."""
    if not text:
        return b"0.5 w 72 700 m 300 700 l S\n"
    ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
    for i, line in enumerate(text.split("\n")):
        if i:
            ops.append("T*")
        ops.append(f"({_escape(line)}) Tj")
    ops.append("ET")
    return ("\n".join(ops) + "\n").encode("latin-1")


def pdf_bytes(pages: list[str | None]) -> bytes:
    """A minimal valid PDF 1.4 with one page per entry of `pages` (Helvetica text, or no text for None / "")."""
    n = len(pages)
    # Object numbers: 1 catalog, 2 page tree, 3 font, then (page, content) pairs.
    page_ids = [4 + 2 * i for i in range(n)]
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, text in enumerate(pages):
        content = _content_stream(text)
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"endstream")

    return assemble(objects)


def assemble(objects: list[bytes]) -> bytes:
    """Objects 1..n (the catalog is object 1), a correct cross-reference table and the trailer."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"  # each entry is exactly 20 bytes, hence the trailing space
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def write_pdf(path: Path, pages: list[str | None]) -> Path:
    """Write `pdf_bytes(pages)` to `path` and return it."""
    path.write_bytes(pdf_bytes(pages))
    return path


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
