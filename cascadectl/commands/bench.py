"""`cascadectl bench passkey|ruler|retention`: offline long-context evidence on the embedded model or any model.

Each compares policies at the same cache size on the same deterministic samples (engine/bench), shows progress
and a table on stderr, prints `--json` on stdout and (passkey, retention) draws `--plot FILE.png`. The defaults
finish in minutes on a 2-core CPU with the embedded model (a 512-token cache, so that 16× the cache is 8K
tokens); `--quick` is a smoke run of a minute or two.

This module is only the `bench` command group that main.py mounts: each benchmark is its own module
(bench_passkey, bench_ruler, bench_retention), their shared options are bench_options, running them is
cascadectl.bench_runs and rendering them cascadectl.bench_report."""
from __future__ import annotations

import typer

from .bench_passkey import passkey
from .bench_retention import retention
from .bench_ruler import ruler_bench

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                  help="Offline long-context benchmarks: passkey retrieval, RULER-style tasks and retention of a "
                       "repeated segment.")
app.command("passkey")(passkey)
app.command("ruler")(ruler_bench)
app.command("retention")(retention)
