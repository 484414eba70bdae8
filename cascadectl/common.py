"""Glue shared by the commands: error handling and exit codes, stdout, sources, output paths, run records."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import platform
import resource
import signal
import sys
import threading
from typing import Callable

import click
import typer

from engine.errors import CascadeError, ConfigError

from .console import Say
from .inputs import InputError, InputReport, sources_label

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The reader of our stdout went away (`cascadectl summarize book.pdf | head -1`). 141 = 128 + SIGPIPE is what the
# shell reports for cat, grep or sort in the same place, so scripts (and `set -o pipefail`) that already treat
# 141 as "the consumer stopped early" treat us the same way, and it stays apart from 1, a real failure. We exit
# with the code instead of dying by the signal so that cleanup (temporary files, the runner) still runs.
EXIT_BROKEN_PIPE = 128 + 13


def handle_errors(command: Callable) -> Callable:
    """Turn engine/input errors, stdout failures and Ctrl-C into one line on stderr and a documented exit code.

    stdout is checked before any work (closed or read-only: one line, exit 1) and guarded while the command
    runs: a reader that went away ends the run quietly with 141, any other write error is one line and exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            check_stdout()
            with guard_stdout():
                return command(*args, **kwargs)
        except StdoutError as e:
            discard_stdout()  # what is still buffered would fail again in Python's flush at exit
            if e.errno == errno.EPIPE:
                raise typer.Exit(EXIT_BROKEN_PIPE)  # quietly, like any Unix tool whose reader stopped reading
            Say.error(str(e))
            raise typer.Exit(EXIT_FAILURE)
        except ConfigError as e:
            Say.error(str(e))
            raise typer.Exit(EXIT_USAGE)
        except (CascadeError, InputError) as e:
            Say.error(str(e))
            raise typer.Exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            Say.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED)
        except MemoryError:
            Say.error("out of memory; lower --cache-size or --stride")
            raise typer.Exit(EXIT_FAILURE)

    return wrapper


# --- stdout -----------------------------------------------------------------------------------------------------


class StdoutError(Exception):
    """stdout cannot take our output: closed, read-only, full, or its reader went away (`errno` EPIPE).

    Not an OSError on purpose: rich and click each catch a BrokenPipeError on their own and exit 1."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class _GuardedStdout:
    """sys.stdout while a command runs: a failed write or flush raises StdoutError, the rest is the real stream."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _stdout_error(e) from None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _stdout_error(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _stdout_error(e: OSError) -> StdoutError:
    return StdoutError(e.errno or 0, f"cannot write to stdout ({e.strerror or e}); redirect the output to a file "
                                     f"(e.g. > out.txt) and run again")


def check_stdout() -> None:
    """Refuse to start when stdout is closed (`1>&-`) or not open for writing (`1<file`): the run's output
    would be lost after all its work."""
    hint = "redirect it to a file or /dev/null (e.g. > out.txt)"
    if sys.stdout is None:  # Python found fd 1 closed at start-up
        raise StdoutError(errno.EBADF, f"stdout is closed; {hint}")
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test harness's buffer): nothing to check
        return
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise StdoutError(errno.EBADF, f"stdout is closed; {hint}") from None
    if mode == os.O_RDONLY:
        raise StdoutError(errno.EBADF, f"stdout is open for reading only; {hint}")


@contextlib.contextmanager
def guard_stdout():
    """Run the block with sys.stdout guarded (see _GuardedStdout) and flush it before leaving, so that a broken
    pipe surfaces here rather than in Python's flush at exit ("Exception ignored ... BrokenPipeError")."""
    original = sys.stdout
    guarded = sys.stdout = _GuardedStdout(original)
    try:
        yield
        guarded.flush()
    except StdoutError:
        raise
    except click.exceptions.Exit:  # a command's own exit code (e.g. --each with failed files), after its output
        guarded.flush()
        raise
    except BaseException:  # an error of its own: keep that one, and drop output that stdout can no longer take
        try:
            guarded.flush()
        except StdoutError:
            discard_stdout()
        raise
    finally:
        sys.stdout = original


def discard_stdout() -> None:
    """Point fd 1 at /dev/null: output still buffered is dropped at exit instead of failing again there."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real file behind it: nothing is flushed to a fd at exit
        return
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


# --- inputs and outputs -----------------------------------------------------------------------------------------


def require_text(report: InputReport, sources: list[str], n_tokens: int) -> None:
    """Refuse an input with nothing to read, once it has been read and tokenized, before any answer or report.

    Empty inputs are refused by the input layer itself; this catches text that is only whitespace (whatever
    the tokenizer makes of it) and text the tokenizer turned into no tokens at all."""
    if report.has_text and n_tokens:
        return
    one = len(sources) == 1
    what = (f"{'holds' if one else 'hold'} only whitespace" if not report.has_text  # headers may make tokens
            else f"{'gives' if one else 'give'} 0 tokens")
    raise InputError(f"no text in the input: {sources_label(sources)} {what}; give a file or pipe that contains text")


def check_output_path(path: str, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written at the end: its directory is missing or
    not writable, or the path is a directory. A usage error (exit 2): the option's value has to change."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: the directory {directory} does not exist; create it or choose another "
                          f"path")
    if not os.access(directory, os.W_OK | os.X_OK):  # also a read-only mount, even for root
        raise ConfigError(f"{flag} {path}: the directory {directory} is not writable; choose another path")


class _SigintScope:
    """Our own SIGINT handler for the length of a `with` block (main thread only: the one that receives
    signals); `requested` records that Ctrl-C was pressed. Subclasses say what the handler does."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        raise NotImplementedError


class ChunkInterrupts(_SigintScope):
    """During an ingest, the first Ctrl-C asks to stop at the next chunk boundary; a second one stops at once.

    A KeyboardInterrupt in the middle of a chunk would leave the cache half-updated across layers, so nothing
    could be saved from it. With this context the SIGINT handler only sets `requested`; the ingest's per-chunk
    callback checks it, writes a checkpoint if one was asked for, prints partial statistics and raises
    KeyboardInterrupt (exit 130)."""

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: stop now, whatever the cache's state (nothing is saved from it)
            raise KeyboardInterrupt
        self.requested = True
        Say.warn("stopping after this chunk (Ctrl-C again to stop at once)")


class AnswerInterrupts(_SigintScope):
    """While an answer is generated, Ctrl-C stops at once, and also at the next token if it got lost.

    Python raises KeyboardInterrupt in whatever frame runs when the signal is handled; if that frame is a
    finaliser run by the garbage collector (torch and other libraries have some), the exception is reported as
    "ignored" and the loop would go on. So the handler also records the request, and the generation loop calls
    `check()` after every token."""

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


def resolve_sources(sources: list[str] | None) -> list[str]:
    """Sources as given; none given and stdin piped means stdin."""
    if sources:
        return sources
    if sys.stdin is not None and not sys.stdin.isatty():  # None: started with stdin closed (`0<&-`)
        return ["-"]
    raise ConfigError("no input: give a file, folder or PDF, or pipe text on stdin ('-')")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "cascadectl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    }
