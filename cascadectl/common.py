"""Glue shared by the commands: error handling and exit codes, sources, model loading, run records."""
from __future__ import annotations

import functools
import os
import platform
import resource
import signal
import sys
import threading
from typing import Callable

import typer

from engine.errors import CascadeError, ConfigError

from .console import Say
from .inputs import InputError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def handle_errors(command: Callable) -> Callable:
    """Turn engine/input errors and Ctrl-C into one line on stderr and a documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
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


class ChunkInterrupts:
    """During an ingest, the first Ctrl-C asks to stop at the next chunk boundary; a second one stops at once.

    A KeyboardInterrupt in the middle of a chunk would leave the cache half-updated across layers, so nothing
    could be saved from it. With this context the SIGINT handler only sets `requested`; the ingest's per-chunk
    callback checks it, writes a checkpoint if one was asked for, prints partial statistics and raises
    KeyboardInterrupt (exit 130). Installed only in the main thread (the only one that receives signals)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "ChunkInterrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: stop now, whatever the cache's state (nothing is saved from it)
            raise KeyboardInterrupt
        self.requested = True
        Say.warn("stopping after this chunk (Ctrl-C again to stop at once)")


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
