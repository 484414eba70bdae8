"""Offline long-context benchmarks on any local model: passkey retrieval and retention of a repeated segment.

Pure engine code (no typer/rich): build deterministic samples from a seed, run them through the same Runner as
the commands, score them. The CLI (`cascadectl bench`) adds progress, tables, JSON and plots."""
