"""`cascadectl bench passkey`: can each policy still find a 5-digit key hidden at some depth of long filler?

The command surface only: its options (length × depth × sample × prompt-order grid, filler, question weight),
their checks, then the output (tables on stderr, --json on stdout, --plot). Separate from `bench retention`,
whose grid and measure have nothing in common with it. The samples and scoring are engine.bench.passkey, the
planning and the run loop cascadectl.bench_runs, the tables and JSON cascadectl.bench_report, the heatmaps
cascadectl.plot."""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from typing import Annotated

import typer

from engine.bench import passkey as pk
from engine.bench.grid import BENCH_POLICIES, parse_choices, parse_counts, parse_depths
from engine.bench.text import Noise, Prose
from engine.errors import ConfigError
from engine.models import load_model
from engine.retention import DEFAULT_WEIGHT

from .. import bench_report as report
from .. import bench_runs
from .. import options as o
from .. import plot as plots
from ..common import handle_errors
from ..console import Say
from . import bench_options as b


@handle_errors
def passkey(
    ctx: typer.Context,
    lengths: b.Lengths = "2k,8k",
    depths: Annotated[str, typer.Option("--depths", rich_help_panel="Benchmark",
                                        help="Where the key sits in the filler, fractions in (0, 1).")] = "0.1,0.5,0.9",
    samples: b.Samples = 1,
    seed: b.Seed = 0,
    filler: b.Filler = "noise",
    text: b.Text = None,
    prompt: Annotated[str, typer.Option("--prompt", rich_help_panel="Benchmark",
                                        help="Question first (pinned before the document, guiding the cascade) "
                                             "and/or last (only after it).")] = "first,last",
    policy: b.Policies = "full,sink,cascade",
    model: o.Model = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    weights: o.Weights = "auto",
    cache_size: o.CacheSize = b.CACHE_SIZE,
    cascades: o.Cascades = o.DEFAULTS["cascades"],
    sinks: o.Sinks = o.DEFAULTS["sinks"],
    beta: o.Beta = o.DEFAULTS["beta"],
    head_reduce: o.HeadReduce = o.DEFAULTS["head_reduce"],
    scores: o.Scores = o.DEFAULTS["scores"],
    stride: o.Stride = b.STRIDE,
    evidence: b.Evidence = None,
    question_weight: b.QuestionWeight = DEFAULT_WEIGHT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-t", rich_help_panel="Generation",
                                            help="Tokens decoded (greedy) after the prompt.")] = 12,
    quick: b.Quick = False,
    json_out: o.Json = False,
    plot: b.Plot = None,
    quiet: o.Quiet = False,
) -> None:
    """Passkey retrieval: a 5-digit key inside long filler, at each length × depth; exact and per-digit accuracy.

    Examples:

      cascadectl bench passkey --quick

      cascadectl bench passkey --lengths 2k,8k,32k --depths 0.1,0.3,0.5,0.7,0.9 --prompt first,last

      cascadectl bench passkey --filler prose --policy sink,cascade --json --plot passkey.png

      cascadectl bench passkey --lengths 8k,32k --prompt first --policy sink,cascade,cascade+evidence
    """
    Say.quiet = quiet
    grid = b.apply_quick(ctx, quick, dict(lengths=lengths, depths=depths, samples=samples, prompt=prompt),
                         dict(lengths="1k", depths="0.5", samples=1, prompt="last"))
    length_list = parse_counts(grid["lengths"], "--lengths", minimum=1)
    depth_list = parse_depths(grid["depths"])
    prompts = parse_choices(grid["prompt"], "--prompt", pk.PROMPTS)
    names = parse_choices(policy, "--policy", BENCH_POLICIES)
    if grid["samples"] < 1:
        raise ConfigError(f"--samples must be >= 1 (got {grid['samples']})")
    if filler not in ("noise", "prose"):
        raise ConfigError(f"--filler must be noise or prose (got {filler!r})")
    if question_weight < 0:
        raise ConfigError(f"--question-weight must be >= 0 (got {question_weight})")
    settings = b.cache_settings(cache_size, cascades, sinks, beta, head_reduce, stride, scores)
    configs, slots = b.policy_configs(names, settings, evidence)
    if plot:
        plots.require(plot)
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info)
    source = Prose(lm.tokenizer, text) if filler == "prose" else Noise(lm.tokenizer)
    points = itertools.product(length_list, depth_list, range(grid["samples"]), prompts)
    plan, skipped = bench_runs.passkey_plan(lm, source, configs, points, seed, max_tokens, question_weight)
    bench_runs.note_skipped(skipped)
    layers = bench_runs.evidence_layers(lm, plan)

    results: list[pk.PasskeyResult] = []
    start = time.perf_counter()
    try:
        done = bench_runs.passkey_run(lm, plan, max_tokens, question_weight, quiet, results, layers)
    finally:  # Ctrl-C included: what was measured is still shown
        cells = pk.summarize(results)
        if not quiet and results:
            report.passkey_tables(cells, names, prompts, length_list, depth_list)
    seconds = time.perf_counter() - start
    Say.info(f"[dim]{len(results)} runs, {done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} "
             f"tok/s)[/]")
    if json_out:
        report.write_json({
            "bench": "passkey",
            "settings": {"lengths": length_list, "depths": depth_list, "samples": grid["samples"], "seed": seed,
                         "filler": filler, "text": str(source.path) if filler == "prose" else None,
                         "prompts": prompts, "policies": names, "max_tokens": max_tokens,
                         "question_weight": question_weight, "answer_start": pk.ANSWER_START, "cache": settings,
                         "evidence": slots, "evidence_layers": sorted(layers or {})},
            "summary": cells,
            "results": [asdict(r) for r in results],
            "skipped": skipped,
            "seconds": seconds,
        }, lm)
    if plot:
        plots.passkey_heatmaps(plot, cells, names, prompts, length_list, depth_list)
        Say.info(f"[dim]wrote {plot}[/]")

