"""Options and option handling shared by `cascadectl bench passkey` and `bench retention`.

Kept apart from the two commands so that their common options (policies, samples, seed, --text, --quick,
--plot), the benchmark cache defaults and the --quick rule are written once; the options shared with every
other command live in cascadectl.options."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..answering import given

CACHE_SIZE, STRIDE = 512, 256  # small enough that 16x and 64x the cache (8K, 32K tokens) are in reach on a CPU
Policies = Annotated[str, typer.Option(
    "--policy", "-p", rich_help_panel="Cache",
    help="Policies compared at the same cache size (full only where the model's positions allow).")]
Samples = Annotated[int, typer.Option("--samples", rich_help_panel="Benchmark", help="Samples per cell.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel="Benchmark", help="Seed of keys, offsets, segments.")]
Text = Annotated[Optional[str], typer.Option(
    "--text", rich_help_panel="Benchmark", show_default=False, metavar="FILE",
    help="Prose to use instead of the bundled novel (data/pride_and_prejudice.txt).")]
Quick = Annotated[bool, typer.Option("--quick", rich_help_panel="Benchmark",
                                     help="A tiny grid (a minute or two): a smoke test, not a measurement.")]
Plot = Annotated[Optional[str], typer.Option("--plot", rich_help_panel="Output", show_default=False,
                                             metavar="FILE.png", help="Draw the results into a PNG.")]


def cache_settings(cache_size: int, cascades: int, sinks: int, beta: float, head_reduce: str, stride: int) -> dict:
    """The cache options as CacheConfig keywords (and as the JSON `settings.cache` object)."""
    return dict(cache_size=cache_size, cascades=cascades, sinks=sinks, beta=beta, head_reduce=head_reduce,
                stride=stride)


def apply_quick(ctx: typer.Context, quick: bool, values: dict, quick_values: dict) -> dict:
    """With --quick, the grid options that were left at their defaults take their quick values."""
    if not quick:
        return values
    return {k: (quick_values[k] if k in quick_values and not given(ctx, k) else v) for k, v in values.items()}
