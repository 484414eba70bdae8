"""The input layer: text, stdin, PDFs and folders become one lazy, bounded stream of segments."""
from __future__ import annotations

import codecs
import hashlib
import io
import os
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from cascadectl import inputs
from cascadectl.inputs import (
    FILE_HEADER,
    PAGE_HEADER,
    InputError,
    InputReport,
    Segment,
    iter_segments,
    total_bytes_estimate,
)
from tests.cli.pdfs import pdf_bytes, write_encrypted_copy, write_pdf



def _permissions_are_bypassed() -> bool:
    """True for root (or any process with CAP_DAC_OVERRIDE): mode 000 files stay readable, so chmod tests can't work."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    # Root without the capability (e.g. under `setpriv --bounding-set=-dac_override,...`) is checked by trying.
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.write_text("x")
        probe.chmod(0)
        try:
            probe.read_text()
        except PermissionError:
            return False
        return True


IS_ROOT = _permissions_are_bypassed()


def read_all(sources, stdin=None) -> tuple[str, list[Segment], InputReport]:
    report = InputReport()
    segments = list(iter_segments([str(s) for s in sources], stdin=stdin, report=report))
    return "".join(s.text for s in segments), segments, report


def file_header(path) -> str:
    return FILE_HEADER.format(path=os.path.normpath(str(path)))


@pytest.fixture
def deadline():
    """Fail instead of hanging if a walk loops or a FIFO is opened."""
    def on_alarm(signum, frame):
        raise TimeoutError("took too long: a loop or a blocking open?")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- text files and stdin ------------------------------------------------------------------------------------------


def test_plain_file_is_passed_verbatim(tmp_path):
    text = "Call me Ishmael.\r\nSome years ago — never mind how long…\n\ttabs and   spaces \u2603\n"
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8", newline="")
    out, segments, report = read_all([path])
    assert out == text
    assert all(s.source == str(path) and s.page is None for s in segments)
    assert report.files_read == [str(path)]
    assert report.bytes_read == len(text.encode())
    assert report.replaced_bytes == 0 and report.skipped == []
    assert report.text_sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_any_extension_is_text(tmp_path):
    path = tmp_path / "notes.weird-ext"
    path.write_text("plain words\n")
    assert read_all([path])[0] == "plain words\n"


def test_stdin_equals_file(tmp_path):
    text = "line one\nline two ünïcödé 🙂\n" * 1000
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    from_file = read_all([path])[0]
    from_stdin, segments, report = read_all(["-"], stdin=io.BytesIO(text.encode()))
    assert from_stdin == from_file == text
    assert {s.source for s in segments} == {"<stdin>"}
    assert report.files_read == ["<stdin>"]


def test_file_and_stdin_get_headers(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("from the file")
    out, segments, report = read_all([path, "-"], stdin=io.BytesIO(b"from stdin"))
    assert out == file_header(path) + "from the file" + FILE_HEADER.format(path="<stdin>") + "from stdin"
    assert report.files_read == [str(path), "<stdin>"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    # Two bad bytes in the middle, a U+FFFD that was already there (not counted), and a truncated 2-byte sequence.
    path.write_bytes(b"abc\xff\xfedef \xef\xbf\xbd ghi\xc3")
    out, _, report = read_all([path])
    assert out == "abc\ufffd\ufffddef \ufffd ghi\ufffd"
    assert report.replaced_bytes == 3


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-8"])
def test_byte_order_marks_are_decoded(tmp_path, encoding):
    text = "Grüße, 世界! 🙂\nsecond line\n"
    bom = {
        "utf-16-le": codecs.BOM_UTF16_LE,
        "utf-16-be": codecs.BOM_UTF16_BE,
        "utf-32-le": codecs.BOM_UTF32_LE,
        "utf-8": codecs.BOM_UTF8,
    }
    path = tmp_path / "bom.txt"
    path.write_bytes(bom[encoding] + text.encode(encoding))
    out, _, report = read_all([path])
    assert out == text  # the BOM is not part of the text
    assert report.replaced_bytes == 0


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_multibyte_chars_split_across_blocks(monkeypatch, encoding, block):
    monkeypatch.setattr(inputs, "SNIFF_BYTES", 7)  # odd, so that the first boundary also cuts a character
    monkeypatch.setattr(inputs, "READ_BLOCK_BYTES", block)
    text = "é中🙂a" * 50 + "ß"
    data = text.encode(encoding)  # "utf-16" writes a BOM
    out, _, report = read_all(["-"], stdin=io.BytesIO(data))
    assert out == text
    assert report.replaced_bytes == 0
    assert report.bytes_read == len(data)


def test_segments_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_SEGMENT_CHARS", 100)
    monkeypatch.setattr(inputs, "READ_BLOCK_BYTES", 1000)
    text = "".join(f"{i:05d} " for i in range(2000))
    path = tmp_path / "long.txt"
    path.write_text(text)
    out, segments, _ = read_all([path])
    assert out == text
    assert max(len(s.text) for s in segments) <= 100


def test_default_block_sizes_bound_segments(tmp_path):
    text = "x" * (inputs.MAX_SEGMENT_CHARS * 3 + 17)
    path = tmp_path / "big.txt"
    path.write_text(text)
    out, segments, _ = read_all([path])
    assert out == text
    assert max(len(s.text) for s in segments) <= inputs.MAX_SEGMENT_CHARS


def test_iteration_is_lazy(tmp_path):
    """Nothing is read until iterated; a stream is consumed only as far as needed."""
    stdin = io.BytesIO(b"y" * (inputs.READ_BLOCK_BYTES * 10))
    segments = iter_segments(["-"], stdin=stdin)
    assert stdin.tell() == 0
    next(segments)
    assert stdin.tell() <= inputs.SNIFF_BYTES + inputs.READ_BLOCK_BYTES


def test_hash_covers_headers_and_text(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    out, _, report = read_all([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert "### File:" in out
    assert report.text_sha256 == hashlib.sha256(out.encode()).hexdigest()


# --- errors --------------------------------------------------------------------------------------------------------


def one_line_error(sources, stdin=None, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        list(iter_segments([str(s) for s in sources], stdin=stdin, **kwargs))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_zero_byte_file_raises_at_the_end(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    segments = iter_segments([str(path)])  # a generator: nothing raised yet
    with pytest.raises(InputError, match="no text in the input") as info:
        next(segments)
    assert str(path) in str(info.value)


def test_empty_stdin_raises():
    assert "no text in the input: <stdin>" in one_line_error(["-"], stdin=io.BytesIO(b""))


def test_several_empty_files_raise(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    assert "no text in the input" in one_line_error([tmp_path / "a.txt", tmp_path / "b.txt"])


def test_missing_path_raises_before_reading(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    missing = tmp_path / "nope.txt"
    segments = iter_segments([str(good), str(missing)])
    with pytest.raises(InputError, match="no such file or directory") as info:
        next(segments)  # fails up front, before the good file's text comes out
    assert str(missing) in str(info.value)


def test_binary_file_given_directly_raises(tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    message = one_line_error([path])
    assert message == f"{path} looks binary; give a text or PDF file"


def test_binary_stdin_raises():
    assert "<stdin> looks binary" in one_line_error(["-"], stdin=io.BytesIO(b"ab\x00cd"))


def test_pdf_on_stdin_raises():
    assert "pass the file's path" in one_line_error(["-"], stdin=io.BytesIO(pdf_bytes(["hi"])))


def test_no_sources_raises():
    assert "no input given" in one_line_error([])


@pytest.mark.skipif(IS_ROOT, reason="root can read files with mode 000")
def test_unreadable_file_given_directly_raises(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("hidden from you")
    path.chmod(0)
    try:
        message = one_line_error([path])
    finally:
        path.chmod(0o644)
    assert str(path) in message and "ermission" in message


# --- folders -------------------------------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_text("b/z")
    (root / "b" / "a.md").write_text("b/a")
    (root / "a.txt").write_text("a")
    (root / "c.txt").write_text("c")
    (root / "b" / "deeper").mkdir()
    (root / "b" / "deeper" / "x.txt").write_text("deep x")


def test_folder_walk_is_sorted_recursive_with_headers(tmp_path):
    root = tmp_path / "docs"
    make_tree(root)
    out, segments, report = read_all([root])
    order = ["a.txt", "b/a.md", "b/deeper/x.txt", "b/z.txt", "c.txt"]
    texts = ["a", "b/a", "deep x", "b/z", "c"]
    paths = [str(root / rel) for rel in order]
    assert out == "".join(FILE_HEADER.format(path=p) + t for p, t in zip(paths, texts))
    assert report.files_read == paths
    assert [s.source for s in segments if not s.text.startswith("\n\n###")] == paths
    assert report.skipped == []


def test_folder_given_as_dot_has_relative_paths(tmp_path, monkeypatch):
    make_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    _, _, report = read_all(["."])
    assert report.files_read[:2] == ["a.txt", os.path.join("b", "a.md")]


def test_folder_skips_with_reasons(tmp_path, deadline):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "keep.txt").write_text("kept")
    (root / ".hidden.txt").write_text("secret")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / "blob.bin").write_bytes(b"abc\x00def")
    (root / "empty.txt").write_bytes(b"")
    os.mkfifo(root / "pipe")
    (root / "dangling").symlink_to(root / "gone")
    out, _, report = read_all([root])
    assert out == file_header(root / "keep.txt") + "kept"
    assert sorted(report.skipped) == sorted([
        (str(root / ".git"), "hidden"),
        (str(root / ".hidden.txt"), "hidden"),
        (str(root / "blob.bin"), "binary"),
        (str(root / "dangling"), "broken symlink"),
        (str(root / "empty.txt"), "empty"),
        (str(root / "pipe"), "not a regular file"),
    ])


@pytest.mark.skipif(IS_ROOT, reason="root can read files with mode 000")
def test_folder_skips_unreadable_file_chmod(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "ok.txt").write_text("ok")
    locked = root / "locked.txt"
    locked.write_text("no")
    locked.chmod(0)
    try:
        out, _, report = read_all([root])
    finally:
        locked.chmod(0o644)
    assert out == file_header(root / "ok.txt") + "ok"
    assert report.skipped == [(str(locked), "unreadable: Permission denied")]


def test_folder_skips_unreadable_file(tmp_path, monkeypatch):
    """The same as the chmod test, but by faking the error, so that it also runs as root."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "ok.txt").write_text("ok")
    locked = root / "locked.txt"
    locked.write_text("no")
    real_open = open

    def fake_open(path, *args, **kwargs):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(inputs, "open", fake_open, raising=False)
    out, _, report = read_all([root])
    assert out == file_header(root / "ok.txt") + "ok"
    assert report.skipped == [(str(locked), "unreadable: Permission denied")]
    # The same file given directly is an error that names it.
    message = one_line_error([locked])
    assert str(locked) in message and "Permission denied" in message


def test_symlink_loop_terminates(tmp_path, deadline):
    root = tmp_path / "loopy"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_text("once")
    (root / "sub" / "back").symlink_to(root)  # sub/back -> loopy: a cycle
    (root / "again").symlink_to(root / "sub")  # a second way into sub
    out, _, report = read_all([root])
    assert out.count("once") == 1
    # Name order reaches sub's content through the link "again" first; the real "sub" is then a repeat.
    assert report.files_read == [str(root / "again" / "f.txt")]
    reason = "folder already read via another path (symlink)"
    assert report.skipped == [(str(root / "again" / "back"), reason), (str(root / "sub"), reason)]


def test_symlinked_file_is_read(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    target = tmp_path / "real.txt"
    target.write_text("via link")
    (root / "link.txt").symlink_to(target)
    assert read_all([root])[0] == file_header(root / "link.txt") + "via link"


def test_folder_of_binaries_raises(tmp_path):
    root = tmp_path / "bins"
    root.mkdir()
    (root / "a.bin").write_bytes(b"\x00\x01")
    (root / "b.bin").write_bytes(b"\x00\x02")
    (root / ".hidden").write_text("text, but hidden")
    message = one_line_error([root])
    assert str(root) in message
    assert "skipped 3 files: 2 binary, 1 hidden" in message


def test_empty_folder_raises(tmp_path):
    root = tmp_path / "nothing"
    root.mkdir()
    assert "no readable text" in one_line_error([root])


def test_fifo_given_directly_is_read_like_stdin(tmp_path, deadline):
    """`cascadectl <(cmd)` hands over a pipe's path: read it as a stream."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as fh:
            fh.write("streamed ✓".encode())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        out, _, report = read_all([fifo])
    finally:
        thread.join()
    assert out == "streamed ✓"
    assert report.files_read == [str(fifo)]


def test_total_bytes_estimate(tmp_path):
    make_tree(tmp_path / "docs")
    (tmp_path / "docs" / ".hidden").write_text("not counted")
    single = tmp_path / "one.txt"
    single.write_text("12345")
    dir_bytes = sum(len(t) for t in ["a", "b/a", "deep x", "b/z", "c"])
    assert total_bytes_estimate([str(tmp_path / "docs"), str(single), "-"]) == dir_bytes + 5
    assert total_bytes_estimate(["-"]) == 0


# --- PDFs ----------------------------------------------------------------------------------------------------------

PAGES = ["The first page (with parentheses).", "Second page\nhas two lines.", "Third and last."]


def test_generated_pdf_reads_back_with_pypdf(tmp_path):
    """The hand-built PDF is what the other tests think it is."""
    from pypdf import PdfReader

    path = write_pdf(tmp_path / "doc.pdf", PAGES + [None])
    reader = PdfReader(path)
    assert [p.extract_text() for p in reader.pages] == PAGES + [""]


def test_pdf_pages_with_markers(tmp_path):
    path = write_pdf(tmp_path / "doc.pdf", PAGES)
    out, segments, report = read_all([path])
    assert out == "".join(PAGE_HEADER.format(page=i) + text for i, text in enumerate(PAGES, start=1))
    assert [s.page for s in segments] == [1, 1, 2, 2, 3, 3]
    assert report.pages_read == 3
    assert report.files_read == [str(path)]
    assert report.bytes_read == path.stat().st_size


def test_pdf_page_without_text_gets_no_marker(tmp_path):
    path = write_pdf(tmp_path / "doc.pdf", ["one", None, "three"])
    out, _, report = read_all([path])
    assert out == PAGE_HEADER.format(page=1) + "one" + PAGE_HEADER.format(page=3) + "three"
    assert report.pages_read == 3


def test_pdf_detected_by_magic(tmp_path):
    path = tmp_path / "report.data"
    path.write_bytes(pdf_bytes(["found by magic"]))
    assert read_all([path])[0] == PAGE_HEADER.format(page=1) + "found by magic"


def test_pdf_pages_are_extracted_lazily(tmp_path, monkeypatch):
    from pypdf import PageObject

    calls = []
    real_extract = PageObject.extract_text

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real_extract(self, *args, **kwargs)

    monkeypatch.setattr(PageObject, "extract_text", spy)
    segments = iter_segments([str(write_pdf(tmp_path / "doc.pdf", PAGES))])
    assert calls == []
    assert next(segments).text == PAGE_HEADER.format(page=1)
    assert next(segments).text == PAGES[0]
    assert len(calls) == 1  # page 2 not touched yet
    assert next(segments).text == PAGE_HEADER.format(page=2)
    assert len(calls) == 2


def test_pdf_with_empty_user_password_is_read(tmp_path):
    plain = write_pdf(tmp_path / "plain.pdf", PAGES)
    locked = write_encrypted_copy(plain, tmp_path / "owner-only.pdf", user_password="")
    assert read_all([locked])[0] == read_all([plain])[0]


def test_password_protected_pdf_raises(tmp_path):
    plain = write_pdf(tmp_path / "plain.pdf", PAGES)
    locked = write_encrypted_copy(plain, tmp_path / "locked.pdf", user_password="s3cret")
    message = one_line_error([locked])
    assert str(locked) in message and "password-protected" in message and "qpdf --decrypt" in message


def test_pdf_without_text_raises(tmp_path):
    path = write_pdf(tmp_path / "scan.pdf", [None, None])
    message = one_line_error([path])
    assert str(path) in message and "no extractable text" in message and "ocrmypdf" in message


def test_truncated_pdf_raises_quietly(tmp_path, capfd):
    data = pdf_bytes(PAGES)
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: len(data) // 2])
    message = one_line_error([path])
    assert str(path) in message and "could not be parsed" in message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # pypdf's "EOF marker not found" and friends stay quiet


def test_pdf_problems_in_a_folder_are_skipped(tmp_path):
    root = tmp_path / "papers"
    root.mkdir()
    write_pdf(root / "a.pdf", ["paper A"])
    write_encrypted_copy(root / "a.pdf", root / "b-locked.pdf", user_password="pw")
    write_pdf(root / "c-scan.pdf", [None])
    (root / "d-cut.pdf").write_bytes(pdf_bytes(["x"])[:100])
    (root / "e.txt").write_text("notes")
    out, _, report = read_all([root])
    assert out == (
        file_header(root / "a.pdf") + PAGE_HEADER.format(page=1) + "paper A"
        + file_header(root / "e.txt") + "notes"
    )
    assert report.skipped == [
        (str(root / "b-locked.pdf"), "password-protected PDF"),
        (str(root / "c-scan.pdf"), "PDF has no extractable text"),
        (str(root / "d-cut.pdf"), "PDF could not be parsed"),
    ]
    assert report.files_read == [str(root / "a.pdf"), str(root / "e.txt")]


def test_pdf_and_text_file_together(tmp_path):
    pdf = write_pdf(tmp_path / "doc.pdf", ["page text"])
    txt = tmp_path / "notes.txt"
    txt.write_text("notes")
    out, _, _ = read_all([txt, pdf])
    assert out == file_header(txt) + "notes" + file_header(pdf) + PAGE_HEADER.format(page=1) + "page text"


def test_failing_page_is_skipped_not_fatal(tmp_path, monkeypatch):
    from pypdf import PageObject

    real_extract = PageObject.extract_text
    seen = []

    def flaky(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise ValueError("broken\nfont")
        return real_extract(self, *args, **kwargs)

    monkeypatch.setattr(PageObject, "extract_text", flaky)
    path = write_pdf(tmp_path / "doc.pdf", PAGES)
    out, _, report = read_all([path])
    assert out == PAGE_HEADER.format(page=1) + PAGES[0] + PAGE_HEADER.format(page=3) + PAGES[2]
    assert report.skipped == [(f"{path} page 2", "text extraction failed: broken font")]
