"""The `cascadectl` command: one Typer app, one module per command."""
from __future__ import annotations

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


@app.callback()
def main() -> None:
    """Summarize, question and measure perplexity over inputs of any length with a bounded-memory cache.

    Exit codes: 0 ok, 1 failure, 2 usage error, 130 interrupted, 141 stdout closed by its reader."""


def run() -> None:
    app()
