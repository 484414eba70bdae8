"""Glue shared by the commands: error handling and exit codes, sources, model loading, run records."""
from __future__ import annotations

import functools
import os
import platform
import resource
import sys
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


def resolve_sources(sources: list[str] | None) -> list[str]:
    """Sources as given; none given and stdin piped means stdin."""
    if sources:
        return sources
    if not sys.stdin.isatty():
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
