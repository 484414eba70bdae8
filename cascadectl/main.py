"""The `cascadectl` command: one Typer app, one module per command."""
from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from .commands import ask, bench, ppl, summarize

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    help="Read inputs far longer than the model's context in one streaming pass through a cascading KV cache.",
)
app.command("summarize")(summarize.summarize)
app.command("ask")(ask.ask)
app.command("ppl")(ppl.ppl)
app.add_typer(bench.app, name="bench")


def version() -> str:
    """The installed distribution's version, else the package's own (a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("cascadectl")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"cascadectl {version()}")
        raise typer.Exit(0)


@app.callback()
def main(
    _version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                           help="Print the version and exit.")] = False,
) -> None:
    """Summarize, question and measure perplexity over inputs of any length with a bounded-memory cache.

    Exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted, 141 stdout closed by its reader."""


def run() -> None:
    if not _is_worker():
        app()
        return
    # A worker of --nproc or torchrun ends with os._exit once its command is done and its output flushed. Its
    # process group is destroyed by then, but gloo's threads can still abort the interpreter's normal shutdown
    # ("terminate called without an active exception", SIGABRT) after the results are written, which the
    # launcher must report as a crash. Nothing is left to clean up: output files are written atomically and
    # closed, and the only output still buffered is flushed here.
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a reader that went away (exit 141 was already decided)
            pass
    os._exit(code)


def _is_worker() -> bool:
    """A rank of a multi-process world (WORLD_SIZE > 1, as --nproc and torchrun set it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False  # the command itself reports the malformed environment
