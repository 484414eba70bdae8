"""The input layer: turn files, folders, PDFs and stdin into one lazy stream of bounded text segments.

`iter_segments` is the only thing the engine-facing code needs. It reads one block (or one PDF page) at a time, so
memory stays bounded however long the input is, and it marks file and page boundaries in the text so that the model
(and the user reading its answer) can tell where a passage came from. Problems the user can fix raise `InputError`
with a one-line message; problems that only affect part of a folder are recorded in an `InputReport` and skipped.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import stat
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .pdf import PdfProblem, iter_pdf_pages, one_line

__all__ = [
    "FILE_HEADER",
    "InputError",
    "InputReport",
    "MAX_SEGMENT_CHARS",
    "PAGE_HEADER",
    "STDIN_SOURCE",
    "Segment",
    "is_pdf",
    "iter_segments",
    "looks_binary",
    "sources_label",
    "total_bytes_estimate",
    "walk",
]

# Markers the model reads between files and PDF pages. Other code (e.g. citing a page in an answer) can parse them.
FILE_HEADER = "\n\n### File: {path}\n\n"
PAGE_HEADER = "\n\n### Page {page}\n\n"
STDIN_SOURCE = "<stdin>"

MAX_SEGMENT_CHARS = 64 * 1024  # upper bound on `Segment.text` length, in characters
READ_BLOCK_BYTES = 64 * 1024  # read size for text files and stdin; looked up at call time so tests can shrink it
SNIFF_BYTES = 8 * 1024  # how much of a file decides "PDF / text / binary"

_PDF_MAGIC = b"%PDF-"
_ERRORS = "cascadectl-count-replace"  # codec error handler: like "replace", but counts what it replaces


class InputError(Exception):
    """The input cannot be read as given. The message is one line, names the file, and says what to change."""


@dataclass(frozen=True)
class Segment:
    """A piece of the text stream: at most `MAX_SEGMENT_CHARS` characters from `source` (and PDF `page`, 1-based).

    Header markers (`FILE_HEADER`, `PAGE_HEADER`) are segments too, attributed to the file / page they introduce.
    """

    text: str
    source: str
    page: int | None = None


@dataclass
class InputReport:
    """What `iter_segments` read and skipped, filled in as the iteration goes.

    `replaced_bytes` counts the invalid byte sequences that decoding replaced with U+FFFD (one per maximal invalid
    sequence, as Python's "replace" error handler does); U+FFFD characters already present in the input are not
    counted. `bytes_read` counts raw bytes of text files and stdin, plus the size of each PDF read.
    `chars_emitted` counts the characters of text emitted, header markers excluded; `has_text` says whether any of
    them is not whitespace. Files that gave no text (empty ones, PDFs without text) are in `skipped`, not in
    `files_read`; so are single PDF pages whose extraction failed.
    """

    files_read: list[str] = field(default_factory=list)
    pages_read: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    replaced_bytes: int = 0
    bytes_read: int = 0
    chars_emitted: int = 0  # content characters, headers excluded
    has_text: bool = False  # some content character is not whitespace
    _sha256: Any = field(default_factory=hashlib.sha256, repr=False, compare=False)

    @property
    def text_sha256(self) -> str:
        """Hex SHA-256 of the UTF-8 encoding of all the text emitted so far, headers included."""
        return self._sha256.hexdigest()

    def skip(self, path: str, reason: str) -> None:
        """Record that `path` was not read, and why."""
        self.skipped.append((path, reason))


# --- decoding ----------------------------------------------------------------------------------------------------

# Codec error handlers are registered globally by name, so the handler finds the report to count into through a
# thread-local that is set only for the duration of each decode call (generators may interleave between calls).
_counting = threading.local()


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    report = getattr(_counting, "report", None)
    if report is not None:
        report.replaced_bytes += 1
    return "\ufffd", exc.end  # type: ignore[attr-defined]


codecs.register_error(_ERRORS, _count_and_replace)


def _decode(decoder: codecs.IncrementalDecoder, data: bytes, report: InputReport, final: bool = False) -> str:
    _counting.report = report
    try:
        return decoder.decode(data, final)
    finally:
        _counting.report = None


def _encoding_for(head: bytes) -> str:
    """Pick a codec from a byte-order mark; the BOM itself is consumed by the chosen decoder."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    # UTF-32 first: its little-endian BOM starts with the UTF-16 little-endian one.
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8"


def looks_binary(head: bytes) -> bool:
    """Do the first bytes of a file (up to `SNIFF_BYTES`) look like a binary file rather than text?

    A NUL byte means binary, unless a UTF-16/32 byte-order mark says the NULs are part of wide characters."""
    return b"\0" in head and _encoding_for(head) in ("utf-8", "utf-8-sig")


def _iter_text(fh: BinaryIO, head: bytes, report: InputReport) -> Iterator[str]:
    """Decode `head` and then the rest of `fh` block by block, yielding non-empty strings."""
    decoder = codecs.getincrementaldecoder(_encoding_for(head))(errors=_ERRORS)
    report.bytes_read += len(head)
    text = _decode(decoder, head, report)
    if text:
        yield text
    while True:
        block = fh.read(READ_BLOCK_BYTES)
        if not block:
            break
        report.bytes_read += len(block)
        text = _decode(decoder, block, report)
        if text:
            yield text
    text = _decode(decoder, b"", report, final=True)  # a truncated trailing sequence becomes one U+FFFD
    if text:
        yield text


# --- files and folders ---------------------------------------------------------------------------------------------


def _chunks(text: str) -> Iterator[str]:
    for start in range(0, len(text), MAX_SEGMENT_CHARS):
        yield text[start : start + MAX_SEGMENT_CHARS]


def is_pdf(path: str, head: bytes) -> bool:
    """Is the file at `path`, starting with `head`, to be read as a PDF (magic bytes, or a .pdf name)?"""
    return head.startswith(_PDF_MAGIC) or path.lower().endswith(".pdf")


def _reason_for(exc: OSError) -> str:
    return f"unreadable: {exc.strerror or one_line(exc)}"


def _shown(path: str) -> str:
    """`path` as text that can be printed, hashed and tokenized.

    Python carries the undecodable bytes of a file name (e.g. Latin-1 names from an old archive) as lone
    surrogates, which UTF-8 cannot encode; they become backslash escapes such as `caf\\xe9.txt`."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        try:
            return os.fsencode(path).decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # surrogates that did not come from the file system
            return path.encode("utf-8", "backslashreplace").decode("utf-8")


def walk(root: str, report: InputReport, visited: set[tuple[int, int]]) -> Iterator[str]:
    """Regular files under `root`, depth first in name order; hidden, special and looping entries are skipped.

    Skipped entries are recorded in `report` with their reason. `visited` holds the (device, inode) of folders
    already walked, the root's included, so that a symlink back up the tree is followed once at most."""
    try:
        with os.scandir(root) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        report.skip(_shown(root), _reason_for(exc))
        return
    for entry in entries:
        path = os.path.normpath(entry.path)
        if entry.name.startswith("."):
            report.skip(_shown(path), "hidden")
            continue
        try:
            st = entry.stat()  # follows symlinks: a link to a file is read, a link to a folder is walked
        except FileNotFoundError:
            report.skip(_shown(path), "broken symlink")
            continue
        except OSError as exc:
            report.skip(_shown(path), _reason_for(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in visited:
                report.skip(_shown(path), "folder already read via another path (symlink)")
                continue
            visited.add(key)
            yield from walk(path, report, visited)
        elif stat.S_ISREG(st.st_mode):
            yield path
        else:  # FIFOs would block on open; sockets and devices are not documents
            report.skip(_shown(path), "not a regular file")


class _Stream:
    """Turns the sources into segments: headers, chunking, hashing and bookkeeping in one place."""

    def __init__(self, report: InputReport, headers: bool) -> None:
        self.report = report
        self.headers = headers

    def _segment(self, text: str, source: str, page: int | None, content: bool) -> Segment:
        self.report._sha256.update(text.encode("utf-8"))
        if content:
            self.report.chars_emitted += len(text)
            if not self.report.has_text and text and not text.isspace():  # checked until the first text is seen
                self.report.has_text = True
        return Segment(text, source, page)

    def file(self, path: str, direct: bool) -> Iterator[Segment]:
        """Segments of one file; `direct` files raise `InputError` where folder entries are skipped."""
        name = _shown(path)  # for everything but opening
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below; opening first separates open errors
        except OSError as exc:
            if not direct:
                self.report.skip(name, _reason_for(exc))
                return
            raise InputError(f"{name}: {exc.strerror or one_line(exc)}; check the file's permissions") from exc
        with fh:
            try:
                head = fh.read(SNIFF_BYTES)
            except OSError as exc:
                if not direct:
                    self.report.skip(name, _reason_for(exc))
                    return
                raise InputError(f"{name}: {exc.strerror or one_line(exc)}; check that the file is readable") from exc
            if is_pdf(path, head):
                yield from self._pdf(fh, name, direct)
            elif looks_binary(head):
                if direct:
                    raise InputError(f"{name} looks binary; give a text or PDF file")
                self.report.skip(name, "binary")
            else:
                yield from self._text(_iter_text(fh, head, self.report), name, direct)

    def stdin(self, stream: BinaryIO) -> Iterator[Segment]:
        """Segments of a binary stream read as text (stdin, or a pipe such as `<(cmd)` given as a path)."""
        return self._stream(stream, STDIN_SOURCE)

    def special(self, path: str) -> Iterator[Segment]:
        """A path given directly that is neither a folder nor a regular file (e.g. `<(cmd)`): read it like stdin."""
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the `with` below
        except OSError as exc:
            reason = exc.strerror or one_line(exc)
            raise InputError(f"{_shown(path)}: cannot be read ({reason}); give a text or PDF file") from exc
        with fh:
            yield from self._stream(fh, _shown(path))

    def _stream(self, stream: BinaryIO, source: str) -> Iterator[Segment]:
        try:
            head = stream.read(SNIFF_BYTES)
        except OSError as exc:  # e.g. stdin opened write-only (`0>file`) or a device that fails
            raise InputError(f"{source} cannot be read ({exc.strerror or one_line(exc)}); "
                             "give a file or pipe text in") from exc
        if head.startswith(_PDF_MAGIC):
            raise InputError(f"{source} is a PDF; PDFs cannot be piped, pass the file's path instead")
        if looks_binary(head):
            raise InputError(f"{source} looks binary; give a text or PDF file")
        yield from self._text(_iter_text(stream, head, self.report), source, direct=True)

    def _text(self, pieces: Iterator[str], source: str, direct: bool) -> Iterator[Segment]:
        started = False
        bytes_before = self.report.bytes_read
        try:
            for piece in pieces:
                if not started:
                    started = True
                    if self.headers:
                        yield self._segment(FILE_HEADER.format(path=source), source, None, content=False)
                for chunk in _chunks(piece):
                    yield self._segment(chunk, source, None, content=True)
        except OSError as exc:  # a read failing half-way (I/O error, a vanished network mount)
            done = self.report.bytes_read - bytes_before
            reason = f"{exc.strerror or one_line(exc)} after {done:,} bytes"
            if direct:
                raise InputError(f"{source}: reading failed ({reason}); copy the file somewhere readable") from exc
            self.report.skip(source, f"unreadable: {reason}")
            return
        if started:
            self.report.files_read.append(source)
        elif not direct:
            self.report.skip(source, "empty")

    def _pdf(self, fh: BinaryIO, path: str, direct: bool) -> Iterator[Segment]:
        if not fh.seekable():
            raise InputError(f"{path} is a PDF read from a pipe; save it to a file and pass that path instead")
        started = False
        try:
            for page, text in iter_pdf_pages(fh, path, self.report):
                if not started:
                    started = True
                    if self.headers:
                        yield self._segment(FILE_HEADER.format(path=path), path, None, content=False)
                yield self._segment(PAGE_HEADER.format(page=page), path, page, content=False)
                for chunk in _chunks(text):
                    yield self._segment(chunk, path, page, content=True)
        except PdfProblem as problem:
            if direct:
                raise InputError(problem.message) from problem.__cause__
            self.report.skip(path, problem.reason)
            return
        self.report.files_read.append(path)
        with contextlib.suppress(OSError):
            self.report.bytes_read += os.fstat(fh.fileno()).st_size

    def directory(self, root: str) -> Iterator[Segment]:
        """Segments of every readable file under `root`; `InputError` if none had text."""
        chars_before = self.report.chars_emitted
        skipped_before = len(self.report.skipped)
        st = os.stat(root)
        for path in walk(root, self.report, {(st.st_dev, st.st_ino)}):
            yield from self.file(path, direct=False)
        if self.report.chars_emitted == chars_before:
            skipped = self.report.skipped[skipped_before:]
            raise InputError(f"{_shown(root)}: no readable text in this folder ({_summarize(skipped)}); "
                             "point at a folder with text or PDF files")


def _summarize(skipped: list[tuple[str, str]]) -> str:
    """E.g. 'skipped 3 files: 2 binary, 1 hidden' - reasons cut at ':' so that similar errors group together."""
    if not skipped:
        return "it has no files"
    counts = Counter(reason.split(":")[0] for _, reason in skipped)
    parts = ", ".join(f"{n} {reason}" for reason, n in counts.most_common(4))
    if len(counts) > 4:
        parts += ", ..."
    return f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}: {parts}"


# --- public entry points -----------------------------------------------------------------------------------------


def iter_segments(
    sources: list[str], stdin: BinaryIO | None = None, report: InputReport | None = None
) -> Iterator[Segment]:
    """Lazily yield the text of `sources` in order, in segments of at most `MAX_SEGMENT_CHARS` characters.

    A source is a text file (UTF-8; UTF-16/32 or UTF-8 with a byte-order mark), a PDF (by extension or magic
    bytes; read page by page), a folder (walked recursively in name order, skipping hidden, binary, unreadable
    and special files), or "-" for `stdin` (default `sys.stdin.buffer`). A path that is neither a folder nor a
    regular file (e.g. a pipe from `<(cmd)`) is read as a text stream. Invalid UTF-8 is replaced with U+FFFD and
    counted in `report`.

    A single text file or stdin is passed verbatim; with several sources or a folder, each file is introduced by
    `FILE_HEADER`, and each PDF page with text by `PAGE_HEADER`.

    Raises `InputError` for missing paths (before reading anything), for a file given directly that cannot be
    read (binary, unreadable, encrypted or text-less PDF, ...), for a folder without any text, and - at the end,
    since stdin is only known to be empty once read - when the input holds no text at all.
    """
    if report is None:
        report = InputReport()
    chars_before = report.chars_emitted
    if not sources:
        raise InputError("no input given: pass a file, a folder, or '-' to read stdin")
    for source in sources:
        if source != "-" and not os.path.exists(source):
            if os.path.islink(source):
                raise InputError(f"{_shown(source)}: broken symbolic link; point at the file it should link to")
            raise InputError(f"{_shown(source)}: no such file or directory; check the path")

    headers = len(sources) > 1 or any(source != "-" and os.path.isdir(source) for source in sources)
    stream = _Stream(report, headers)
    for source in sources:
        if source == "-":
            stream_in = stdin if stdin is not None else getattr(sys.stdin, "buffer", None)
            if stream_in is None:
                raise InputError("'-' means stdin, but there is no stdin; pass a file instead")
            yield from stream.stdin(stream_in)
        elif os.path.isdir(source):
            yield from stream.directory(source)
        elif os.path.isfile(source):
            yield from stream.file(source, direct=True)
        else:
            yield from stream.special(source)

    if report.chars_emitted == chars_before:
        verb = "is" if len(sources) == 1 else "are"
        raise InputError(f"no text in the input: {sources_label(sources)} {verb} empty; give a file or pipe that "
                         "contains text")


def sources_label(sources: list[str], most: int = 3) -> str:
    """The sources as messages name them: '<stdin>' for '-', printable paths, at most `most` of them."""
    names = ", ".join(STDIN_SOURCE if s == "-" else _shown(s) for s in sources[:most])
    return names + (", ..." if len(sources) > most else "")


def total_bytes_estimate(sources: list[str]) -> int:
    """Sum of the sizes of the files `sources` name or contain (for a progress bar); stdin and pipes count 0.

    Folders are walked like `iter_segments` does, but binary files are not sniffed, so they are counted too.
    """
    total = 0
    scratch = InputReport()
    for source in sources:
        if source == "-":
            continue
        try:
            st = os.stat(source)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            for path in walk(source, scratch, {(st.st_dev, st.st_ino)}):
                with contextlib.suppress(OSError):
                    total += os.stat(path).st_size
        elif stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total
