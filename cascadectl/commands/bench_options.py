"""Options and option handling shared by `cascadectl bench passkey`, `bench ruler` and `bench retention`.

Kept apart from the commands so that their common options (policies, samples, seed, --text, --quick, --plot,
--evidence), the benchmark cache defaults, the --quick rule and the policy configs are written once; the options
shared with every other command live in cascadectl.options."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from engine.bench.grid import EVIDENCE_POLICY, policy_config
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.evidence import default_slots

from ..settings import given
from ..console import Say

CACHE_SIZE, STRIDE = 512, 256  # small enough that 16x and 64x the cache (8K, 32K tokens) are in reach on a CPU
Policies = Annotated[str, typer.Option(
    "--policy", "-p", rich_help_panel="Cache",
    help="Policies compared at the same cache size (full only where the model's positions allow).")]
Samples = Annotated[int, typer.Option("--samples", rich_help_panel="Benchmark", help="Samples per cell.")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel="Benchmark", help="Seed of keys, offsets, segments.")]
Text = Annotated[Optional[str], typer.Option(
    "--text", rich_help_panel="Benchmark", show_default=False, metavar="FILE",
    help="Prose to use instead of the bundled novel (data/pride_and_prejudice.txt).")]
Lengths = Annotated[str, typer.Option("--lengths", rich_help_panel="Benchmark",
                                      help="Prompt lengths in tokens (2k = 2048).")]
Filler = Annotated[str, typer.Option("--filler", rich_help_panel="Benchmark",
                                     help="noise (repeated sentences) or prose (the bundled novel).")]
QuestionWeight = Annotated[float, typer.Option("--question-weight", rich_help_panel="Cache",
                                               help="λ of question-guided retention (question first).")]
Quick = Annotated[bool, typer.Option("--quick", rich_help_panel="Benchmark",
                                     help="A tiny grid (a minute or two): a smoke test, not a measurement.")]
Evidence = Annotated[Optional[int], typer.Option(
    "--evidence", rich_help_panel="Cache", show_default=False, metavar="SLOTS",
    help=f"Slots of --cache-size that {EVIDENCE_POLICY} gives to the evidence store (question first). Default: "
         f"1/8 of the cache in spans of 32 tokens.")]
Plot = Annotated[Optional[str], typer.Option("--plot", rich_help_panel="Output", show_default=False,
                                             metavar="FILE.png", help="Draw the results into a PNG.")]


def cache_settings(cache_size: int, cascades: int, sinks: int, beta: float, head_reduce: str, stride: int,
                   scores: str = "exact") -> dict:
    """The cache options as CacheConfig keywords (and as the JSON `settings.cache` object)."""
    return dict(cache_size=cache_size, cascades=cascades, sinks=sinks, beta=beta, head_reduce=head_reduce,
                stride=stride, scores=scores)


def apply_quick(ctx: typer.Context, quick: bool, values: dict, quick_values: dict) -> dict:
    """With --quick, the grid options that were left at their defaults take their quick values."""
    if not quick:
        return values
    return {k: (quick_values[k] if k in quick_values and not given(ctx, k) else v) for k, v in values.items()}


def policy_configs(names: list[str], settings: dict, evidence: int | None) -> tuple[list[CacheConfig], int]:
    """The config of each --policy name, all at the same --cache-size, and the evidence slots of
    `cascade+evidence` (engine.evidence.default_slots unless --evidence; 0 when it is not compared)."""
    if EVIDENCE_POLICY not in names:
        if evidence is not None:
            raise ConfigError(f"--evidence applies to --policy {EVIDENCE_POLICY}; add it to --policy or drop "
                              f"--evidence")
        return [policy_config(n, settings) for n in names], 0
    slots = default_slots(settings["cache_size"], settings["cascades"]) if evidence is None else evidence
    if evidence is None and slots == 0:
        raise ConfigError(f"--policy {EVIDENCE_POLICY}: --cache-size {settings['cache_size']} is too small for the "
                          f"default evidence store (1/8 of it in spans of 32 tokens); give --evidence SLOTS")
    configs = [policy_config(n, settings, slots) for n in names]
    clipped = next(c for c in configs if c.evidence)
    if clipped.stride != settings["stride"]:
        Say.info(f"[dim]note: {EVIDENCE_POLICY} reads in chunks of {clipped.stride} tokens (one sub-cache), not "
                 f"--stride {settings['stride']}, so that a chosen span is still whole when it is kept[/]")
    return configs, slots
