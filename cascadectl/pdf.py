"""PDF text for the input layer (cascadectl/inputs.py), one page at a time: pypdf kept quiet, and what it
cannot read turned into a `PdfProblem` with a one-line reason and advice. pypdf is imported only when a PDF is
read, so a text-only run never pays for it."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from .inputs import InputReport

@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Keep pypdf's recoverable-problem chatter off stderr. Never held across a `yield` of ours."""
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PdfProblem(Exception):
    """A PDF cannot be read; `reason` is the short form for the report, `message` the full one-line advice."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _open_pdf(fh: BinaryIO, path: str) -> tuple[Any, int]:
    """A decrypted `PdfReader` over the open file `fh` and its page count, or `PdfProblem`."""
    from pypdf import PdfReader  # imported here: a text-only run should not pay for importing pypdf
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    # pypdf is third-party code parsing untrusted bytes; any exception it raises means "this file is broken".
    try:
        with _quiet_pypdf():
            # A file object (not the path): given a path, pypdf reads the whole file into memory.
            reader = PdfReader(fh)
            if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
                raise PdfProblem(
                    "password-protected PDF",
                    f"{path} is password-protected; decrypt it first (e.g. qpdf --decrypt --password=... "
                    f"{path} decrypted.pdf) and pass the decrypted copy",
                )
            n_pages = len(reader.pages)  # loads the page tree, so that a broken one is reported as such
    except PdfProblem:
        raise
    except DependencyError as exc:
        raise PdfProblem(
            "encrypted PDF needs the 'cryptography' package",
            f"{path} uses encryption that needs an extra package ({one_line(exc)}); "
            "install it with `pip install cryptography` or decrypt the file first (e.g. qpdf --decrypt)",
        ) from exc
    except Exception as exc:
        raise PdfProblem(
            "PDF could not be parsed",
            f"{path} could not be parsed as a PDF ({one_line(exc)}); check that the file is complete or re-save it",
        ) from exc
    return reader, n_pages


def _no_surrogates(text: str) -> str:
    """Replace lone surrogates (from broken font maps) with U+FFFD: they cannot be encoded, hashed or tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return text


def iter_pdf_pages(fh: BinaryIO, path: str, report: InputReport) -> Iterator[tuple[int, str]]:
    """Yield `(page_number, text)` for each page with text, extracting one page per step.

    A page whose extraction fails is recorded as skipped; a file with no text at all raises `PdfProblem`.
    """
    reader, n_pages = _open_pdf(fh, path)
    n_failed = 0
    any_text = False
    for index in range(n_pages):
        try:
            with _quiet_pypdf():
                text = _no_surrogates(reader.pages[index].extract_text() or "")
        except Exception as exc:  # one bad page (odd font, broken stream) should not lose the rest of the book
            n_failed += 1
            report.skip(f"{path} page {index + 1}", f"text extraction failed: {one_line(exc, 80)}")
            continue
        report.pages_read += 1
        if text.strip():
            any_text = True
            yield index + 1, text
    if not any_text:
        if n_pages and n_failed == n_pages:
            raise PdfProblem(
                "PDF could not be parsed",
                f"{path} could not be parsed: text extraction failed on every page; try re-saving or converting it",
            )
        raise PdfProblem(
            "PDF has no extractable text",
            f"{path} has no extractable text (scanned images?); run OCR on it first (e.g. ocrmypdf {path} ocr.pdf)",
        )
