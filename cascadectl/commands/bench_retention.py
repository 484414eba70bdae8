"""`cascadectl bench retention`: how far back does each policy hold a segment, seen again after a gap?

The command surface only: its options (gaps as multiples of the cache size or token counts, segment kind and
length), their checks, then the output (a table on stderr, --json on stdout, --plot). Separate from `bench
passkey`, whose grid and measure (generated text rather than the second copy's NLL) have nothing in common with
it. The samples and passes are engine.bench.retention, the gap fitting and the run loop cascadectl.bench_runs,
the table and JSON cascadectl.bench_report, the curves cascadectl.plot."""
from __future__ import annotations

import time
from typing import Annotated

import typer

from engine.bench import retention as rt
from engine.bench.grid import parse_choices, parse_counts
from engine.bench.text import Prose
from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.models import load_model

from .. import bench_report as report
from .. import bench_runs
from .. import options as o
from .. import plot as plots
from ..common import handle_errors
from ..console import Say
from . import bench_options as b


@handle_errors
def retention(
    ctx: typer.Context,
    gaps: Annotated[str, typer.Option(
        "--gaps", rich_help_panel="Benchmark",
        help="Gaps between the two copies: multiples of --cache-size (0.5x) or token counts (512, 2k).")]
    = "0.5x,1x,2x,4x,8x,16x",
    samples: b.Samples = 1,
    seed: b.Seed = 0,
    segment: Annotated[str, typer.Option("--segment", rich_help_panel="Benchmark",
                                         help="random (token ids from the vocabulary) or prose (a span of the "
                                              "text).")] = "random",
    segment_tokens: Annotated[int, typer.Option("--segment-tokens", rich_help_panel="Benchmark",
                                                help="Length of the repeated segment.")] = 64,
    text: b.Text = None,
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
    quick: b.Quick = False,
    json_out: o.Json = False,
    plot: b.Plot = None,
    quiet: o.Quiet = False,
) -> None:
    """Retention: a segment repeated after a gap; its loss the second time shows how far back each policy holds.

    Examples:

      cascadectl bench retention --quick

      cascadectl bench retention --gaps 0.5x,1x,2x,4x,8x,16x,64x --policy sink,cascade --plot retention.png

      cascadectl bench retention --segment prose --gaps 256,1k,4k --json
    """
    Say.quiet = quiet
    grid = b.apply_quick(ctx, quick, dict(gaps=gaps, samples=samples), dict(gaps="0.5x,1x,2x,4x"))
    gap_list = parse_counts(grid["gaps"], "--gaps", unit=cache_size)
    names = parse_choices(policy, "--policy")
    if grid["samples"] < 1:
        raise ConfigError(f"--samples must be >= 1 (got {grid['samples']})")
    if segment not in rt.SEGMENTS:
        raise ConfigError(f"--segment must be random or prose (got {segment!r})")
    if segment_tokens < 2:
        raise ConfigError(f"--segment-tokens must be >= 2 (got {segment_tokens}): its first token is not scored")
    settings = b.cache_settings(cache_size, cascades, sinks, beta, head_reduce, stride, scores)
    configs = [CacheConfig(policy=p, **settings) for p in names]
    if plot:
        plots.require(plot)
    lm = load_model(model, device, dtype, weights=weights, notify=Say.info, decodes=False)
    for config in configs:
        if config.policy != "full":
            config.check_positions(config.sinks, lm.max_positions)
    prose = Prose(lm.tokenizer, text)
    vocab = rt.vocabulary(lm.tokenizer, lm.model.config.vocab_size) if segment == "random" else []
    sample_list = [rt.make_sample(prose, vocab, gap_list[-1], segment_tokens, segment, seed, s)
                   for s in range(grid["samples"])]
    fitted, skipped = bench_runs.retention_fit(configs, gap_list, sample_list[0], lm.max_positions)
    if skipped:
        Say.info(f"note: full skipped at gaps {', '.join(report.tokens_label(k['gap']) for k in skipped)}: more "
                 f"positions than the model's {lm.max_positions:,}")

    runs: list[rt.RetentionRun] = []
    start = time.perf_counter()
    try:
        done = bench_runs.retention_run(lm, configs, sample_list, fitted, segment_tokens, quiet, runs)
    finally:  # Ctrl-C included: what was measured is still shown
        rows = _rows(rt.summarize(runs), cache_size)
        if not quiet and runs:
            report.retention_table(rows, cache_size)
    seconds = time.perf_counter() - start
    Say.info(f"[dim]{len(runs)} passes, {done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} "
             f"tok/s)[/]")
    if json_out:
        report.write_json({
            "bench": "retention",
            "settings": {"gaps": gap_list, "samples": grid["samples"], "seed": seed, "segment": segment,
                         "segment_tokens": segment_tokens, "lead_tokens": rt.LEAD, "text": str(prose.path),
                         "policies": names, "cache": settings},
            "summary": rows,
            "runs": [{"policy": r.policy, "sample": r.sample, "baseline": r.baseline,
                      "gaps": [{"gap": g, "nll": v} for g, v in sorted(r.nll.items())],
                      "tokens": r.tokens, "seconds": r.seconds} for r in runs],
            "skipped": skipped,
            "seconds": seconds,
        }, lm)
    if plot:
        plots.retention_curves(plot, rows, cache_size, segment_tokens)
        Say.info(f"[dim]wrote {plot}[/]")


def _rows(summary: list[dict], cache_size: int) -> list[dict]:
    """Engine summary rows with the gaps as a list (JSON keys must be strings) and relative to the cache."""
    return [{"policy": r["policy"], "samples": r["samples"], "baseline": r["baseline"],
             "gaps": [{"gap": g, "relative": g / cache_size, "nll": v} for g, v in sorted(r["nll"].items())]}
            for r in summary]
