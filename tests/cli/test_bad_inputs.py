"""The bad-input suite (issue 6): hostile inputs through the real CLI, every one checked the same way.

One table of cases runs through `ppl`, `summarize` and `ask` (Typer's CliRunner, a one-layer model from
tests/fuzz/hostile.py). A failing case must exit with its documented code, print exactly one `error:` line on
stderr and nothing on stdout, show no traceback and leave no new file behind; a readable case must exit 0 and
report what it read and skipped. A few cases run as real `python -m cascadectl` subprocesses, where the exit
code, a closed stdin, a FIFO and the process's own peak memory are real. The security checks (no pickle, no
remote code, paths read literally) are at the end. Everything is generated here; nothing is downloaded.
"""
from __future__ import annotations

import ast
import dataclasses
import errno
import inspect
import io
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from typer.testing import CliRunner

from cascadectl import inputs
from cascadectl.commands import ask as ask_command
from cascadectl.commands import ppl as ppl_command
from cascadectl.commands import summarize as summarize_command
from cascadectl.main import app
from tests.cli.pdfs import write_encrypted_copy
from tests.fuzz.hostile import (
    broken_xref,
    fast_lm,
    gutted_pdf,
    image_only_pdf_bytes,
    sample_pdf,
    truncated,
    write_tiny_model,
)

REPO = Path(__file__).resolve().parents[2]
TEXT = "The committee met on Tuesday and agreed the budget for the harbour repairs. " * 40
SETTINGS = ["--cache-size", "256", "--stride", "128", "--sinks", "4", "--cascades", "4"]
COMMANDS = ("ppl", "summarize", "ask")
EXIT_FAILURE, EXIT_USAGE = 1, 2
MiB = 1 << 20


@pytest.fixture
def fast(monkeypatch):
    """Every command loads the one-layer model instead of the embedded one, on one thread.

    A model this small gains nothing from a second thread, and on a busy 2-core machine OpenMP's barrier makes
    each tiny matmul ~30x slower with two threads than with one."""
    for module in (ppl_command, summarize_command, ask_command):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: fast_lm())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def command_args(command: str, sources: list[str], *extra: str) -> list[str]:
    """Arguments for one command over `sources` (an empty list reads stdin)."""
    if command == "ppl":
        return ["ppl", *sources, *SETTINGS, *extra]
    if command == "summarize":
        return ["summarize", *sources, *SETTINGS, "--max-tokens", "4", *extra]
    return ["ask", *sources, "What was agreed?", *SETTINGS, "--max-tokens", "4", *extra]


def files_under(root: Path) -> set[str]:
    """Every path under `root`, without following symlinks (loops are part of the suite)."""
    found = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.join(folder, name) for name in dirs + files)
    return found


def assert_one_line_failure(result, code: int, message: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exit_code == code, output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


def input_record(doc: dict) -> dict:
    """The input part of a JSON document: top level for ppl, inside the record for summarize/ask."""
    return doc["input"] if "input" in doc else doc["record"]["input"]


# --- the table ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile input: `build(tmp)` makes it and returns the sources to pass ([] = stdin, given `stdin`)."""

    name: str
    build: Callable[[Path], list[str]]
    code: int  # expected exit code
    message: str = ""  # a piece of the one error line (failures), or "" for success
    check: Callable[[dict, Path], None] | None = None  # on the --json input record (successes)
    stdin: bytes | None = None
    commands: tuple[str, ...] = COMMANDS


def expect(**want) -> Callable[[dict, Path], None]:
    """A check that the input record has these values."""
    def check(inp: dict, tmp: Path) -> None:
        assert {key: inp[key] for key in want} == want
    return check


def _write(tmp: Path, name: str, data: bytes | str) -> list[str]:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return [str(path)]


def _encrypted(tmp: Path, password: str) -> list[str]:
    plain = tmp / "plain.pdf"
    plain.write_bytes(sample_pdf())
    locked = write_encrypted_copy(plain, tmp / "locked.pdf", user_password=password)
    plain.unlink()
    return [str(locked)]


def _loop_dir(tmp: Path) -> list[str]:
    root = tmp / "loopy"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.txt").write_text(TEXT)
    (root / "sub" / "up").symlink_to(root)  # loopy/sub/up -> loopy
    (root / "self").symlink_to(root / "self")  # a link to itself: stat fails with ELOOP
    return [str(root)]


def _many_files(tmp: Path, n: int = 10_000) -> list[str]:
    root = tmp / "many"
    root.mkdir()
    for i in range(n):
        (root / f"f{i:05d}.txt").write_bytes(b"note %d\n" % i)
    return [str(root)]


def _mixed_dir(tmp: Path) -> list[str]:
    """A folder of what users really have: text, a binary, an unreadable file, a FIFO, a scan, a locked PDF."""
    root = tmp / "mixed"
    root.mkdir()
    (root / "a.txt").write_text(TEXT)
    (root / "b.bin").write_bytes(b"\0" * 4096)
    (root / "c-locked.txt").write_text("secret")  # made unreadable by the `unreadable` fixture
    os.mkfifo(root / "d-pipe")
    (root / "e-scan.pdf").write_bytes(image_only_pdf_bytes())
    (root / "f-cut.pdf").write_bytes(truncated(sample_pdf()))
    return [str(root)]


def _check_mixed(inp: dict, tmp: Path) -> None:
    root = tmp / "mixed"
    assert inp["files"] == 1
    assert sorted(inp["skipped"]) == sorted([
        [str(root / "b.bin"), "binary"],
        [str(root / "c-locked.txt"), "unreadable: Permission denied"],
        [str(root / "d-pipe"), "not a regular file"],
        [str(root / "e-scan.pdf"), "PDF has no extractable text"],
        [str(root / "f-cut.pdf"), "PDF could not be parsed"],
    ])


def _check_loop(inp: dict, tmp: Path) -> None:
    root = tmp / "loopy"
    assert inp["files"] == 1
    assert [str(root / "sub" / "up"), "folder already read via another path (symlink)"] in inp["skipped"]
    assert any(path == str(root / "self") and "unreadable" in why for path, why in inp["skipped"])


CASES = [
    Case("pdf-user-password", lambda t: _encrypted(t, "s3cret"), EXIT_FAILURE, "password-protected"),
    Case("pdf-owner-password-only", lambda t: _encrypted(t, ""), 0, check=expect(files=1, pages=3)),
    Case("pdf-images-only", lambda t: _write(t, "scan.pdf", image_only_pdf_bytes()), EXIT_FAILURE,
         "no extractable text"),
    Case("pdf-truncated", lambda t: _write(t, "cut.pdf", truncated(sample_pdf())), EXIT_FAILURE,
         "could not be parsed"),
    # pypdf rebuilds a wrong xref table by scanning for objects: the text is read in full.
    Case("pdf-broken-xref", lambda t: _write(t, "xref.pdf", broken_xref(sample_pdf())), 0,
         check=expect(files=1, pages=3)),
    Case("pdf-broken-xref-and-objects", lambda t: _write(t, "gutted.pdf", gutted_pdf(sample_pdf())), EXIT_FAILURE,
         "could not be parsed"),
    Case("pdf-zero-bytes", lambda t: _write(t, "empty.pdf", b""), EXIT_FAILURE, "could not be parsed"),
    Case("zero-byte-file", lambda t: _write(t, "empty.txt", b""), EXIT_FAILURE, "no text in the input"),
    Case("nul-bytes", lambda t: _write(t, "zeros.txt", b"\0" * 100_000), EXIT_FAILURE, "looks binary"),
    Case("invalid-utf8-mid-text", lambda t: _write(t, "bad.txt", TEXT.encode() + b"\xff\xfe\xc3(" + TEXT.encode()),
         0, check=expect(replaced_bytes=3)),  # \xff, \xfe, and \xc3 cut short by "("
    Case("utf16-with-bom", lambda t: _write(t, "wide.txt", TEXT.encode("utf-16")), 0,
         check=expect(files=1, replaced_bytes=0)),
    Case("missing-file", lambda t: [str(t / "nope.txt")], EXIT_FAILURE, "no such file or directory"),
    Case("broken-symlink", lambda t: (t / "dangling.txt").symlink_to(t / "gone") or [str(t / "dangling.txt")],
         EXIT_FAILURE, "broken symbolic link"),
    Case("unreadable-file", lambda t: _write(t, "c-locked.txt", TEXT), EXIT_FAILURE, "Permission denied"),
    Case("folder-symlink-loop", _loop_dir, 0, check=_check_loop),
    Case("folder-of-binaries", lambda t: _write(t, "x.bin", b"\0\1") and [str(t)], EXIT_FAILURE,
         "no readable text in this folder (skipped 1 file: 1 binary)"),
    Case("folder-empty", lambda t: (t / "void").mkdir() or [str(t / "void")], EXIT_FAILURE, "it has no files"),
    Case("folder-mixed", _mixed_dir, 0, check=_check_mixed),
    Case("folder-10000-files", _many_files, 0, commands=("ppl",),
         check=expect(files=10_000, skipped=[])),
    Case("stdin-empty", lambda t: [], EXIT_FAILURE, "no text in the input: <stdin>", stdin=b""),
    Case("stdin-binary", lambda t: [], EXIT_FAILURE, "<stdin> looks binary", stdin=b"a\0b"),
    Case("stdin-pdf", lambda t: ["-"], EXIT_FAILURE, "pass the file's path", stdin=sample_pdf()),
]


@pytest.fixture
def unreadable(monkeypatch):
    """Files named `c-locked.txt` fail to open with EACCES: the chmod 000 that root would see through."""
    real_open = open

    def fake_open(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "c-locked.txt":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(inputs, "open", fake_open, raising=False)


@pytest.mark.parametrize("case, command", [pytest.param(case, command, id=f"{case.name}-{command}")
                                           for case in CASES for command in case.commands])
def test_bad_input(case, command, tmp_path, fast, unreadable):
    sources = case.build(tmp_path)
    before = files_under(tmp_path)
    extra = ("--json",) if case.code == 0 else ()
    result = CliRunner().invoke(app, command_args(command, sources, *extra), input=case.stdin)
    assert files_under(tmp_path) == before  # nothing written, nothing half-written
    if case.code:
        assert_one_line_failure(result, case.code, case.message)
        return
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "error:" not in result.stderr
    case.check(input_record(json.loads(result.stdout)), tmp_path)


def test_utf16_reads_as_the_same_text_as_utf8(tmp_path, fast):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(TEXT.encode("utf-16"))
    docs = [json.loads(CliRunner().invoke(app, command_args("ppl", [str(tmp_path / n)], "--json")).stdout)
            for n in ("a.txt", "b.txt")]
    assert docs[0]["input"]["sha256"] == docs[1]["input"]["sha256"]
    assert docs[0]["results"][0]["ppl"] == docs[1]["results"][0]["ppl"]


def test_fifo_given_directly_is_read(tmp_path, fast):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def writer():
        with open(fifo, "wb") as fh:
            fh.write(TEXT.encode())

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = CliRunner().invoke(app, command_args("ppl", [str(fifo)], "--json"))
    finally:
        thread.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["files"] == 1


# --- regressions: bugs this suite found in the input layer -------------------------------------------------------

LATIN1_NAME = os.fsdecode(b"caf\xe9 notes.txt")  # not UTF-8: Python carries the byte as a lone surrogate


@pytest.mark.parametrize("command", COMMANDS)
def test_undecodable_file_name_in_a_folder(tmp_path, fast, command):
    """Used to crash hashing the `### File:` header (UnicodeEncodeError); now the byte is shown escaped."""
    root = tmp_path / "archive"
    root.mkdir()
    (root / LATIN1_NAME).write_text(TEXT)
    (root / os.fsdecode(b"blob\xff.bin")).write_bytes(b"\0\1")
    result = CliRunner().invoke(app, command_args(command, [str(root)], "--json"))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    inp = input_record(json.loads(result.stdout))
    assert inp["files"] == 1
    assert inp["skipped"] == [[str(root / "blob\\xff.bin"), "binary"]]
    if command == "summarize":  # the retention report names the file the way the header did
        shown = json.dumps(str(root / "caf\\xe9 notes.txt"))[1:-1]
        assert shown in json.dumps(json.loads(result.stdout)["retention"])


def test_undecodable_file_name_given_directly(tmp_path, fast):
    path = tmp_path / os.fsdecode(b"\xff\xfe.bin")
    path.write_bytes(b"\0" * 10)
    result = CliRunner().invoke(app, command_args("ppl", [str(path)]))
    assert_one_line_failure(result, EXIT_FAILURE, "\\xff\\xfe.bin looks binary")


class _FailingRead:
    """A binary file whose reads fail with `error` after `ok` bytes (a bad sector, a vanished network mount)."""

    def __init__(self, f, ok: int, error: int = errno.EIO) -> None:
        self.f, self.left, self.error = f, ok, error

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError(self.error, os.strerror(self.error))
        data = self.f.read(min(n, self.left) if n >= 0 else self.left)
        self.left -= len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture
def flaky_reads(monkeypatch):
    """Files named `flaky*` fail with EIO after their first 100 bytes."""
    real_open = open

    def fake_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        return _FailingRead(f, 100) if os.path.basename(os.fspath(path)).startswith("flaky") else f

    monkeypatch.setattr(inputs, "open", fake_open, raising=False)


def test_read_error_half_way_through_a_file(tmp_path, fast, flaky_reads, monkeypatch):
    """Used to escape as a raw OSError (a traceback); now one line naming the file and how far it got."""
    monkeypatch.setattr(inputs, "SNIFF_BYTES", 64)
    path = tmp_path / "flaky.txt"
    path.write_text(TEXT)
    result = CliRunner().invoke(app, command_args("ppl", [str(path)]))
    assert_one_line_failure(result, EXIT_FAILURE, f"{path}: reading failed (Input/output error after 100 bytes)")


def test_read_error_half_way_through_a_folder_entry(tmp_path, fast, flaky_reads, monkeypatch):
    monkeypatch.setattr(inputs, "SNIFF_BYTES", 64)
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "flaky.txt").write_text(TEXT)
    (tmp_path / "z.txt").write_text(TEXT)
    result = CliRunner().invoke(app, command_args("ppl", [str(tmp_path)], "--json"))
    assert result.exit_code == 0, result.output
    inp = json.loads(result.stdout)["input"]
    assert inp["files"] == 2  # a.txt and z.txt: the walk went on
    assert inp["skipped"] == [[str(tmp_path / "flaky.txt"), "unreadable: Input/output error after 100 bytes"]]


def test_stdin_that_cannot_be_read():
    """stdin opened write-only (`cascadectl ppl 0>file`) fails its first read with EBADF: one line, not a traceback."""
    with pytest.raises(inputs.InputError, match=r"^<stdin> cannot be read \(Bad file descriptor\)"):
        list(inputs.iter_segments(["-"], stdin=_FailingRead(io.BytesIO(b"text"), 0, errno.EBADF)))


# --- real processes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), words=TEXT.split())


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # see `fast`


def cli(model: Path, *args: str, stdin=subprocess.DEVNULL, cwd: Path | None = None, close_stdin: bool = False,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m cascadectl ARGS --model MODEL` in a fresh process (no shell: arguments reach it verbatim)."""
    return subprocess.run(
        [sys.executable, "-m", "cascadectl", *args, "--model", str(model)], stdin=stdin, capture_output=True,
        text=True, cwd=cwd, timeout=timeout, preexec_fn=(lambda: os.close(0)) if close_stdin else None, env=ONE_THREAD,
    )


def assert_process_failure(proc: subprocess.CompletedProcess, code: int, message: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_process_with_stdin_closed(model_dir):
    """Started with fd 0 closed (`cascadectl ppl 0<&-`): Python has no sys.stdin at all."""
    no_args = cli(model_dir, "ppl", *SETTINGS, close_stdin=True)
    assert_process_failure(no_args, EXIT_USAGE, "no input")


@pytest.mark.slow
def test_process_with_stdin_closed_and_dash(model_dir):
    dash = cli(model_dir, "ask", "-", "What?", *SETTINGS, "--max-tokens", "4", close_stdin=True)
    assert_process_failure(dash, EXIT_FAILURE, "there is no stdin")


@pytest.mark.slow
def test_process_with_stdin_write_only(model_dir, tmp_path):
    with open(tmp_path / "out", "wb") as write_only:
        proc = cli(model_dir, "ppl", *SETTINGS, stdin=write_only)
    assert_process_failure(proc, EXIT_FAILURE, "<stdin> cannot be read (Bad file descriptor)")


@pytest.mark.slow  # CliRunner covers the same with an empty stdin; this is the real thing
def test_process_with_stdin_at_eof(model_dir):
    """`cascadectl summarize < /dev/null`: stdin is there but ends at once."""
    proc = cli(model_dir, "summarize", *SETTINGS, "--max-tokens", "4")
    assert_process_failure(proc, EXIT_FAILURE, "no text in the input: <stdin>")


def test_process_reads_a_fifo_and_a_folder_with_one(model_dir, tmp_path):
    """A FIFO given directly is read like stdin (the `<(cmd)` case); inside a folder it is skipped, not opened."""
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.txt").write_text(TEXT)
    os.mkfifo(root / "pipe")  # never opened for writing: reading it would block forever
    fifo = tmp_path / "direct"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cascadectl", "ppl", str(fifo), str(root), *SETTINGS, "--json", "--model",
         str(model_dir)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ONE_THREAD)
    _write_when_read(fifo, TEXT.encode(), proc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in err, err
    doc = json.loads(out)
    assert doc["input"]["files"] == 2
    assert doc["input"]["skipped"] == [[str(root / "pipe"), "not a regular file"]]


def _write_when_read(fifo: Path, data: bytes, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Write `data` into `fifo` once `proc` opens it for reading; give up if `proc` exits first (no hang)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until a reader has it open
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.05)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _one_long_line(path: Path, n_bytes: int) -> Path:
    """`n_bytes` of printable characters with no newline and no space (a minified dump), written in 1 MiB chunks."""
    block = bytes(33 + (i * 7) % 94 for i in range(MiB))
    with open(path, "wb") as fh:
        for start in range(0, n_bytes, MiB):
            fh.write(block[: min(MiB, n_bytes - start)])
    return path


# Runs `ppl` over each file in one process, so that the second run's peak RSS shows the growth over the first.
TWO_RUNS = """
import sys
from cascadectl.main import app
model, *paths = sys.argv[1:]
for path in paths:
    try:
        app(["ppl", path, "--cache-size", "1024", "--stride", "1024", "--sinks", "4", "--json", "--model", model])
    except SystemExit as e:
        if e.code:
            raise
"""


def _assert_long_line_bounded(model_dir: Path, tmp_path: Path, n_bytes: int) -> None:
    small = _one_long_line(tmp_path / "small.txt", MiB)
    big = _one_long_line(tmp_path / "line.txt", n_bytes)
    proc = subprocess.run([sys.executable, "-c", TWO_RUNS, str(model_dir), str(small), str(big)],
                          capture_output=True, text=True, env=ONE_THREAD, timeout=1800)
    big.unlink()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(proc.stdout.rstrip()):
        doc, at = decoder.raw_decode(proc.stdout, at)
        docs.append(doc)
        at += len(proc.stdout[at:]) - len(proc.stdout[at:].lstrip())
    assert [d["input"]["text_bytes"] for d in docs] == [MiB, n_bytes]
    before, after = (d["peak_rss_bytes"] for d in docs)  # the process's own getrusage() maximum so far
    # Holding the line would cost its bytes plus its str, 2x n_bytes, over the peak of the 1 MiB run.
    assert after - before < 24 * MiB, f"peak RSS {before / MiB:.0f} MiB after 1 MiB, {after / MiB:.0f} MiB after " \
                                      f"{n_bytes / MiB:.0f} MiB"


def test_20mb_line_streams_in_bounded_memory(model_dir, tmp_path):
    _assert_long_line_bounded(model_dir, tmp_path, 20 * MiB)


@pytest.mark.slow
def test_200mb_line_streams_in_bounded_memory(model_dir, tmp_path):
    _assert_long_line_bounded(model_dir, tmp_path, 200 * MiB)


# --- cache files (--save-cache / --load-cache) -------------------------------------------------------------------


def _has_option(command, name: str) -> bool:
    return name in inspect.signature(command).parameters


needs_cache_files = pytest.mark.skipif(
    not (_has_option(summarize_command.summarize, "save_cache") and _has_option(ask_command.ask, "load_cache")),
    reason="--save-cache/--load-cache have not landed in the CLI yet",
)


class _DiskFullAfter:
    """A binary file whose writes fail with ENOSPC once `quota` bytes are in: a disk filling up mid-write."""

    def __init__(self, f, quota: int) -> None:
        self.f, self.left = f, quota

    def write(self, data) -> int:
        n = min(len(data), self.left)
        self.f.write(bytes(data[:n]))
        self.left -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Files opened for writing through os.fdopen (how atomic writers open their temp file) fill up after 4 KiB."""
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        return _DiskFullAfter(f, 4096) if "w" in mode else f

    monkeypatch.setattr(os, "fdopen", fdopen)


def _summarize(*args: str):
    return CliRunner().invoke(app, ["summarize", *args, *SETTINGS, "--max-tokens", "4"])


@pytest.fixture
def saved_cache(tmp_path, fast) -> Path:
    """A good `--save-cache` file of a short text, made with the one-layer model."""
    text = tmp_path / "in.txt"
    text.write_text(TEXT)
    path = tmp_path / "good.kv"
    result = _summarize(str(text), "--save-cache", str(path))
    assert result.exit_code == 0 and path.is_file(), result.output
    return path


@needs_cache_files
@pytest.mark.parametrize("command", ["summarize", "ask"])
def test_save_cache_into_a_missing_directory(tmp_path, fast, command):
    (tmp_path / "in.txt").write_text(TEXT)
    before = files_under(tmp_path)
    target = str(tmp_path / "no" / "such" / "dir" / "x.kv")
    result = CliRunner().invoke(app, command_args(command, [str(tmp_path / "in.txt")], "--save-cache", target))
    assert_one_line_failure(result, EXIT_USAGE, f"--save-cache {target}: the directory")
    assert "does not exist" in result.stderr
    assert files_under(tmp_path) == before


@needs_cache_files
def test_save_cache_on_a_full_disk_leaves_no_file(tmp_path, fast, full_disk):
    (tmp_path / "in.txt").write_text(TEXT)
    before = files_under(tmp_path)
    result = _summarize(str(tmp_path / "in.txt"), "--save-cache", str(tmp_path / "x.kv"))
    assert_one_line_failure(result, EXIT_FAILURE, "No space left on device")
    assert files_under(tmp_path) == before  # neither the file nor its temporary


@needs_cache_files
def test_save_cache_on_a_full_disk_keeps_the_old_file(saved_cache, monkeypatch, full_disk):
    old = saved_cache.read_bytes()
    before = files_under(saved_cache.parent)
    result = _summarize(str(saved_cache.parent / "in.txt"), "--save-cache", str(saved_cache))
    assert_one_line_failure(result, EXIT_FAILURE, "No space left on device")
    assert saved_cache.read_bytes() == old and files_under(saved_cache.parent) == before


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def _retag_model(data: bytes) -> bytes:
    """Change one character of the model id inside the signed header (same length, so offsets still hold)."""
    return data.replace(b"one-layer llama", b"one-layer LLAMA", 1)


BAD_CACHE_FILES = [
    ("truncated-half", lambda good: good[: len(good) // 2], EXIT_FAILURE, "truncated"),
    ("truncated-header", lambda good: good[:20], EXIT_FAILURE, "truncated"),
    ("one-byte-flipped", _flip_last_byte, EXIT_FAILURE, "checksum mismatch"),
    ("header-edited", _retag_model, EXIT_FAILURE, "checksum mismatch"),
    ("trailing-junk", lambda good: good + b"junk", EXIT_FAILURE, "unexpected bytes"),
    ("empty", lambda good: b"", EXIT_FAILURE, "not a cascadectl cache file"),
    ("text", lambda good: TEXT.encode(), EXIT_FAILURE, "not a cascadectl cache file"),
    ("pdf", lambda good: sample_pdf(), EXIT_FAILURE, "not a cascadectl cache file"),
]


@needs_cache_files
@pytest.mark.parametrize("make, code, message", [pytest.param(*case[1:], id=case[0]) for case in BAD_CACHE_FILES])
def test_damaged_cache_file_is_refused(saved_cache, make, code, message):
    saved_cache.write_bytes(make(saved_cache.read_bytes()))
    before = files_under(saved_cache.parent)
    result = _summarize("--load-cache", str(saved_cache))
    assert_one_line_failure(result, code, message)
    assert files_under(saved_cache.parent) == before


@needs_cache_files
def test_cache_file_from_another_model_is_refused(saved_cache, monkeypatch):
    other = dataclasses.replace(fast_lm(), model_id="another model", model_hash="2" * 64)
    monkeypatch.setattr(summarize_command, "load_model", lambda *a, **k: other)
    assert_one_line_failure(_summarize("--load-cache", str(saved_cache)), EXIT_USAGE, "was made with model")


@needs_cache_files
def test_cache_file_with_other_settings_is_refused(saved_cache):
    result = CliRunner().invoke(app, ["summarize", "--load-cache", str(saved_cache), "--cache-size", "512"])
    assert_one_line_failure(result, EXIT_USAGE, "--cache-size")


@needs_cache_files
@pytest.mark.parametrize("where", ["missing", "directory"])
def test_cache_file_path_that_is_no_file(tmp_path, fast, where):
    path = tmp_path / "x.kv"
    if where == "directory":
        path.mkdir()
    assert_one_line_failure(_summarize("--load-cache", str(path)), EXIT_FAILURE, str(path))


@needs_cache_files
def test_pickle_given_as_cache_file_is_not_unpickled(tmp_path, fast):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.kv"
    path.write_bytes(pickle.dumps(_Trap(str(marker))))
    assert_one_line_failure(_summarize("--load-cache", str(path)), EXIT_FAILURE, "not a cascadectl cache file")
    assert not marker.exists()


@needs_cache_files
def test_cache_file_is_safetensors_not_pickle(saved_cache):
    """Any safetensors reader opens it; pickle's opcodes are nowhere at its start."""
    from safetensors import safe_open

    with safe_open(str(saved_cache), framework="pt") as f:
        assert f.keys() and "cascadectl" in f.metadata()
    assert not saved_cache.read_bytes().startswith(b"\x80")  # pickle protocol 2+ starts with PROTO


def test_checkpoint_into_a_missing_directory(tmp_path, fast):
    if not _has_option(ppl_command.ppl, "checkpoint"):
        pytest.skip("--checkpoint has not landed")
    (tmp_path / "in.txt").write_text(TEXT * 4)
    before = files_under(tmp_path)
    target = str(tmp_path / "gone" / "run.ckpt")
    args = command_args("ppl", [str(tmp_path / "in.txt")], "--checkpoint", target, "--checkpoint-every", "128")
    result = CliRunner().invoke(app, args)
    assert_one_line_failure(result, EXIT_USAGE, f"--checkpoint {target}: the directory")  # before any work
    assert "does not exist" in result.stderr
    assert files_under(tmp_path) == before


# --- security ------------------------------------------------------------------------------------------------------

PACKAGES = ("cascadectl", "engine", "kernels")
UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _package_sources():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_remote_code_is_never_trusted():
    """Every `trust_remote_code` in our code is the literal False (transformers' default is False too)."""
    for path, tree in _package_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, f"{path}:{node.lineno}"
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        assert isinstance(value, ast.Constant) and value.value is False, f"{path}:{key.lineno}"


def test_no_pickle_anywhere_in_the_package():
    """No module imports an unpickler, calls torch.load / numpy.load, or asks for pickled weights."""
    for path, tree in _package_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & UNPICKLERS, f"{path}:{node.lineno}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in UNPICKLERS, f"{path}:{node.lineno}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                assert not (isinstance(owner, ast.Name) and owner.id in ("torch", "np", "numpy")), \
                    f"{path}:{node.lineno}: {owner.id}.load can unpickle"
            elif isinstance(node, ast.keyword) and node.arg == "use_safetensors":
                assert isinstance(node.value, ast.Constant) and node.value.value is True, f"{path}:{node.lineno}"


class _Trap:
    """Unpickling this creates `marker`: the proof that something unpickled a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_weights_are_never_unpickled(model_dir, tmp_path):
    """A model folder with a booby-trapped pytorch_model.bin: alone it is refused; beside safetensors it is ignored."""
    marker = tmp_path / "pwned"
    trap = pickle.dumps({"model.embed_tokens.weight": _Trap(str(marker))})
    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (only_bin / name).write_bytes((model_dir / name).read_bytes())
    (only_bin / "pytorch_model.bin").write_bytes(trap)
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    refused = CliRunner().invoke(app, ["ppl", str(text), *SETTINGS, "--model", str(only_bin)])
    assert_one_line_failure(refused, EXIT_FAILURE, "pickled weights (*.bin) are never loaded")

    both = tmp_path / "both"
    both.mkdir()
    for f in model_dir.iterdir():
        (both / f.name).write_bytes(f.read_bytes())
    (both / "pytorch_model.bin").write_bytes(trap)
    loaded = CliRunner().invoke(app, ["ppl", str(text), *SETTINGS, "--model", str(both), "--json"])
    assert loaded.exit_code == 0, loaded.output
    assert not marker.exists()


@pytest.mark.parametrize("name", ["$HOME", "~", "~root", "a;touch pwned", "$(touch pwned)", "`touch pwned`", "*",
                                  "x' \"y", "-rf"])
def test_input_paths_are_read_literally(tmp_path, fast, monkeypatch, name):
    """Source paths are opened as given: never expanded (~, $VAR, globs) and never handed to a shell."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(f"the file literally named {name} " * 20)
    arg = name if not name.startswith("-") else f"./{name}"  # a leading dash is an option to any CLI
    result = CliRunner().invoke(app, command_args("ppl", [arg], "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["sources"] == [arg]
    assert sorted(os.listdir(tmp_path)) == [name]  # nothing ran: no `pwned`


@pytest.mark.slow
def test_literal_dollar_home_in_a_real_process(model_dir, tmp_path):
    """The same through a real process, with HOME pointing at a folder that has a different file of that name."""
    (tmp_path / "$HOME").write_text(TEXT)
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cascadectl", "ppl", "$HOME", *SETTINGS, "--json", "--model", str(model_dir)],
        cwd=tmp_path, env={**ONE_THREAD, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["input"]["text_bytes"] == len(TEXT)
