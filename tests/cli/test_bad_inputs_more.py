"""The bad-input suite, continued (issue 6): stdout that cannot take the output, output paths that cannot be
written, inputs with nothing to read, folder skips on stderr, and cache files checked without `assert`.

Where the behaviour is about real file descriptors (a closed fd 1, a pipe whose reader is gone, /dev/full, the
interpreter's own flush at exit), the cases run as real `python -m cascadectl` processes, started together to
keep the suite's wall time down. The rest uses Typer's CliRunner with the one-layer model, as
tests/cli/test_bad_inputs.py does.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cascadectl import answering, common
from cascadectl import inputs as inputs_module
from cascadectl.commands import ask as ask_command
from cascadectl.commands import ppl as ppl_command
from cascadectl.commands import summarize as summarize_command
from cascadectl.console import MAX_SKIP_LINES
from cascadectl.main import app
from tests.cli.test_bad_inputs import (
    COMMANDS,
    EXIT_FAILURE,
    EXIT_USAGE,
    ONE_THREAD,
    REPO,
    SETTINGS,
    TEXT,
    assert_one_line_failure,
    command_args,
    fast,  # noqa: F401 - a fixture
    files_under,
)
from tests.fuzz.hostile import fast_lm, image_only_pdf_bytes, write_tiny_model

EXIT_BROKEN_PIPE = 141


def invoke(args: list[str], stdin: bytes | None = None):
    return CliRunner().invoke(app, args, input=stdin)


# --- 1. stdout closed, read-only, full, or its reader gone (real processes) -------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), words=TEXT.split())


def _broken_pipe() -> int:
    """The write end of a pipe whose read end is already closed: every write to it fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def _args(command: str, text: str, *extra: str) -> list[str]:
    return command_args(command, [text], *extra)


# name -> (arguments, how stdout is set up). All start at once (`processes`); each test checks one.
STDOUT_CASES = {
    "closed-ppl": (("ppl",), "closed"),
    "closed-summarize-json": (("summarize", "--json"), "closed"),
    "closed-ask": (("ask",), "closed"),
    "read-only-ppl": (("ppl",), "read-only"),
    "full-ppl-json": (("ppl", "--json"), "full"),
    "broken-ppl": (("ppl",), "broken"),
    "broken-ppl-json": (("ppl", "--json"), "broken"),
    "broken-summarize": (("summarize",), "broken"),
    "broken-ask-json": (("ask", "--json"), "broken"),
}


@pytest.fixture(scope="module")
def processes(model_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Run every STDOUT_CASES process, all at once, and return their exit codes and stderr by name."""
    folder = tmp_path_factory.mktemp("stdout")
    text = folder / "in.txt"
    text.write_text(TEXT)
    started = {}
    for name, ((command, *extra), how) in STDOUT_CASES.items():
        argv = [sys.executable, "-m", "cascadectl", *_args(command, str(text), *extra), "--model", str(model_dir)]
        opened, preexec = None, None
        if how == "closed":
            stdout, preexec = subprocess.DEVNULL, (lambda: os.close(1))  # fd 1 closed before Python starts
        elif how == "read-only":
            stdout = opened = open(os.devnull, "rb")
        elif how == "full":
            stdout = opened = open("/dev/full", "wb")  # every write fails with ENOSPC
        else:
            stdout = opened = os.fdopen(_broken_pipe(), "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                env=ONE_THREAD, preexec_fn=preexec)
        if opened is not None:
            opened.close()  # the child has its own copy
        started[name] = (argv, proc)
    done = {}
    for name, (argv, proc) in started.items():
        _, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(argv, proc.returncode, "", err)
    return done


def _no_noise(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr  # Python's own flush at exit stayed quiet


@pytest.mark.parametrize("name", [n for n in STDOUT_CASES if n.startswith(("closed", "read-only"))])
def test_stdout_unusable_from_the_start(processes, name):
    """`cascadectl ppl FILE 1>&-` (and `1<file`): one line, exit 1, before the model is even loaded."""
    proc = processes[name]
    _no_noise(proc)
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stdout is "), proc.stderr
    assert "closed" in lines[0] if name.startswith("closed") else "reading only" in lines[0]


def test_stdout_full(processes):
    """`> /dev/full`: the write fails with ENOSPC at the end; one line naming stdout, exit 1."""
    proc = processes["full-ppl-json"]
    _no_noise(proc)
    assert proc.returncode == EXIT_FAILURE, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot write to stdout (No space left on device); redirect the output to a file "
                      "(e.g. > out.txt) and run again"], proc.stderr


@pytest.mark.parametrize("name", [n for n in STDOUT_CASES if n.startswith("broken")])
def test_reader_gone(processes, name):
    """`cascadectl summarize FILE | head -1`: the reader went away; exit 141 quietly, like cat or grep."""
    proc = processes[name]
    _no_noise(proc)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert "error" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# --- 1. the same through CliRunner, for every command (no real fd: the stream itself fails) --------------------


class _FailingStream:
    """A stdout whose writes and flushes fail with `exc` (the pipe's reader is gone, a disk is full, ...)."""

    def __init__(self, stream, exc: OSError) -> None:
        self.stream, self.exc = stream, exc

    def write(self, text: str) -> int:
        raise self.exc

    def flush(self) -> None:
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _fail_stdout(monkeypatch, exc: OSError) -> None:
    real = common._GuardedStdout.__init__
    monkeypatch.setattr(common._GuardedStdout, "__init__", lambda self, s: real(self, _FailingStream(s, exc)))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_broken_pipe_ends_quietly(tmp_path, fast, monkeypatch, command, as_json):
    _fail_stdout(monkeypatch, BrokenPipeError(32, "Broken pipe"))
    (tmp_path / "in.txt").write_text(TEXT)
    result = invoke(command_args(command, [str(tmp_path / "in.txt")], *(["--json"] if as_json else [])))
    assert result.exit_code == EXIT_BROKEN_PIPE, result.output
    assert "Traceback" not in result.output and "error" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_stdout_write_error_is_one_line(tmp_path, fast, monkeypatch, command):
    _fail_stdout(monkeypatch, OSError(9, "Bad file descriptor"))
    (tmp_path / "in.txt").write_text(TEXT)
    result = invoke(command_args(command, [str(tmp_path / "in.txt")], "--quiet"))
    assert_one_line_failure(result, EXIT_FAILURE, "cannot write to stdout (Bad file descriptor)")


def test_broken_pipe_while_answering_keeps_the_checkpoint(tmp_path, fast, monkeypatch):
    """The reader went away during the answer: the ingest's checkpoint stays, so --resume answers again."""
    _fail_stdout(monkeypatch, BrokenPipeError(32, "Broken pipe"))
    (tmp_path / "in.txt").write_text(TEXT)
    ckpt = tmp_path / "run.ckpt"
    result = invoke(command_args("summarize", [str(tmp_path / "in.txt")], "--checkpoint", str(ckpt)))
    assert result.exit_code == EXIT_BROKEN_PIPE, result.output
    assert ckpt.is_file()


def test_stdout_guard_is_undone():
    before = sys.stdout
    with pytest.raises(ValueError), common.guard_stdout():
        assert sys.stdout is not before
        raise ValueError
    assert sys.stdout is before


# --- 2. --checkpoint and --save-cache paths that cannot be written: refused before any work ---------------------


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was checked")

    for module in (ppl_command, summarize_command, ask_command):
        monkeypatch.setattr(module, "load_model", refuse)


OUTPUT_FLAGS = [(c, "--checkpoint") for c in COMMANDS] + [(c, "--save-cache") for c in ("summarize", "ask")]


@pytest.mark.parametrize("command, flag", OUTPUT_FLAGS)
def test_output_into_a_missing_directory(tmp_path, no_model, command, flag):
    (tmp_path / "in.txt").write_text(TEXT)
    before = files_under(tmp_path)
    target = tmp_path / "gone" / "out.bin"
    result = invoke(command_args(command, [str(tmp_path / "in.txt")], flag, str(target)))
    assert_one_line_failure(result, EXIT_USAGE, f"{flag} {target}: the directory {target.parent} does not exist")
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command, flag", OUTPUT_FLAGS)
def test_output_into_an_unwritable_directory(tmp_path, no_model, monkeypatch, command, flag):
    """os.access is faked: the tests may run as root, which writes through any chmod."""
    (tmp_path / "in.txt").write_text(TEXT)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    result = invoke(command_args(command, [str(tmp_path / "in.txt")], flag, str(locked / "out.bin")))
    assert_one_line_failure(result, EXIT_USAGE, f"{flag} {locked / 'out.bin'}: the directory {locked} is not "
                                                f"writable")


@pytest.mark.parametrize("command, flag", OUTPUT_FLAGS)
def test_output_path_that_is_a_directory(tmp_path, no_model, command, flag):
    (tmp_path / "in.txt").write_text(TEXT)
    result = invoke(command_args(command, [str(tmp_path / "in.txt")], flag, str(tmp_path)))
    assert_one_line_failure(result, EXIT_USAGE, f"{flag} {tmp_path} is a directory")


def test_unwritable_directory_is_seen_even_as_root():
    """Unfaked: the kernel refuses writes in /proc/sys to root too, and os.access says so."""
    if not os.path.isdir("/proc/sys") or os.access("/proc/sys", os.W_OK):
        pytest.skip("no directory that even this user cannot write")
    with pytest.raises(common.ConfigError, match=r"^--checkpoint /proc/sys/x.ckpt: the directory /proc/sys is not"):
        common.check_output_path("/proc/sys/x.ckpt", "--checkpoint")


# --- 3. nothing to read: refused with one line, before any answer --------------------------------------------------


@pytest.fixture
def no_answer(monkeypatch):
    """Generating an answer fails the test: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("an answer was generated from an input with nothing to read")

    monkeypatch.setattr(answering, "answer", refuse)


def _file(name: str, data: bytes | str):
    def build(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return [str(tmp / name)]
    return build


def _whitespace_folder(tmp: Path) -> list[str]:
    root = tmp / "blank"
    root.mkdir()
    (root / "a.txt").write_text("   \n\t\n")
    (root / "b.txt").write_text("")
    (root / "c.md").write_text("\n\n\n")
    return [str(root)]


def _skipped_folder(tmp: Path) -> list[str]:
    root = tmp / "nothing"
    root.mkdir()
    (root / "x.bin").write_bytes(b"\0\1")
    (root / "s.pdf").write_bytes(image_only_pdf_bytes())
    return [str(root)]


NOTHING_TO_READ = [  # (id, build(tmp) -> sources, stdin, a piece of the one error line)
    ("whitespace-file", _file("w.txt", " \n\t \r\n "), None, "w.txt holds only whitespace"),
    ("whitespace-stdin", lambda t: ["-"], b"\n\n   \n", "<stdin> holds only whitespace"),
    ("whitespace-folder", _whitespace_folder, None, "blank holds only whitespace"),
    ("empty-file", _file("e.txt", ""), None, "e.txt is empty"),
    ("empty-stdin", lambda t: ["-"], b"", "<stdin> is empty"),
    ("folder-all-skipped", _skipped_folder, None, "no readable text in this folder (skipped 2 files"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("build, stdin, message", [pytest.param(*c[1:], id=c[0]) for c in NOTHING_TO_READ])
def test_nothing_to_read_is_refused(tmp_path, fast, no_answer, command, build, stdin, message):
    sources = build(tmp_path)
    result = invoke(command_args(command, sources, "--json"), stdin=stdin)
    assert_one_line_failure(result, EXIT_FAILURE, message)
    assert "no text" in result.stderr or "no readable text" in result.stderr


class _NoTokens:
    """A tokenizer that turns every text into no tokens at all (one that drops what it cannot represent)."""

    def encode(self, text, add_special_tokens=False):
        return []


def test_text_that_gives_no_tokens(tmp_path, monkeypatch):
    lm = dataclasses.replace(fast_lm(), tokenizer=_NoTokens())
    monkeypatch.setattr(ppl_command, "load_model", lambda *a, **k: lm)
    (tmp_path / "in.txt").write_text(TEXT)
    result = invoke(command_args("ppl", [str(tmp_path / "in.txt")]))
    assert_one_line_failure(result, EXIT_FAILURE, "in.txt gives 0 tokens")


def test_single_token_is_an_input_failure(tmp_path, fast):
    """One token has no perplexity: a runtime failure about the input (1), not a usage error (2)."""
    (tmp_path / "one.txt").write_text("harbour")
    result = invoke(command_args("ppl", [str(tmp_path / "one.txt")]))
    assert_one_line_failure(result, EXIT_FAILURE, "one.txt: a single token; perplexity needs at least two")


def _corpus(tmp: Path) -> Path:
    root = tmp / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(TEXT)
    (root / "b-empty.txt").write_text("")
    (root / "c-blank.txt").write_text("  \n\n ")
    (root / "d.txt").write_text(TEXT[: len(TEXT) // 2])
    return root


def test_each_with_files_that_have_nothing_to_read(tmp_path, fast):
    """`ppl --each`: the empty and the blank file are failed rows with their reason; the others are measured."""
    root = _corpus(tmp_path)
    result = invoke(["ppl", str(root), "--each", "--json", *SETTINGS])
    assert result.exit_code == EXIT_FAILURE, result.output
    assert "Traceback" not in result.output
    rows = {Path(r["file"]).name: r for r in json.loads(result.stdout)["files"]}
    assert [rows[n]["status"] for n in sorted(rows)] == ["ok", "failed", "failed", "ok"]
    assert "b-empty.txt is empty" in rows["b-empty.txt"]["error"]
    assert "c-blank.txt holds only whitespace" in rows["c-blank.txt"]["error"]
    assert json.loads(result.stdout)["total"]["files"] == 2


def test_summarize_each_with_files_that_have_nothing_to_read(tmp_path, fast):
    root = _corpus(tmp_path)
    out = tmp_path / "out"
    result = invoke(["summarize", str(root), "--each", "--out", str(out), "--max-tokens", "4", *SETTINGS])
    assert result.exit_code == EXIT_FAILURE, result.output
    index = json.loads((out / "index.json").read_text())
    assert [(Path(r["file"]).name, r["status"]) for r in index["files"]] == [
        ("a.txt", "ok"), ("b-empty.txt", "failed"), ("c-blank.txt", "failed"), ("d.txt", "ok")]
    assert sorted(p.name for p in out.rglob("*.summary.md")) == ["a.txt.summary.md", "d.txt.summary.md"]


# --- 4. folder skips on stderr, one physical line each ----------------------------------------------------------

LONG_NAME = "a-binary-file-with-a-name-long-enough-to-pass-any-terminal-width-" * 2 + ".bin"


def _folder_with_skips(tmp: Path, n_binaries: int) -> Path:
    root = tmp / "docs"
    root.mkdir()
    (root / "a.txt").write_text(TEXT)
    (root / ".hidden").write_text(TEXT)
    (root / "scan.pdf").write_bytes(image_only_pdf_bytes())
    os.mkfifo(root / "pipe")
    (root / LONG_NAME).write_bytes(b"\0\1")
    for i in range(n_binaries - 1):
        (root / f"blob{i:02d}.bin").write_bytes(b"\0\1")
    return root


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: skipped")]


@pytest.mark.parametrize("command", COMMANDS)
def test_folder_skips_are_listed_on_stderr(tmp_path, fast, command):
    root = _folder_with_skips(tmp_path, n_binaries=1)
    result = invoke(command_args(command, [str(root)]))
    assert result.exit_code == 0, result.output
    assert sorted(_warnings(result.stderr)) == sorted([  # whole lines: never folded at 80 columns
        f"warning: skipped {root / LONG_NAME}: binary",
        f"warning: skipped {root / 'pipe'}: not a regular file",
        f"warning: skipped {root / 'scan.pdf'}: PDF has no extractable text",
    ])
    assert ".hidden" not in result.stderr  # skipping dotfiles is the rule, not news
    assert len(f"warning: skipped {root / LONG_NAME}: binary") > 160  # rich would have folded it at 80


def test_many_folder_skips_are_cut_short(tmp_path, fast):
    root = _folder_with_skips(tmp_path, n_binaries=20)
    result = invoke(command_args("ppl", [str(root)], "--json"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == MAX_SKIP_LINES // 2 + 1
    assert lines[-1] == f"warning: ... and {22 - MAX_SKIP_LINES // 2} more skipped (see --json)"
    assert len(json.loads(result.stdout)["input"]["skipped"]) == 23  # 22 + the hidden file


def test_folder_skips_with_each_and_quiet(tmp_path, fast):
    root = _folder_with_skips(tmp_path, n_binaries=1)
    each = invoke(["ppl", str(root), "--each", *SETTINGS])
    assert each.exit_code == EXIT_FAILURE and "Traceback" not in each.output, each.output  # scan.pdf: a failed row
    assert f"warning: skipped {root / LONG_NAME}: binary" in each.stderr.splitlines()
    quiet = invoke(command_args("ppl", [str(root)], "--quiet"))
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


def test_long_info_lines_are_not_folded(tmp_path, fast):
    """The stats line after an answer is well over 80 columns; it stays one line on a non-terminal stderr."""
    (tmp_path / "in.txt").write_text(TEXT)
    result = invoke(command_args("summarize", [str(tmp_path / "in.txt")]))
    stats = [line for line in result.stderr.splitlines() if line.startswith("read ")]
    assert len(stats) == 1 and len(stats[0]) > 80 and "· KV cache " in stats[0], result.stderr


# --- 5. cache files are checked by explicit tests, which `python -O` keeps --------------------------------------

OPTIMIZED_LOADER = r"""
import pathlib, sys, tempfile
if __debug__:
    sys.exit("not running under python -O")
from engine import snapshot as snap
from engine.errors import CascadeError
from tests.engine.test_snapshot import loaded, rewrite, saved
from tests.engine.tiny import tiny_model

lm = loaded(tiny_model("llama"))
edits = {
    "ring start out of range": lambda m: m["cache"].update(start=[99, 0, 0, 0]),
    "negative ring count": lambda m: m["cache"].update(count=[-1, 0, 0, 0]),
    "ring counts not a list": lambda m: m["cache"].update(count="abcd"),
    "negative seen": lambda m: m["cache"].update(seen=-5),
    "policy disagrees": lambda m: m["cache"].update(policy="sink"),
    "sinks a boolean": lambda m: m.update(n_sinks=True),
    "float setting for an int": lambda m: m["settings"].update(sinks=4.0),
}
for name, edit in edits.items():
    path = saved(pathlib.Path(tempfile.mkdtemp()), lm)
    rewrite(path, edit, resign=True)
    try:
        snap.load_snapshot(path, lm)
    except CascadeError as e:
        print(f"{name}: refused: {e}")
    else:
        print(f"{name}: ACCEPTED")
"""


def test_cache_file_checks_survive_python_O():
    """`_rebuild` and the settings check used `assert`, which -O strips: crafted, re-signed files then loaded."""
    proc = subprocess.run([sys.executable, "-O", "-c", OPTIMIZED_LOADER], cwd=REPO, capture_output=True, text=True,
                          env=ONE_THREAD, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 7, proc.stdout
    for line in lines:
        assert ": refused: " in line and "is not a usable cascadectl cache file" in line, line


# --- 6. the input layer's helpers that corpus.py uses are public ------------------------------------------------


def test_input_helpers_used_by_corpus_are_public():
    import cascadectl.corpus as corpus

    for name in ("walk", "looks_binary", "is_pdf"):
        assert name in inputs_module.__all__ and getattr(inputs_module, name).__doc__
        assert getattr(corpus, name) is getattr(inputs_module, name)
    tree = ast.parse(Path(corpus.__file__).read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "inputs"
                for alias in node.names]
    assert imported and not [name for name in imported if name.startswith("_")]
